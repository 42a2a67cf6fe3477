"""Zero-shot vs dominant-layer ZO vs full-model MeZO on the real SmolLM2-135M (issue 4's evidence).

Two phases, each a batch of `zolite tune` runs launched in parallel on one GPU (the model is small, so a single
run leaves the GPU mostly idle):

  sweep: every lr of the grid, seed 0, scored on the dev (val) split only -> picks the lr of each (task, arm)
  final: the picked lr, every seed, scored on the held-out test split; zero-shot test accuracy on the same rows

    python bench/tune_smollm2.py sweep --out OUT --steps 1000 --lr-layer 1e-5,1e-4,1e-3 --lr-full 1e-6,1e-5
    python bench/tune_smollm2.py final --out OUT --steps 2000 --pick OUT/sweep.json --seeds 0,1,2

Results: OUT/{sweep,final}.json and OUT/final.md (mean ± std over seeds, wall time per run), written as runs finish.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ARMS = {"dominant": None, "full": "all"}   # None: the profile's dominant layer


def environment() -> dict:
    import torch
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def run_tune(args, task, arm, lr, seed, test: bool, out: Path) -> dict:
    run_dir = out / "runs" / f"{task}-{arm}-lr{lr:g}-s{seed}"
    cmd = [sys.executable, "-m", "zolite.cli", "tune", "--model", args.model, "--task", task, "--steps", str(args.steps),
           "--lr", str(lr), "--eps", str(args.eps), "--batch-size", str(args.batch_size),
           "--eval-every", str(args.eval_every), "--seed", str(seed), "--run-dir", str(run_dir), "--force",
           "--json", "--quiet"]
    if ARMS[arm] is not None:
        cmd += ["--layer", ARMS[arm]]
    if test:
        cmd.append("--test")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    row = {"task": task, "arm": arm, "lr": lr, "seed": seed, "wall_s": round(wall, 1), "command": shlex.join(cmd[1:])}
    if proc.returncode != 0:
        row["error"] = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        return row
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    report = json.loads((run_dir / "report.json").read_text())
    row.update(val=summary["val_accuracy"], test=summary.get("test_accuracy"), layers=summary["layers"],
               kept_step=summary["kept_step"], step_ms=summary["timing"]["step_ms"], memory=summary["memory"],
               val_curve=report["val_curve"], loss_first=report["loss_curve"][:50], loss_last=report["loss_curve"][-50:])
    return row


def zero_shot(args, task) -> dict:
    cmd = [sys.executable, "-m", "zolite.cli", "eval", "--model", args.model, "--task", task, "--json"]
    result = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    return {"task": task, "test": result["zero_shot"]["accuracy"], "n": result["rows"], "command": shlex.join(cmd[1:])}


def run_all(args, jobs, out: Path, name: str, extra: dict) -> list[dict]:
    rows: list[dict] = []
    meta = {"phase": name, "argv": shlex.join(sys.argv), "env": environment(), **extra}

    def one(job):
        row = run_tune(args, *job, test=(name == "final"), out=out)
        rows.append(row)
        (out / f"{name}.json").write_text(json.dumps({**meta, "runs": rows}, indent=1))
        print(f"[{len(rows)}/{len(jobs)}] {row['task']} {row['arm']} lr={row['lr']:g} seed={row['seed']}: "
              f"val={row.get('val')} test={row.get('test')} {row['wall_s']}s {row.get('error', '')}", flush=True)

    with ThreadPoolExecutor(args.parallel) as pool:
        list(pool.map(one, jobs))
    return rows


def mean_std(xs):
    return (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("phase", choices=["sweep", "final"])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", default="sst2,boolq")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--lr-layer", default="1e-5,3e-5,1e-4,3e-4,1e-3")
    ap.add_argument("--lr-full", default="1e-6,3e-6,1e-5,3e-5")
    ap.add_argument("--pick", type=Path, help="final: the sweep.json whose best dev lr to use per (task, arm)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--parallel", type=int, default=12)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tasks = args.tasks.split(",")

    if args.phase == "sweep":
        grid = {"dominant": [float(x) for x in args.lr_layer.split(",")], "full": [float(x) for x in args.lr_full.split(",")]}
        jobs = [(t, arm, lr, 0) for t in tasks for arm in ARMS for lr in grid[arm]]
        run_all(args, jobs, args.out, "sweep", {"grid": grid})
        return

    sweep = json.loads(args.pick.read_text())["runs"]
    picked = {}
    for t in tasks:
        for arm in ARMS:
            cands = [r for r in sweep if r["task"] == t and r["arm"] == arm and r.get("val") is not None]
            picked[(t, arm)] = max(cands, key=lambda r: (r["val"], -r["lr"]))["lr"]
    zs = {t: zero_shot(args, t) for t in tasks}
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [(t, arm, picked[(t, arm)], s) for t in tasks for arm in ARMS for s in seeds]
    rows = run_all(args, jobs, args.out, "final",
                   {"picked_lr": {f"{t}/{a}": lr for (t, a), lr in picked.items()}, "zero_shot": zs})

    lines = [f"# SmolLM2-135M: zero-shot vs dominant-layer ZO vs full-model MeZO ({environment().get('gpu', 'CPU')})", "",
             f"Command: `python {shlex.join(sys.argv)}`", "",
             f"{args.steps} steps, batch {args.batch_size}, eps {args.eps}, val every {args.eval_every} steps "
             f"(patch = best val step); lr picked on the dev split by `{args.pick}`; test = {zs[tasks[0]]['n']} held-out rows.", "",
             "| task | arm | layers | lr | test acc (mean ± std) | seeds | zero-shot test | wall s / run | ms / step | peak GPU GiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for t in tasks:
        for arm in ARMS:
            rs = [r for r in rows if r["task"] == t and r["arm"] == arm and r.get("test") is not None]
            if not rs:
                lines.append(f"| {t} | {arm} | | {picked[(t, arm)]:g} | failed | 0 | {zs[t]['test']:.4f} | | | |")
                continue
            m, s = mean_std([r["test"] for r in rs])
            w = statistics.mean(r["wall_s"] for r in rs)
            ms = statistics.mean(r["step_ms"] for r in rs)
            mem = max(r["memory"].get("gpu_allocated_peak_gib", 0) for r in rs)
            lines.append(f"| {t} | {arm} | {rs[0]['layers']} | {picked[(t, arm)]:g} | {m:.4f} ± {s:.4f} | {len(rs)} | "
                         f"{zs[t]['test']:.4f} | {w:.0f} | {ms:.1f} | {mem:.2f} |")
    lines += ["", "Wall time per run includes model load and the val evaluations; runs shared the GPU "
              f"({args.parallel} at a time), so ms/step is under contention."]
    (args.out / "final.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
