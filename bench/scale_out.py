"""Data-parallel ZO scaling (issue 24): steps/s of one model on 1 vs N processes (one GPU each) at equal global batch,
the scaling efficiency, and test accuracy over seeds (the same as one GPU's within the seeds' spread?).

Every run is `zolite tune ... --nproc N` with the same global batch; a process evaluates its slice of each step's
batch and the processes exchange one all_reduce of 24 bytes per step (NCCL on GPUs, gloo on the CPU).

On a machine with several GPUs (NVLink multicast off, as KINDS.md asks):

    NCCL_NVLS_ENABLE=0 python bench/scale_out.py --out bench/results/scale_out_h100 \\
        --models smollm2-135m,qwen2.5-coder-1.5b --nproc 1,2,4 --steps 200 --batch-size 32 --seeds 0,1,2 --test

CPU smoke test (checks the harness, not a measurement: the processes share this machine's cores):

    python bench/scale_out.py --out /tmp/scale_out_cpu --device cpu --models smollm2-135m --nproc 1,2 \\
        --steps 4 --batch-size 8 --seeds 0

Results: OUT/results.json and OUT/results.md (rewritten as runs finish), each with the command that made them.
speedup(N) = step time at 1 process / step time at N; efficiency = speedup / N (1.0: perfect scaling).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

LR = {"smollm2-135m": 3e-4, "qwen2.5-coder-1.5b": 1e-5}   # the hand-picked steps (docs/evidence.md); else --lr


def environment(device: str) -> dict:
    import torch
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "cpus": os.cpu_count(), "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE")}
    if device != "cpu" and torch.cuda.is_available():
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return env


def run(args, model: str, nproc: int, seed: int) -> dict:
    run_dir = Path(args.out) / "runs" / f"{model}-n{nproc}-s{seed}"
    cmd = [sys.executable, "-m", "zolite.cli", "tune", "--model", model, "--task", args.task,
           "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--eval-every", "0",
           "--lr", str(args.lr or LR.get(model, 1e-5)), "--seed", str(seed), "--nproc", str(nproc),
           "--run-dir", str(run_dir), "--force", "--json", "--quiet"]
    cmd += ["--test"] if args.test else []
    cmd += ["--device", args.device] if args.device else []
    cmd += ["--mode", args.mode] if args.mode else []
    cmd += ["--data", args.data] if args.data else []
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return {"model": model, "nproc": nproc, "seed": seed, "error": (done.stderr.strip().splitlines() or ["?"])[-1],
                "command": shlex.join(cmd)}
    report = json.loads((run_dir / "report.json").read_text())
    return {"model": model, "nproc": nproc, "seed": seed, "step_ms": report["timing"]["step_ms"],
            "steps_per_s": 1000 / report["timing"]["step_ms"], "wall_s": round(time.perf_counter() - t0, 1),
            "bytes_per_step": report["distributed"]["bytes_per_step"],
            "test_accuracy": (report["final"].get("test") or {}).get("score"),
            "device": report["model"]["device"], "mode": report["config"]["mode"], "command": shlex.join(cmd)}


def summarise(rows: list[dict]) -> list[dict]:
    """Per model and process count: mean step time over seeds, speedup and efficiency against 1 process, test
    accuracy mean and spread."""
    table = []
    for model in dict.fromkeys(r["model"] for r in rows):
        ok = [r for r in rows if r["model"] == model and "error" not in r]
        base = [r["step_ms"] for r in ok if r["nproc"] == 1]
        for nproc in sorted({r["nproc"] for r in ok}):
            runs = [r for r in ok if r["nproc"] == nproc]
            step_ms = statistics.fmean(r["step_ms"] for r in runs)
            acc = [r["test_accuracy"] for r in runs if r["test_accuracy"] is not None]
            speedup = statistics.fmean(base) / step_ms if base else None
            table.append({"model": model, "nproc": nproc, "runs": len(runs), "step_ms": round(step_ms, 2),
                          "steps_per_s": round(1000 / step_ms, 2),
                          "speedup": round(speedup, 3) if speedup else None,
                          "efficiency": round(speedup / nproc, 3) if speedup else None,
                          "bytes_per_step": runs[0]["bytes_per_step"],
                          "test_accuracy": round(statistics.fmean(acc), 4) if acc else None,
                          "test_accuracy_sd": round(statistics.stdev(acc), 4) if len(acc) > 1 else None})
    return table


def write(args, rows: list[dict]) -> None:
    out = Path(args.out)
    table = summarise(rows)
    command = shlex.join([sys.executable, *sys.argv])
    (out / "results.json").write_text(json.dumps({"command": command, "environment": environment(args.device),
                                                  "summary": table, "runs": rows}, indent=1) + "\n")
    lines = [f"# Data-parallel ZO scaling ({args.task}, global batch {args.batch_size}, {args.steps} steps)", "",
             f"Command: `{command}`", "",
             "| model | processes | step ms | steps/s | speedup | efficiency | bytes/step | test acc (sd) |",
             "|---|---|---|---|---|---|---|---|"]
    for t in table:
        acc = "" if t["test_accuracy"] is None else f"{t['test_accuracy']:.4f}" + (
            f" ({t['test_accuracy_sd']:.4f})" if t["test_accuracy_sd"] is not None else "")
        lines.append(f"| {t['model']} | {t['nproc']} | {t['step_ms']} | {t['steps_per_s']} | {t['speedup']} | "
                     f"{t['efficiency']} | {t['bytes_per_step']:g} | {acc} |")
    errors = [r for r in rows if "error" in r]
    if errors:
        lines += ["", "Failed runs:"] + [f"- {r['model']} x{r['nproc']} seed {r['seed']}: {r['error']}" for r in errors]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", default="smollm2-135m,qwen2.5-coder-1.5b")
    parser.add_argument("--nproc", default="1,2", help="process counts, e.g. 1,2,4 (one GPU each)")
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32, help="the global batch, the same at every count")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--lr", type=float, help="default: the model's hand-picked step (LR above), else 1e-5")
    parser.add_argument("--test", action="store_true", help="score the test split (accuracy over seeds)")
    parser.add_argument("--device", help="cpu: the smoke test; default: cuda when there is one")
    parser.add_argument("--mode", help="fp16 | nf4 | ... (default: zolite's)")
    parser.add_argument("--data")
    args = parser.parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")   # NVLink multicast off (the device's KINDS.md)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    rows = []
    for model in args.models.split(","):
        for seed in map(int, args.seeds.split(",")):
            for nproc in map(int, args.nproc.split(",")):
                rows.append(run(args, model, nproc, seed))
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "command"}), flush=True)
                write(args, rows)


if __name__ == "__main__":
    main()
