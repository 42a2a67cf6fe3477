"""Offload against fp16 on the real SmolLM2-135M (issue 5): the same predictions and the same tuned result?

    python bench/offload_check.py --out OUT [--model smollm2-135m] [--task sst2]

For each of fp16 and offload: `zolite eval --json` (zero-shot test accuracy, per class) -> OUT/eval-MODE.json, and a
20-step `zolite tune --layer 11 --seed 0 --json` -> OUT/tune-MODE.json (val score, kept step, GPU peak, step time).
Needs a GPU (offload streams CPU-held weights to it). bench/results/offload_check_h200/ came from these commands,
run from a shell loop on the device.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="sst2")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    zolite = [sys.executable, "-m", "zolite.cli"]
    for mode in ("fp16", "offload"):
        common = ["--model", args.model, "--task", args.task, "--mode", mode, "--json"]
        commands = {f"eval-{mode}.json": [*zolite, "eval", *common],
                    f"tune-{mode}.json": [*zolite, "tune", *common, "--layer", "11", "--steps", "20",
                                          "--eval-every", "10", "--seed", "0", "--run-dir",
                                          str(args.out / f"run-{mode}"), "--force", "--quiet"]}
        for name, cmd in commands.items():
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode:
                sys.exit(f"offload_check: {' '.join(cmd[2:])} failed: {(result.stderr.strip().splitlines() or ['no message'])[-1]}")
            (args.out / name).write_text(result.stdout)
            print(f"{name}: written", flush=True)


if __name__ == "__main__":
    main()
