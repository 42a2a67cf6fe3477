"""Patch swap time by where the patch lives (issue 9): resident on the GPU (pointer swap), pinned CPU memory (copy
in), memory-mapped from disk (read + copy), for a Llama-2-7B-shaped decoder layer (202 M params, 386 MB in fp16).

    python bench/swap_bench.py --out OUT [--shape 7b|tiny] [--repeats 20]

The model has the 7B layer shape but only 2 decoder layers (a swap touches one layer; the rest of the model does
not change its cost). Two random patches of layer 1 are written as real patch files and swapped in turn.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {"7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                     vocab_size=32000),
          "tiny": dict(hidden_size=64, intermediate_size=172, num_attention_heads=4, num_key_value_heads=4,
                       vocab_size=1000)}
TARGET_MS = {"device": 1.0, "pinned": 30.0}


def main():
    from transformers import LlamaConfig, LlamaForCausalLM

    from zolite.patch import fingerprint, save_patch
    from zolite.swap import PatchSet
    from zolite.zo import TunedLayers

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shape", choices=list(SHAPES), default="7b")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[args.shape], num_hidden_layers=2)).to(dtype).eval()
    model.requires_grad_(False)
    layer = TunedLayers(model, [1])
    base = layer.state()
    meta = {"zolite.model": "bench", "zolite.arch": "llama", "zolite.layer": "1",
            "zolite.base_sha256": fingerprint(layer.weights())}
    tmp = Path(tempfile.mkdtemp())
    files = []
    for k in range(2):
        tensors = {n: t + 0.001 * (k + 1) * torch.randn_like(t) for n, t in base.items()}
        files.append(save_patch(tmp / f"p{k}.safetensors", tensors, meta))
    layer_bytes = sum(t.numel() * 2 for t in base.values())
    patches = PatchSet(model)
    for where in ("device", "pinned", "disk"):
        for k, f in enumerate(files):
            patches.attach(f"{where}{k}", f, where)

    def timed(name):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        patches.swap(name)
        if device == "cuda":
            torch.cuda.synchronize()
        return 1000 * (time.perf_counter() - t0)

    rows = []
    for where in ("device", "pinned", "disk"):
        timed(f"{where}0")   # warm-up (allocates the shared buffer, touches the file pages)
        times = [timed(f"{where}{(i + 1) % 2}") for i in range(args.repeats)]
        rows.append({"where": where, "median_ms": round(statistics.median(times), 3), "max_ms": round(max(times), 3),
                     "target_ms": TARGET_MS.get(where)})
    t0 = time.perf_counter()
    patches.reset()
    reset_ms = 1000 * (time.perf_counter() - t0)
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None}
    result = {"shape": args.shape, "layer_params": sum(t.numel() for t in base.values()), "layer_fp16_bytes": layer_bytes,
              "device": device, "dtype": str(dtype), "repeats": args.repeats, "rows": rows,
              "reset_ms": round(reset_ms, 3), "env": env,
              "note": "disk: the file is in the page cache after the warm-up; a cold read adds the disk's time"}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Patch swap time ({env['gpu'] or 'CPU'}, {args.shape} layer shape: "
             f"{result['layer_params'] / 1e6:.1f} M params, {layer_bytes / 1e6:.0f} MB in fp16)", "",
             "| patch lives | median ms | max ms | target |", "|---|---|---|---|"]
    for r in rows:
        target = "" if r["target_ms"] is None else f"<= {r['target_ms']:g} ms: " + ("met" if r["median_ms"] <= r["target_ms"] else "MISSED")
        lines.append(f"| {r['where']} | {r['median_ms']:.3f} | {r['max_ms']:.3f} | {target} |")
    lines += ["", f"reset to the base: {reset_ms:.3f} ms. {result['note']}."]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
