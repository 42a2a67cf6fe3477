"""Issue 8's evidence: the seed000 ablation plan on the real SmolLM2-135M, one task after another.

    python bench/ablate_smollm2.py --out OUT --tasks sst2,rte --seeds 3 --steps 1000 --jobs 16 [--data DIR]

Each task is one `zolite ablate --jobs N` (N runs at once, dealt over the visible GPUs, each in its own process;
every arm's seed-0 lr grid first, then its other seeds); the runs land in OUT/TASK/ARM/lr<LR>-s<SEED>, the tables and
plots in OUT/TASK/results.{md,csv,json}, accuracy.png, loss.png. Re-running the same command resumes: finished runs
(report.json) are read back, cut-off ones continue from their checkpoints. To run tasks side by side, start one
invocation per task.
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
    ap.add_argument("--tasks", default="sst2,boolq,rte")
    ap.add_argument("--plan", default="seed000")
    ap.add_argument("--arms", help="a subset of the plan's arms (comma-separated)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--data", help="passed to zolite as --data")
    args = ap.parse_args()
    for task in args.tasks.split(","):
        cmd = [sys.executable, "-m", "zolite.cli", "ablate", "--model", args.model, "--task", task, "--plan", args.plan,
               "--seeds", str(args.seeds), "--steps", str(args.steps), "--jobs", str(args.jobs), "--quiet",
               "--out", str(args.out / task)]
        cmd += (["--arms", args.arms] if args.arms else []) + (["--data", args.data] if args.data else [])
        print(f"{task}: {' '.join(cmd[1:])}", flush=True)
        rc = subprocess.run(cmd).returncode
        print(f"{task}: exit {rc}", flush=True)


if __name__ == "__main__":
    main()
