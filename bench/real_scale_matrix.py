"""Issue 22's evidence matrix on Qwen2.5-Coder-1.5B, from a results tree (a device session's res.tgz unpacked, its
`final/` folder): for each task, zero-shot, the task's recipe, plain MeZO, full-model MeZO and backprop, in nf4 and
fp16. A cell is the test mean ± std over the arm's finished seeds, and how many seeds are done, cut off or missing.
A second table gives each cell's peak GPU memory and mean training time per step.

    python bench/real_scale_matrix.py RESULTS/final [--md MATRIX.md]

Which arm folder fills which cell is written out below (ROWS): the folders are the ablation plans' arms
(bench/plans/real_scale_final.toml, real_scale_candidates.toml) as bench/real_scale_dev.sh lays them out.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from runs_table import run_row  # noqa: E402

TASKS = ("sst2", "rte", "boolq")
SEEDS = 3
# (row, mode, {task: run-folder prefix under final/}); a task left out has no such row (its cell reads "-")
ROWS = [
    ("zolite's defaults: layer 1, probed lr, eps 1e-2, guard", "nf4",
     {"sst2": "sst2/zolite/", "rte": "rte/zolite/", "boolq": "boolq/zolite/"}),
    ("the task's recipe (profile: SST-2 layer 27; RTE eps 1e-3, no guard; BoolQ every bias and norm, "
     "activation-scaled z, lr 3e-3)", "nf4",
     {"sst2": "sst2-candidates/layer27/", "rte": "rte/mezo/", "boolq": "boolq-late/bitfit-nf4-act/lr0.003-"}),
    ("BoolQ's earlier recipe: the same weights, unscaled z, lr 1e-3", "nf4",
     {"boolq": "boolq-candidates/bitfit-nf4/"}),
    ("plain MeZO on layer 1 (eps 1e-3, no guard, probed lr)", "nf4",
     {"sst2": "sst2/mezo/", "rte": "rte/mezo/", "boolq": "boolq/mezo/"}),
    ("plain MeZO on the recipe's weights", "nf4",
     {"sst2": "sst2-layer27-refs/layer27-mezo/", "rte": "rte/mezo/", "boolq": "boolq-candidates/bitfit-nf4-mezo/"}),
    ("full-model MeZO (eps 1e-3, no guard, probed lr)", "fp16",
     {"sst2": "sst2/mezo-full/", "rte": "rte/mezo-full/", "boolq": "boolq/mezo-full/"}),
    ("backprop into layer 1 (AdamW 1e-4, 500 steps)", "nf4",
     {"sst2": "sst2/backprop/", "rte": "rte/backprop/", "boolq": "boolq/backprop/"}),
    ("backprop into the recipe's weights", "nf4",
     {"sst2": "sst2-layer27-refs/layer27-backprop/", "rte": "rte/backprop/", "boolq": "boolq-candidates/bitfit-nf4-backprop/"}),
    ("the task's recipe (BoolQ: the earlier one)", "fp16",
     {"sst2": "sst2-fp16/layer27-fp16/", "rte": "rte-fp16/eps1e-3-noguard-fp16/",
      "boolq": "boolq-candidates/bitfit-lr/lr0.001-"}),
]


def cell(runs: list[dict]) -> dict:
    done = [r for r in runs if r.get("status") == "done" and r.get("test") is not None]
    cut = [r for r in runs if r.get("status") == "cut off"]
    return {"tests": [r["test"] for r in done], "cut_off_at": sorted(r["steps"] for r in cut),
            "peak_gib": max((r["peak_gib"] or 0 for r in done), default=None) or None,
            "ms_per_step": 1000 * statistics.fmean(r["train_s"] / r["steps"] for r in done) if done else None}


def accuracy_text(c: dict | None) -> str:
    if c is None:
        return "-"
    parts = []
    if c["tests"]:
        spread = f" ± {statistics.stdev(c['tests']):.3f}" if len(c["tests"]) > 1 else ""
        parts.append(f"{statistics.fmean(c['tests']):.3f}{spread} ({len(c['tests'])} of {SEEDS})")
    if c["cut_off_at"]:
        parts.append(f"{len(c['cut_off_at'])} cut off at step {'/'.join(map(str, c['cut_off_at']))}")
    return "; ".join(parts) or "not run"


def matrix(final: Path) -> str:
    runs = [run_row(c.parent, final) for c in sorted(final.rglob("config.json"))]
    zero = {}
    for f in final.glob("zero-shot-*-*.json"):
        _, _, task, mode = f.stem.split("-", 3)
        zero[(task, mode)] = json.loads(f.read_text())["zero_shot"]["score"]
    out = [{"row": "zero-shot", "mode": m, **{t: zero.get((t, m)) for t in TASKS}} for m in ("nf4", "fp16")]
    for name, mode, prefixes in ROWS:
        out.append({"row": name, "mode": mode, **{t: cell([r for r in runs if r["run"].startswith(p)])
                                                  for t, p in prefixes.items()}})
    head = "| | mode | " + " | ".join(TASKS) + " |\n|---|---|" + "---|" * len(TASKS) + "\n"
    acc, cost = [head], [head]
    for r in out:
        if r["row"] == "zero-shot":
            acc.append(f"| zero-shot | {r['mode']} | " + " | ".join(
                f"{r[t]:.3f}" if r[t] is not None else "-" for t in TASKS) + " |\n")
            continue
        acc.append(f"| {r['row']} | {r['mode']} | " + " | ".join(accuracy_text(r.get(t)) for t in TASKS) + " |\n")
        cost.append(f"| {r['row']} | {r['mode']} | " + " | ".join(
            f"{r[t]['peak_gib']:.2f} GiB, {r[t]['ms_per_step']:.0f} ms" if r.get(t) and r[t]["peak_gib"] else "-"
            for t in TASKS) + " |\n")
    return ("Test accuracy, mean ± std over the finished seeds:\n\n" + "".join(acc) +
            "\nPeak GPU memory (allocated) and training time per step of the finished runs (mean); the device runs "
            "shared one GPU, so the times are not speeds:\n\n" + "".join(cost))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("final", type=Path, help="the results tree's final/ folder")
    parser.add_argument("--md", type=Path, help="write the tables here (else print them)")
    args = parser.parse_args()
    if not args.final.is_dir():
        sys.exit(f"error: {args.final} is not a folder; give the final/ folder of an unpacked res.tgz")
    text = matrix(args.final)
    if args.md:
        args.md.write_text(text)
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
