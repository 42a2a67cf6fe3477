"""Zero-shot vs dominant-layer ZO vs full-model MeZO on the real SmolLM2-135M (issue 4's evidence).

For each task and arm (dominant layer / all layers), in one invocation:
  1. seed 0 at every lr of the arm's grid; the lr with the best dev (val) accuracy is picked;
  2. the other seeds at the picked lr.
Every run also scores the held-out test split, but only val decides; the table reports test accuracy of the picked
lr over all seeds, next to zero-shot test accuracy on the same rows.

    python bench/tune_smollm2.py --out OUT --tasks sst2 --steps 1000 --lr-layer 3e-4,1e-3 --lr-full 1e-5,3e-5
    python bench/tune_smollm2.py --out OUT --tasks sst2 --arms L0,L11,L29,full ...   # single layers by index

Results: OUT/results.json and OUT/results.md, rewritten as runs finish (a cut-off call keeps what finished).
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ARMS = {"dominant": None, "full": "all"}   # None: the profile's dominant layer; "L<n>": layer n alone


def arm_layer(args, arm):
    arm = arm.removesuffix(args.label) if args.label else arm
    if arm.startswith("L"):
        return arm[1:]
    return args.layer if arm == "dominant" else ARMS[arm]


def data_args(args):
    return ["--data", args.data] if args.data else []


def environment() -> dict:
    import torch
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def run_tune(args, task, arm, lr, seed) -> dict:
    run_dir = args.runs_dir / f"{task}-{arm}-lr{lr:g}-s{seed}"
    cmd = [sys.executable, "-m", "zolite.cli", "tune", "--model", args.model, "--task", task, "--steps", str(args.steps),
           "--lr", str(lr), "--eps", str(args.eps), "--batch-size", str(args.batch_size),
           "--eval-every", str(args.eval_every), "--seed", str(seed), "--run-dir", str(run_dir), "--force",
           "--json", "--quiet", "--test", *data_args(args)]
    layer = arm_layer(args, arm)
    if layer is not None:
        cmd += ["--layer", layer]
    if args.mode:
        cmd += ["--mode", args.mode]
    if args.int8_threshold is not None:
        cmd += ["--int8-threshold", str(args.int8_threshold)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    wall = time.perf_counter() - t0
    row = {"task": task, "arm": arm, "lr": lr, "seed": seed, "wall_s": round(wall, 1), "command": shlex.join(cmd[1:])}
    if proc.returncode != 0:
        row["error"] = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        return row
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    report = json.loads((run_dir / "report.json").read_text())
    row.update(val=summary["val_score"], test=summary.get("test_score"), layers=summary["layers"],
               kept_step=summary["kept_step"], step_ms=summary["timing"]["step_ms"], memory=summary["memory"],
               val_curve=report["val_curve"], loss_first=report["loss_curve"][:50], loss_last=report["loss_curve"][-50:],
               loss_by_25=[round(statistics.mean(report["loss_curve"][i:i + 25]), 5)
                           for i in range(0, len(report["loss_curve"]), 25)])
    return row


def zero_shot(args, task) -> dict:
    cmd = [sys.executable, "-m", "zolite.cli", "eval", "--model", args.model, "--task", task, "--json", *data_args(args)]
    result = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    return {"task": task, "test": result["zero_shot"]["score"], "n": result["rows"], "command": shlex.join(cmd[1:])}


def flag(row, name):
    """A tune option of a run, read back from its command (merged --previous runs may differ)."""
    words = row["command"].split()
    return words[words.index(name) + 1] if name in words else "?"


def mean_std(xs):
    return (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


class Results:
    """All runs so far, rewritten to OUT/results.{json,md} after each one."""

    def __init__(self, args):
        self.args, self.runs, self.zero_shot, self.picked = args, [], {}, {}
        self.meta = {"argv": shlex.join(sys.argv), "env": environment()}

    def add(self, row):
        self.runs.append(row)
        print(f"{row['task']} {row['arm']} lr={row['lr']:g} seed={row['seed']}: val={row.get('val')} "
              f"test={row.get('test')} {row['wall_s']}s {row.get('error', '')}", flush=True)
        self.write()

    def write(self):
        out = self.args.out
        (out / "results.json").write_text(json.dumps({**self.meta, "zero_shot": self.zero_shot,
                                                      "picked_lr": {f"{t}/{a}": lr for (t, a), lr in self.picked.items()},
                                                      "runs": self.runs}, indent=1))
        (out / "results.md").write_text(self.table())

    def table(self) -> str:
        a = self.args
        lines = [f"# SmolLM2-135M: zero-shot vs dominant-layer ZO vs full-model MeZO ({self.meta['env'].get('gpu', 'CPU')})",
                 "", f"Command: `python {self.meta['argv']}`", "",
                 f"Score: accuracy (F1 for squad). Batch {a.batch_size}, eps {a.eps}; val every N steps (the patch keeps the best val step); lr picked by "
                 "seed 0's val accuracy; test = held-out rows, never used for a choice.", "",
                 "| task | arm | layers | steps | val every | lr | test score (mean ± std) | seeds | val acc (mean) | zero-shot test | wall s / run | ms / step | peak GPU GiB |",
                 "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for (task, arm), lr in self.picked.items():
            rs = [r for r in self.runs if (r["task"], r["arm"], r["lr"]) == (task, arm, lr) and r.get("test") is not None]
            if not rs:
                continue
            m, s = mean_std([r["test"] for r in rs])
            zs = self.zero_shot.get(task, {}).get("test")
            lines.append(f"| {task} | {arm} | {rs[0]['layers']} | {flag(rs[0], '--steps')} | {flag(rs[0], '--eval-every')} | {lr:g} | {m:.4f} ± {s:.4f} | {len(rs)} | "
                         f"{statistics.mean(r['val'] for r in rs):.4f} | {zs if zs is None else f'{zs:.4f}'} | "
                         f"{statistics.mean(r['wall_s'] for r in rs):.0f} | {statistics.mean(r['step_ms'] for r in rs):.1f} | "
                         f"{max(r['memory'].get('gpu_allocated_peak_gib', 0) for r in rs):.2f} |")
        lines += ["", "Every (arm, lr) cell with the seeds it has (test score):", "",
                  "| task | arm | lr | test (mean ± std) | seeds | picked |", "|---|---|---|---|---|---|"]
        cells = {}
        for r in self.runs:
            if r.get("test") is not None:
                cells.setdefault((r["task"], r["arm"], r["lr"]), []).append(r["test"])
        for (task, arm, lr), tests in cells.items():
            m, s = mean_std(tests)
            lines.append(f"| {task} | {arm} | {lr:g} | {m:.4f} ± {s:.4f} | {len(tests)} | "
                         f"{'yes' if self.picked.get((task, arm)) == lr else ''} |")
        lines += ["", "lr grid (first seed, val accuracy):", ""]
        for r in self.runs:
            if r["seed"] == int(a.seeds.split(",")[0]):
                lines.append(f"- {r['task']} {r['arm']} lr {r['lr']:g}: val {r.get('val')}, test {r.get('test')}")
        shared = ("as many runs shared the GPU as their own commands' --parallel said (merged with --tabulate-only)"
                  if a.tabulate_only else f"{a.parallel} runs shared the GPU at a time")
        lines += ["", f"Wall time per run includes model load and the val/test scoring; {shared}."]
        return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--runs-dir", type=Path, help="where the run folders go (default OUT/runs)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", default="sst2,boolq")
    ap.add_argument("--arms", default="dominant,full")
    ap.add_argument("--layer", help="the dominant arm's layer (default: the profile's)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--lr-layer", default="3e-4,1e-3")
    ap.add_argument("--lr-full", default="1e-5,3e-5")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--previous", type=Path, action="append", default=[],
                    help="an earlier results.json: its runs are kept and not run again (repeatable)")
    ap.add_argument("--rename-arm", action="append", default=[],
                    help="OLD=NEW: relabel an arm of the --previous runs (e.g. dominant=L12)")
    ap.add_argument("--tabulate-only", action="store_true",
                    help="run nothing: merge the --previous runs of the --tasks x --arms cells into OUT's table "
                         "(the GPU named is the first --previous's)")
    ap.add_argument("--data", help="passed to zolite as --data (tasks without a bundled sample)")
    ap.add_argument("--mode", help="passed to zolite as --mode (fp16 / int8 / nf4 / offload); arms are labelled ARM-MODE")
    ap.add_argument("--int8-threshold", type=float, help="passed to zolite (with --mode int8); arms are labelled ARM-int8-tT (and ARM-...-epsE for an eps other than 1e-3)")
    args = ap.parse_args()
    args.label = "".join([f"-{args.mode}" if args.mode else "",
                          f"-t{args.int8_threshold:g}" if args.int8_threshold is not None else "",
                          f"-eps{args.eps:g}" if args.eps != 1e-3 else ""])
    args.out.mkdir(parents=True, exist_ok=True)
    args.runs_dir = args.runs_dir or args.out / "runs"
    grid = {"dominant": [float(x) for x in args.lr_layer.split(",")], "full": [float(x) for x in args.lr_full.split(",")]}
    grid.update({arm: grid["dominant"] for arm in args.arms.split(",") if arm.startswith("L")})
    if args.label:   # label the arms with the mode, so runs of several modes merge into one table (--previous)
        args.arms = ",".join(f"{a}{args.label}" for a in args.arms.split(","))
        grid.update({a: grid[a.removesuffix(args.label)] for a in args.arms.split(",")})
    cells = [(t, arm) for t in args.tasks.split(",") for arm in args.arms.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    results = Results(args)
    rename = dict(r.split("=", 1) for r in args.rename_arm)
    results.meta["previous"] = []
    for path in args.previous:
        previous = json.loads(path.read_text())
        results.runs += [{**r, "arm": rename.get(r["arm"], r["arm"])} for r in previous["runs"] if "error" not in r]
        results.zero_shot.update(previous["zero_shot"])
        results.meta["previous"].append({"file": str(path), "argv": previous["argv"], "renamed": rename})
    if args.tabulate_only:   # the runs were made where the first --previous was, not here; only the asked cells
        results.meta["env"] = json.loads(args.previous[0].read_text())["env"]
        results.runs = [r for r in results.runs if (r["task"], r["arm"]) in cells]
    for t in args.tasks.split(","):
        if t not in results.zero_shot:
            results.zero_shot[t] = zero_shot(args, t)
    results.write()
    done = {(r["task"], r["arm"], r["lr"], r["seed"]) for r in results.runs}

    def run(job):
        if job in done:
            return
        if args.tabulate_only:
            print(f"not run (--tabulate-only): {job}", flush=True)
            return
        results.add(run_tune(args, *job))

    with ThreadPoolExecutor(args.parallel) as pool:
        list(pool.map(run, [(t, arm, lr, seeds[0]) for t, arm in cells for lr in grid[arm]]))
        # every (task, arm) with first-seed runs, the --previous ones included, so merged tables stay whole
        for t, arm in dict.fromkeys((r["task"], r["arm"]) for r in results.runs):
            first = [r for r in results.runs if (r["task"], r["arm"], r["seed"]) == (t, arm, seeds[0])
                     and r.get("val") is not None]
            if first:
                results.picked[(t, arm)] = max(first, key=lambda r: (r["val"], -r["lr"]))["lr"]
        results.write()
        list(pool.map(run, [(t, arm, results.picked[(t, arm)], s) for t, arm in cells if (t, arm) in results.picked
                            for s in seeds[1:]]))
    print(results.table())


if __name__ == "__main__":
    main()
