"""Peak GPU memory and ZO step time per loading mode on a Llama-2-7B-shaped model with random weights (issue 5).

    python bench/memory_modes.py --out OUT [--model-dir /root/llama7b-random] [--shape 7b|tiny]

1. builds the model from a config (no download) once, saved as fp16 safetensors in --model-dir;
2. `zolite profile` per mode (fp16 / int8 at thresholds 6.0 and 0.0 / nf4 / offload, and int8 / nf4 with micro-batches
   of 8 and 4), batch 16, sequence 256, layer 1, and full-model fp16 MeZO (--layers all), each in its own process so
   peaks do not mix;
3. one fp16 forward of batch 32 (the reference for "int8 step <= 1.1x a B32 forward");
4. the planner under caps: `zolite profile --gpu-memory N` for 24, 12, 8, 6 and 4 GiB (the allocator capped there).
Writes OUT/results.json and OUT/results.md; runs that fail are recorded with their last error line.
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

SHAPES = {  # Llama-2-7B (Touvron et al. 2023) and a tiny one to check the script on a CPU
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=1000),
}
TARGETS_GIB = {"int8": 7.5, "nf4": 5.0, "offload": 2.5}


def build_model(model_dir: Path, shape: str) -> None:
    """A random-weight Llama of `shape`, saved once (fp16 safetensors + a byte-level tokenizer)."""
    if (model_dir / "config.json").is_file():
        return
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, dtype="float16")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.float16)
    model.save_pretrained(model_dir)
    vocab = {f"<{i}>": i for i in range(config.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<0>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<1>", eos_token="<2>", pad_token="<0>",
                            unk_token="<0>").save_pretrained(model_dir)
    del model


def profile(model_dir: Path, out: Path, name: str, *args: str) -> dict:
    cmd = [sys.executable, "-m", "zolite.cli", "profile", "--model", str(model_dir), "--batch", "16", "--seq-len", "256",
           "--steps", "6", "--out", str(out / name), "--force", "--json", *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    row = {"name": name, "args": list(args), "wall_s": round(time.perf_counter() - t0, 1),
           "command": "zolite " + shlex.join(cmd[3:])}
    if proc.returncode != 0:
        row["error"] = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return row
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    mp = result["memory_profile"]
    train = mp["phases"]["train"]
    row.update(mode=result["mode"], layers=result["layers"], micro_batch=result["micro_batch"], step_ms=mp["step_ms"],
               peak_allocated_gib=train["gpu_allocated_peak_gib"], peak_reserved_gib=train["gpu_reserved_peak_gib"],
               load_peak_gib=mp["phases"]["load"]["gpu_allocated_peak_gib"], breakdown=mp["breakdown"],
               plan=result.get("plan"))
    return row


def forward_ms(model_dir: Path, batch: int, seq_len: int, repeats: int = 10) -> dict:
    """Median time of one fp16 forward (no KV cache), the reference for the int8 step target."""
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float16 if device == "cuda" else torch.float32)
    model.to(device).eval()
    ids = torch.randint(3, model.config.vocab_size, (batch, seq_len), device=device)
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 2):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.model(input_ids=ids, use_cache=False)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    del model
    return {"batch": batch, "seq_len": seq_len, "ms": round(1000 * statistics.median(times[2:]), 2)}


def table(results: dict) -> str:
    env = results["env"]
    lines = [f"# ZO step memory and time per mode ({env.get('gpu', 'CPU')}, {results['shape']} shape, random weights)",
             "", f"Command: `python {results['argv']}`; torch {env['torch']}, transformers {env['transformers']}.", "",
             "Batch 16 x 256 tokens, one ZO step = one forward of the doubled batch from the tuned layer on + the "
             "update; median of 5 steps after a warm-up. Peak = torch's max allocated during training.", "",
             "| run | mode | layers | micro-batch | step ms | peak allocated GiB | peak reserved GiB | target | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        if "error" in r:
            lines.append(f"| {r['name']} | | | | | | | | failed: {r['error']} |")
            continue
        target = TARGETS_GIB.get(r["name"].split("-")[0]) if r["layers"] != "all" else None
        verdict = "" if target is None else (f"<= {target}: " + ("met" if r["peak_allocated_gib"] <= target else "MISSED"))
        note = r["plan"]["reason"] if r.get("plan") else ""
        lines.append(f"| {r['name']} | {r['mode']} | {r['layers']} | {r['micro_batch']} | {r['step_ms']:.1f} | "
                     f"{r['peak_allocated_gib']:.2f} | {r['peak_reserved_gib']:.2f} | {verdict} | {note} |")
    f = results["forward_b32"]
    lines += ["", f"One fp16 forward of batch {f['batch']} x {f['seq_len']}: {f['ms']:.1f} ms "
              f"(target: int8 step <= {1.1 * f['ms']:.1f} ms)."]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model-dir", type=Path, default=Path("/root/llama7b-random"))
    ap.add_argument("--shape", choices=list(SHAPES), default="7b")
    ap.add_argument("--caps", default="24,12,8,6,4", help="GiB budgets for the planner runs ('' to skip)")
    ap.add_argument("--runs", help="only these runs, comma-separated (fp16, int8, int8-t0, nf4, offload, int8-mb8, "
                    "int8-mb4, nf4-mb8, full-fp16); default: all")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    results = {"argv": shlex.join(sys.argv), "env": env, "shape": args.shape, "runs": []}

    def save():
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
        if "forward_b32" in results:
            (args.out / "results.md").write_text(table(results))

    plain = ["--layer", "1"]
    runs = [("fp16", "--mode", "fp16"), ("int8", "--mode", "int8"), ("int8-t0", "--mode", "int8", "--int8-threshold", "0"),
            ("nf4", "--mode", "nf4"), ("offload", "--mode", "offload"),
            # micro-batches: the same step in 2 or 4 forwards, for the int8 / nf4 memory targets
            ("int8-mb8", "--mode", "int8", "--micro-batch", "8"), ("int8-mb4", "--mode", "int8", "--micro-batch", "4"),
            ("nf4-mb8", "--mode", "nf4", "--micro-batch", "8"), ("full-fp16", "--layers", "all", "--mode", "fp16")]
    names = [name for name, *_ in runs]
    wanted = set(args.runs.split(",")) if args.runs else set(names)
    if wanted - set(names):
        sys.exit(f"memory_modes: unknown run(s) {', '.join(sorted(wanted - set(names)))}; choose from {', '.join(names)}")
    build_model(args.model_dir, args.shape)
    results["forward_b32"] = forward_ms(args.model_dir, 32, 256)
    save()
    for name, *flags in runs:
        if name in wanted:
            layer = [] if "--layers" in flags else plain
            results["runs"].append(profile(args.model_dir, args.out, name, *layer, *flags))
            save()
    for cap in filter(None, args.caps.split(",")):
        results["runs"].append(profile(args.model_dir, args.out, f"plan-{cap}GiB", *plain, "--gpu-memory", f"{cap}GiB"))
        save()
    print(table(results))


if __name__ == "__main__":
    main()
