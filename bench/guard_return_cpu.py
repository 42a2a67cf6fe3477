"""Variants of the guard side by side on the same run (same model, task, lr, seed).

    python bench/guard_return_cpu.py --out DIR [--variants return,halve] -- --model smollm2-135m --task sst2 ...

Runs `zolite tune` with the remaining options once per variant, in one process each, at once:
- `return`: as zolite runs it (the guard halves and goes back);
- `halve`: with the return switched off (the guard only halves, as before 2026-12-06's fourth session);
- `l0`: as zolite runs it, but with the guard's reference at the base measured as the unperturbed loss l0 (as before
  the fifth session) instead of the run's own loss, the mean of l+ and l- (--lr auto runs: it patches the probe).
Writes each run's report (DIR/VARIANT.report.json) and a table of their val curves, backoffs and test scores
(DIR/results.md).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
from pathlib import Path


def _run(variant: str, out: str, options: list[str]) -> None:
    import importlib

    import torch

    torch.set_num_threads(1)
    tune_module = importlib.import_module("zolite.tune")   # (the package's `zolite.tune` is the function)
    from zolite.cli import main

    if variant == "halve":
        tune_module.guard_returns = lambda run: False
    if variant == "l0":
        tune_module.probe_lr = _with_l0_reference(tune_module.probe_lr)
    try:
        main(["tune", *options, "--run-dir", f"{out}/{variant}", "--quiet"], standalone_mode=False)
    finally:
        report = Path(out, variant, "report.json")
        if report.exists():
            Path(out, f"{variant}.report.json").write_text(report.read_text())


def _with_l0_reference(probe_lr):
    """The probe, with its guard reference replaced by the unperturbed losses it measured (its eps-0 forwards)."""
    def probe(pair_losses, batches, run_seed, eps):
        l0 = []

        def recording(examples, seed, at_eps):
            out = pair_losses(examples, seed, at_eps)
            if at_eps == 0.0:
                l0.append(out[0])
            return out
        result = probe_lr(recording, batches, run_seed, eps)
        result.reference = l0
        return result
    return probe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--variants", default="return,halve", help="comma-separated: return, halve, l0")
    ap.add_argument("options", nargs=argparse.REMAINDER, help="zolite tune's options, after --")
    args = ap.parse_args()
    options = [o for o in args.options if o != "--"]
    args.out.mkdir(parents=True, exist_ok=True)
    context = multiprocessing.get_context("spawn")
    variants = args.variants.split(",")
    lr = options[options.index("--lr") + 1] if "--lr" in options[:-1] else None
    if "l0" in variants and lr != "auto":   # a given lr, or a profile's, skips the probe the variant patches
        sys.exit("guard_return_cpu.py: the l0 variant patches the lr probe: give --lr auto (or leave l0 out)")
    procs = [context.Process(target=_run, args=(v, str(args.out), options)) for v in variants]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    lines = [f"# The guard's variants, side by side: `zolite tune {' '.join(options)}`", "",
             "| guard | lr | halved at | went back (step -> kept step) | val: base -> best (step) -> last | test |",
             "|---|---|---|---|---|---|"]
    for variant in variants:
        path = args.out / f"{variant}.report.json"
        if not path.exists():
            lines.append(f"| {variant} | (no report) | | | | |")
            continue
        r = json.loads(path.read_text())
        val, lr = r["val_curve"], r["lr"]
        best = max(val, key=lambda v: v[1])
        test = (r["final"].get("test") or {}).get("score")
        lines.append(f"| {variant} | {lr['lr']:.3g} | {', '.join(str(b[0]) for b in lr['backoffs'] or []) or '-'} | "
                     f"{', '.join(f'{n} -> {k}' for n, k in lr.get('returned') or []) or '-'} | "
                     f"{val[0][1]:.3f} -> {best[1]:.3f} ({best[0]}) -> {val[-1][1]:.3f} | "
                     f"{'-' if test is None else f'{test:.3f}'} |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    sys.exit(0 if all(p.exitcode == 0 for p in procs) else 1)


if __name__ == "__main__":
    main()
