"""Issue 8's evidence: the seed000 ablation plan on the real SmolLM2-135M, several tasks, arms in parallel on one GPU.

    python bench/ablate_smollm2.py --out OUT --tasks sst2,boolq,rte --seeds 3 --steps 1000 --parallel 8 [--data DIR]

Each (task, arm) runs as its own `zolite ablate --arms ARM` process (their runs land in OUT/TASK/ARM/...); a final
`zolite ablate` per task finds every finished run and writes OUT/TASK/results.{md,csv,json} and the plots. Re-running
the same command resumes: finished runs are read back, cut-off ones continue from their checkpoints.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from zolite.ablate import load_plan


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", default="sst2,boolq,rte")
    ap.add_argument("--plan", default="seed000")
    ap.add_argument("--arms", help="a subset of the plan's arms (comma-separated)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--data", help="passed to zolite as --data")
    args = ap.parse_args()
    arms = args.arms.split(",") if args.arms else [a["name"] for a in load_plan(args.plan)["arms"]]
    base = [sys.executable, "-m", "zolite.cli", "ablate", "--model", args.model, "--plan", args.plan,
            "--seeds", str(args.seeds), "--steps", str(args.steps), "--quiet"] + (["--data", args.data] if args.data else [])

    def run(job):
        task, arm = job
        log = args.out / task / "logs" / f"{arm}.txt"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            rc = subprocess.run(base + ["--task", task, "--arms", arm, "--out", str(args.out / task)],
                                stdout=f, stderr=subprocess.STDOUT).returncode
        print(f"{task} {arm}: exit {rc}", flush=True)

    jobs = [(t, a) for t in args.tasks.split(",") for a in arms]
    with ThreadPoolExecutor(args.parallel) as pool:
        list(pool.map(run, jobs))
    for task in args.tasks.split(","):   # tabulate: finished runs are read back; any cut-off one is finished here
        subprocess.run(base + ["--task", task, "--arms", ",".join(arms), "--out", str(args.out / task)])


if __name__ == "__main__":
    main()
