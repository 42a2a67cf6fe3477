"""The step-size probe (zolite.stepsize) on a real model: the lr it picks per layer and perturbation scale, next to
the numbers behind it (curvature along z, the slope's signal per unit curvature).

    python bench/lr_probe.py --model smollm2-135m --task sst2 --layers 11 --eps-scale absolute,activation \
        --data ../shared/data --out bench/results/lr_probe/smollm2-sst2.json

One model load per layer (quantized modes keep only the probed layer unquantized).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def probe(model, task, layer, eps_scale, data, mode, dtype, batch_size, seed, eps):
    from zolite.precondition import measure_scales, scale_summary
    from zolite.stepsize import PROBES, probe_lr
    from train_rows import load_with_train_rows, loss_stepper
    from zolite.tune import probe_batch
    from zolite.tune_setup import TuneConfig
    from zolite.zo import TunedLayers

    config = TuneConfig(model=model, task=task, layer=str(layer), mode=mode, dtype=dtype, batch_size=batch_size,
                        seed=seed, eps=eps, data=data, eps_scale=eps_scale[0], lr="auto")
    loaded, indices, config, train = load_with_train_rows(config)
    device = loaded.device

    def batch(k):
        return probe_batch(train, config, k)
    rows = []
    for scale in eps_scale:
        tuned = TunedLayers(loaded.model, indices, scale)
        if scale == "activation":
            tuned.set_scales(measure_scales(loaded.model, tuned, train, 2 * config.batch_size, device))
        stepper = loss_stepper(loaded, tuned, config)
        t0 = time.perf_counter()
        p = probe_lr(stepper.pair_losses, [(batch(2 * k), batch(2 * k + 1)) for k in range(PROBES)], seed,
                     config.eps).as_dict()
        rows.append({"layer": layer, "eps_scale": scale, "tuned_params": tuned.numel(), "lr": p["lr"],
                     "curvature": p["curvature"], "curvature_se": p["curvature_se"],
                     # the slope two batches agree on, per unit curvature: how fast ZO can learn here, per step
                     "signal_per_curvature": p["signal"] / p["used_curvature"],
                     "probe": p, "probe_s": round(time.perf_counter() - t0, 2),
                     "scales": scale_summary(tuned.scale_tensors()) if scale == "activation" else None})
        print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("probe", "scales")}), flush=True)
    del loaded
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--layers", default="11", help="comma-separated, 0-based")
    ap.add_argument("--eps-scale", default="absolute,activation")
    ap.add_argument("--data")
    ap.add_argument("--mode")
    ap.add_argument("--dtype")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows = []
    for layer in [int(x) for x in args.layers.split(",")]:
        for seed in [int(x) for x in args.seeds.split(",")]:
            for row in probe(args.model, args.task, layer, args.eps_scale.split(","), args.data, args.mode,
                             args.dtype, args.batch_size, seed, args.eps):
                rows.append({**row, "seed": seed})
    info = {"command": "python bench/lr_probe.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    main()
