"""Which of a results tree's guard halvings came from the guard's old reference (the unperturbed loss l0)?

    python bench/guard_reference_replay.py RES/final [--md FILE]

For each guarded run whose checkpoint recorded the l0 reference ("base_losses"), the guard is replayed on the run's
own losses twice, up to its first halving: with l0 (what the run did) and with l0 + eps^2 c / 2, the reference the
fixed guard measures (the mean of l+ and l-; here from the probe's mean curvature c, not per batch). Only the first
halving is a fair counterfactual: after it the weights, and so the losses, would have been different.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zolite.checkpoint import load_checkpoint  # noqa: E402
from zolite.stepsize import new_guard  # noqa: E402


def first_halvings(root: Path) -> list[dict]:
    rows = []
    for config_file in sorted(root.glob("*/*/*/config.json")):
        run_dir = config_file.parent
        saved = load_checkpoint(run_dir)
        choice = (saved[2].get("lr_choice") or {}) if saved else {}
        config = json.loads(config_file.read_text())
        if not choice.get("base_losses") or not choice.get("probe") or config.get("guard") is False:
            continue
        losses, eps = saved[2]["losses"], config["eps"]
        offset = eps ** 2 * max(choice["probe"]["curvature"], 0.0) / 2
        old = new_guard(config["steps"], choice)   # as the run was guarded: its l0 reference
        old.replay(losses)
        first = old.backoffs[0][0] if old.backoffs else len(losses)
        fixed = new_guard(config["steps"], {"guard_reference": [b + offset for b in choice["base_losses"]]})
        fixed.replay(losses[:first])
        rows.append({"run": str(run_dir.relative_to(root)), "eps": eps, "offset": offset, "steps": len(losses),
                     "l0_first_halving": first if old.backoffs else None,
                     "fixed_halves_there": bool(fixed.backoffs)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path)
    ap.add_argument("--md", type=Path)
    args = ap.parse_args()
    lines = ["| run | eps | eps^2 c / 2 | steps run | first halving with l0 | the fixed reference halves by then |",
             "|---|---|---|---|---|---|"]
    for r in first_halvings(args.root):
        first = r["l0_first_halving"]
        lines.append(f"| {r['run']} | {r['eps']:g} | {r['offset']:.3f} | {r['steps']} | {first or '-'} | "
                     f"{'-' if first is None else ('yes' if r['fixed_halves_there'] else 'no')} |")
    text = "\n".join(lines) + "\n"
    if args.md:
        args.md.write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
