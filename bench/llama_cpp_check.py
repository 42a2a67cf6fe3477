"""zolite's GGUF exports run through llama.cpp itself (issue 25): next-token logits on the same token ids against the
patched model as `zolite apply` loads it (transformers), and a greedy completion from both.

    python bench/llama_cpp_check.py --lib LIB --patch PATCH --export EXPORT.gguf [--export ...] \
        [--out bench/results/export_gguf/llama_cpp.json]

LIB is llama.cpp's CPU library with its cffi bindings. llama-cpp-python ships only a source distribution; the newest
prebuilt llama.cpp on PyPI that loads on this machine (glibc 2.36) is the CPU module inside llama-cpp-cffi 0.3.1's
manylinux_2_28 wheel (its later wheels and llama-cpp-py-sync's need glibc 2.38 / GCC 14's libstdc++). The wheel's
Python package needs transformers < 5, so only its compiled module is used, loaded from its path:

    pip download --no-deps --only-binary :all: llama-cpp-cffi==0.3.1 -d /tmp/w
    unzip -o /tmp/w/llama_cpp_cffi-0.3.1-*.whl 'llama/_llama_cpp_cpu*' -d /tmp/llama-cffi
    LIB=/tmp/llama-cffi/llama/_llama_cpp_cpu.cpython-311-x86_64-linux-gnu.so

The same comparison on the source GGUF against the unpatched base is the reference: what llama.cpp and transformers
differ by before zolite touches anything.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

PROMPTS = ("Question: What is the capital of France?\nAnswer:",
           "Review: a gripping, beautifully made film.\nSentiment:",
           "def fibonacci(n):\n    if n < 2:\n        return")


def load_lib(path: Path):
    spec = importlib.util.spec_from_file_location(Path(path).name.split(".")[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.lib, module.ffi


class LlamaCpp:
    """One GGUF in llama.cpp (the C API of llama.cpp as of the library's build: llama_load_model_from_file, llama_batch_init)."""

    def __init__(self, lib, ffi, gguf: Path, n_ctx: int = 512, threads: int = 2):
        self.lib, self.ffi = lib, ffi
        lib.llama_backend_init()
        self.model = lib.llama_load_model_from_file(str(gguf).encode(), lib.llama_model_default_params())
        if self.model == ffi.NULL:
            raise SystemExit(f"llama.cpp could not load {gguf}")
        params = lib.llama_context_default_params()
        params.n_ctx, params.n_batch = n_ctx, n_ctx
        params.n_threads = params.n_threads_batch = threads
        self.ctx = lib.llama_new_context_with_model(self.model, params)
        self.n_vocab = lib.llama_n_vocab(self.model)

    def _decode(self, ids: list[int], start: int = 0) -> None:
        """ids at positions start.., every position's logits kept (llama_batch_get_one keeps only the last's)."""
        batch = self.lib.llama_batch_init(len(ids), 0, 1)
        for i, token in enumerate(ids):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, start + i, 1, True
            batch.seq_id[i][0] = 0
        batch.n_tokens = len(ids)
        failed = self.lib.llama_decode(self.ctx, batch)
        self.lib.llama_batch_free(batch)
        if failed:
            raise SystemExit("llama_decode failed")

    def _row(self, i: int) -> np.ndarray:
        ptr = self.lib.llama_get_logits_ith(self.ctx, i)
        return np.frombuffer(self.ffi.buffer(ptr, 4 * self.n_vocab), dtype=np.float32).copy()

    def logits(self, ids: list[int]) -> np.ndarray:
        self.lib.llama_kv_cache_clear(self.ctx)
        self._decode(ids)
        return np.stack([self._row(i) for i in range(len(ids))])

    def greedy(self, ids: list[int], n: int) -> tuple[list[int], float]:
        self.lib.llama_kv_cache_clear(self.ctx)
        self._decode(ids)
        out, started = [], time.monotonic()
        for _ in range(n):
            out.append(int(self._row(-1).argmax()))
            self._decode(out[-1:], start=len(ids) + len(out) - 1)
        return out, time.monotonic() - started

    def close(self) -> None:
        self.lib.llama_free(self.ctx)
        self.lib.llama_free_model(self.model)


def transformers_side(spec: str, patch: Path | None, n: int):
    """Token ids, logits and greedy continuations of the base (patch None) or the patched model, as zolite loads it."""
    from zolite.apply import apply_patch
    from zolite.loading import load_model

    loaded = load_model(spec, device="cpu", dtype="float32", mode="fp16")
    if patch is not None:
        apply_patch(loaded.model, patch)
    rows = []
    with torch.inference_mode():
        for prompt in PROMPTS:
            ids = loaded.tokenizer(prompt)["input_ids"]
            x = torch.tensor([ids])
            logits = loaded.model(x, use_cache=False).logits[0].float().numpy()
            gen = loaded.model.generate(x, max_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(x))
            rows.append((ids, logits, gen[0, len(ids):].tolist()))
    return loaded.tokenizer, rows


def compare(llm: LlamaCpp, tokenizer, rows, n: int) -> dict:
    diffs, agree, same_text, out = [], [], 0, []
    tokens = seconds = 0
    for ids, expected, expected_gen in rows:
        got = llm.logits(ids)
        diffs.append(float(np.abs(got - expected).max()))
        agree.append((got.argmax(-1) == expected.argmax(-1)).mean())
        gen, s = llm.greedy(ids, n)
        tokens, seconds = tokens + len(gen), seconds + s
        if tokenizer.eos_token_id in gen:   # transformers' generate stops after the end-of-text token
            gen = gen[:gen.index(tokenizer.eos_token_id) + 1]
        same_text += gen == expected_gen
        out.append({"llama_cpp": tokenizer.decode(gen), "transformers": tokenizer.decode(expected_gen)})
    return {"max_logit_diff": round(max(diffs), 4), "top1_agreement": round(float(np.mean(agree)), 4),
            "greedy_identical": f"{same_text}/{len(rows)}",
            "tokens_per_s_loaded_machine": round(tokens / seconds, 1),
            "completions": out}


def main():
    from zolite.loading import gguf_source
    from zolite.patch import load_patch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lib", type=Path, required=True, help="llama.cpp's CPU module (see above)")
    ap.add_argument("--patch", type=Path, required=True)
    ap.add_argument("--export", type=Path, action="append", required=True, help="an exported GGUF of this patch")
    ap.add_argument("--tokens", type=int, default=12, help="greedy tokens per prompt")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    for path in (args.lib, args.patch, *args.export):
        if not path.is_file():
            raise SystemExit(f"error: {path} is not a file (see this script's docstring for how to get the library)")
    lib, ffi = load_lib(args.lib)
    spec = load_patch(args.patch).metadata["zolite.model"]
    source = gguf_source(spec)
    result = {"model": spec, "patch": str(args.patch), "library": f"{args.lib.name} (llama-cpp-cffi 0.3.1)",
              "machine": f"{platform.machine()}, CPU", "date": time.strftime("%Y-%m-%d"), "rows": []}
    pairs = [(source, None, "source GGUF vs the unpatched base")] if source else []
    pairs += [(e, args.patch, f"export {e.name} vs the patched model") for e in args.export]
    cache = {}
    for gguf, patch, what in pairs:
        if patch not in cache:
            cache[patch] = transformers_side(spec, patch, args.tokens)
        tokenizer, rows = cache[patch]
        llm = LlamaCpp(lib, ffi, gguf)
        row = {"what": what, "file": str(gguf), **compare(llm, tokenizer, rows, args.tokens)}
        llm.close()
        print(json.dumps({k: v for k, v in row.items() if k != "completions"}), flush=True)
        result["rows"].append(row)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
