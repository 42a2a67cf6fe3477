"""One row per run folder under a results tree, finished or cut off: what it ran, the lr and how it was chosen, the
guard's backoffs, the val curve, the best val and (finished runs) the test score. Reads each run's config.json and
either its report.json (finished) or its seed checkpoint's state (cut off, e.g. by the end of a device session).
Then one row per arm (the folder above the run folders): test mean ± std over its finished seeds, peak GPU memory,
wall time; and the zero-shot scores (`zolite eval --json` outputs named zero-shot-TASK-MODE.json) found in the tree.

    python bench/runs_table.py RESULTS_DIR [--json RUNS.json] [--md RUNS.md]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing

from zolite.checkpoint import load_checkpoint  # noqa: E402
from zolite.stepsize import new_guard  # noqa: E402
from zolite.tune import uses_guard  # noqa: E402
from zolite.tune_setup import TuneConfig  # noqa: E402


def run_row(run_dir: Path, root: Path) -> dict | None:
    config = json.loads((run_dir / "config.json").read_text())
    row = {"run": str(run_dir.relative_to(root)), "task": config["task"], "layer": config["layer"],
           "params": config.get("params"), "mode": config["mode"], "eps": config["eps"],
           "estimator": config["estimator"], "batch_size": config["batch_size"], "steps_planned": config["steps"]}
    report_file = run_dir / "report.json"
    if report_file.is_file():
        report = json.loads(report_file.read_text())
        lr = report["lr"]
        row.update(status="done", steps=report["steps"], lr=lr["lr"], lr_source=lr["source"],
                   probe_note=(lr.get("probe") or {}).get("note"), backoffs=lr.get("backoffs"),
                   returned=lr.get("returned"),
                   val_curve=report["val_curve"], best_val=report["final"]["val"]["score"],
                   kept_step=report["kept_step"], test=(report["final"].get("test") or {}).get("score"),
                   train_s=report["timing"]["train_s"], peak_gib=report["memory"].get("gpu_allocated_peak_gib"))
        return row
    try:
        saved = load_checkpoint(run_dir)
    except Exception as e:   # a dense checkpoint left behind by the collector, or a broken one: say so, go on
        return {**row, "status": f"unreadable checkpoint ({e})"}
    if saved is None:
        return {**row, "status": "no checkpoint here (not started, or a backprop run's dense one left behind)"}
    state = saved[2]
    choice = state.get("lr_choice") or {}
    guard = None
    if uses_guard(TuneConfig(**config)):
        guard = new_guard(config["steps"], choice, state.get("guard_returns", False))
        guard.replay(state["losses"])
    row.update(status="cut off", steps=state["step"], lr=choice.get("lr", config["lr"]),
               lr_source=choice.get("source", "given"), probe_note=(choice.get("probe") or {}).get("note"),
               backoffs=guard.backoffs if guard else None, returned=guard.returned if guard and guard.returns else None,
               val_curve=state["val"], best_val=state["best_metric"],
               kept_step=state["best_step"], test=None, train_s=state.get("train_s"), peak_gib=None)
    return row


def markdown(rows: list[dict]) -> str:
    head = ("| run | lr (how) | steps | backoffs | val: base -> best (step) -> last | test |\n"
            "|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        if "val_curve" not in r:
            lines.append(f"| {r['run']} | | | | {r['status']} | |")
            continue
        curve = r["val_curve"]
        lr = f"{r['lr']:.3g} ({r['lr_source']})" if isinstance(r["lr"], float) else str(r["lr"])
        back = dict(r.get("returned") or [])   # step -> the step whose weights the guard went back to
        backoffs = ", ".join(f"x{f:g} at {s}" + (f" (back to {back[s]})" if s in back else "")
                             for s, f in r["backoffs"] or []) or "-"
        test = f"{r['test']:.3f}" if r["test"] is not None else "-"
        lines.append(f"| {r['run']} | {lr} | {r['steps']} / {r['steps_planned']} ({r['status']}) | {backoffs} | "
                     f"{curve[0][1]:.3f} -> {r['best_val']:.3f} ({r['kept_step']}) -> {curve[-1][1]:.3f} | {test} |")
    return head + "\n".join(lines) + "\n"


def arm_markdown(rows: list[dict], root: Path) -> str:
    """Finished seeds grouped by arm folder and lr (run folders TASK/ARM/lrLR-sSEED; an lr grid's values apart)."""
    arms: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("status") == "done":
            run = Path(r["run"])
            arms.setdefault(f"{run.parent} {run.name.rpartition('-s')[0]}", []).append(r)
    lines = ["| arm | seeds done | test (mean ± std) | val (mean) | lr (mean) | peak GPU GiB | train s (mean) |",
             "|---|---|---|---|---|---|---|"]
    for arm, runs in sorted(arms.items()):
        tests = [r["test"] for r in runs if r["test"] is not None]
        spread = f" ± {statistics.stdev(tests):.3f}" if len(tests) > 1 else ""
        test = f"{statistics.fmean(tests):.3f}{spread}" if tests else "-"
        peak = max((r["peak_gib"] or 0) for r in runs)
        lines.append(f"| {arm} | {len(runs)} | {test} | {statistics.fmean(r['best_val'] for r in runs):.3f} | "
                     f"{statistics.fmean(r['lr'] for r in runs):.3g} | {peak:.2f} | "
                     f"{statistics.fmean(r['train_s'] for r in runs):.0f} |")
    for f in sorted(root.rglob("zero-shot-*.json")):
        score = json.loads(f.read_text())["zero_shot"]
        lines.append(f"| {f.stem} | | {score['score']:.3f} (n = {score['n']}) | | | | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path)
    parser.add_argument("--json", type=Path, help="write every row here (with its val curve)")
    parser.add_argument("--md", type=Path, help="write the table here (else print it)")
    args = parser.parse_args()
    rows = [run_row(c.parent, args.root) for c in sorted(args.root.rglob("config.json"))]
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    table = markdown(rows) + "\n" + arm_markdown(rows, args.root)
    if args.md:
        args.md.write_text(table)
    else:
        print(table, end="")


if __name__ == "__main__":
    main()
