"""The loss's curvature along the probe's random directions, c = (l+ + l- - 2 l0) / eps^2, one value per probe, at
several eps: is the step-size probe's "curvature not clearly above its noise" rounding (it shrinks as eps grows),
higher-order terms (it moves with eps), or the curvature itself, of both signs along different z (it does not)?

    python bench/curvature_spread.py --model smollm2-135m --task sst2 --data ../shared/data --dtype float32 \
        --target all:norm --target 11 --eps 1e-3,1e-2,3e-2 --out bench/results/curvature_spread/smollm2-sst2-cpu.json

--eps-scale activation measures it along the scaled directions a run with that option takes (its scales measured
as the run measures them).

A target is LAYERS[:PARAMS] (--layer and --params of zolite tune). The probes' z and batches are the probe's own
(zolite.stepsize.probe_seed, zolite.tune.probe_batch).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def spread(model, task, data, dtype, target, eps_values, probes, batch_size, seed=0, eps_scale="absolute"):
    from train_rows import load_with_train_rows, loss_stepper
    from zolite.tune import forward_rows, probe_batch
    from zolite.stepsize import probe_seed
    from zolite.precondition import measure_scales
    from zolite.tune_setup import TuneConfig
    from zolite.zo import TunedLayers

    layer, _, params = target.partition(":")
    config = TuneConfig(model=model, task=task, layer=layer, params=params or None, dtype=dtype, data=data,
                        batch_size=batch_size, seed=seed, lr="auto", eps_scale=eps_scale)
    loaded, indices, config, train = load_with_train_rows(config)
    tuned = TunedLayers(loaded.model, indices, eps_scale, params=config.params)
    if eps_scale == "activation":   # on the rows and in the batches a run measures them
        tuned.set_scales(measure_scales(loaded.model, tuned, train, forward_rows(config), loaded.device))
    stepper = loss_stepper(loaded, tuned, config)
    curvature = {eps: [] for eps in eps_values}
    t0 = time.perf_counter()
    for k in range(probes):
        batch = probe_batch(train, config, 2 * k)   # (the probe's batch a of its k-th direction)
        base, _ = stepper.pair_losses(batch, probe_seed(seed, k), 0.0)
        for eps in eps_values:
            plus, minus = stepper.pair_losses(batch, probe_seed(seed, k), eps)
            curvature[eps].append((plus + minus - 2 * base) / eps ** 2)
    rows = []
    for eps, c in curvature.items():
        mean, se = statistics.fmean(c), statistics.stdev(c) / len(c) ** 0.5
        rows.append({"target": target, "eps_scale": eps_scale, "tuned_params": tuned.numel(), "eps": eps,
                     "mean": mean, "se": se, "resolved": mean > 3 * se, "negative": sum(v < 0 for v in c),
                     "median": statistics.median(c), "min": min(c), "max": max(c), "values": c})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "values"}), flush=True)
    print(f"{target}: {probes} probes in {time.perf_counter() - t0:.0f} s", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--data")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--target", action="append", help="LAYERS[:PARAMS]; repeat for more (default: all:norm and 11)")
    ap.add_argument("--eps", default="1e-3,1e-2,3e-2")
    ap.add_argument("--probes", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--eps-scale", default="absolute", choices=["absolute", "activation"])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    eps_values = [float(e) for e in args.eps.split(",")]
    targets = args.target or ["all:norm", "11"]
    rows = [r for t in targets for r in spread(args.model, args.task, args.data, args.dtype, t, eps_values,
                                               args.probes, args.batch_size, eps_scale=args.eps_scale)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "task": args.task, "dtype": args.dtype, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
