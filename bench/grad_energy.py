"""Where in a tuned layer ZO can learn fastest: the backprop gradient of the task loss, per tensor and per group
(attention / MLP matrices, norms, biases), averaged over a few training batches.

Why: a two-point (SPSA) step over d weights has E||g_hat||^2 ~ (d + 2) ||g||^2, so at its best step size (isotropic
curvature L) one step lowers the loss by ~ ||g||^2 / (2 L (d + 2)). Per step, a subset S of the layer is worth
||g_S||^2 / (d_S + 2): the gradient energy per perturbed weight. "consistent" is ||mean g||^2 over the batches'
mean ||g||^2: near 1, the batches agree; near 1/batches, the direction is minibatch noise.

    python bench/grad_energy.py --model smollm2-135m --task sst2 --layer 11 --data ../shared/data \
        --batches 4 --out bench/results/grad_energy/smollm2-sst2-L11.json
    python bench/grad_energy.py ... --layer all --params bias,layernorm   # every layer's biases and norms (BitFit)

Per-weight rates (`per_weight`) are absolute: runs on the same batches (model, task, --batch-size, --batches,
--seed) compare, e.g. layer 1 against every layer's biases and norms.
"""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

GROUPS = {   # the first pattern a tensor's name matches names its group
    "norms": r"norm",
    "biases": r"\.bias$",
    "attention": r"(self_attn|attention)\.",
    "mlp": r"mlp\.",
}


def group_of(name: str) -> str:
    return next((g for g, pattern in GROUPS.items() if re.search(pattern, name)), "other")


def measure(model, task, layer, data, mode, dtype, batch_size, batches, seed, params=None):
    from zolite.optim import fo_gradients
    from zolite.scoring import candidate_scores, collate, last_hidden, losses, pad_token_id
    from train_rows import load_with_train_rows
    from zolite.data import batches_for_step
    from zolite.tune_setup import TuneConfig
    from zolite.zo import TunedLayers

    config = TuneConfig(model=model, task=task, layer=str(layer), mode=mode, dtype=dtype, batch_size=batch_size,
                        seed=seed, data=data, lr="auto")
    loaded, indices, config, train = load_with_train_rows(config)
    pad, device = pad_token_id(loaded.tokenizer), loaded.device
    tuned = TunedLayers(loaded.model, indices, params=params)

    total = [torch.zeros(p.shape, device=device) for p in tuned.params]
    sq_norms = [0.0] * len(tuned.params)
    t0 = time.perf_counter()
    batch_losses = []
    for k in range(batches):
        batch = collate([train[i] for i in batches_for_step(len(train), config.batch_size, k, seed)], pad).to(device)

        def loss():
            hidden = last_hidden(loaded.model, batch.input_ids)
            return losses(candidate_scores(loaded.model, batch, hidden), batch, "ce")[0]
        value, grads = fo_gradients(loaded.model, tuned, loss)
        batch_losses.append(value)
        for i, g in enumerate(grads):
            total[i].add_(g)
            sq_norms[i] += g.pow(2).sum().item()
        print(f"batch {k}: loss {value:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    rows = []
    for name, p, g, sq in zip(tuned.names, tuned.params, total, sq_norms):
        mean_sq = g.div(batches).pow(2).sum().item()
        energy = g.div(batches).pow(2)
        concentration = {}
        if energy.dim() == 2:   # the share of the energy in the top 1% of output rows / input columns
            for axis, label in ((1, "top1pct_rows"), (0, "top1pct_cols")):
                lines = energy.sum(axis).sort(descending=True).values
                concentration[label] = (lines[:max(1, len(lines) // 100)].sum() / lines.sum()).item()
        rows.append({"name": name, "group": group_of(name), "numel": p.numel(), "mean_grad_sq": mean_sq,
                     **concentration,
                     "per_weight": mean_sq / (p.numel() + 2), "consistent": mean_sq / (sq / batches),
                     "weight_rms": p.detach().float().pow(2).mean().sqrt().item()})
    groups = {}
    for g in [*GROUPS, "other", "layer"]:
        members = [r for r in rows if g == "layer" or r["group"] == g]
        if members:
            numel = sum(r["numel"] for r in members)
            energy = sum(r["mean_grad_sq"] for r in members)
            groups[g] = {"numel": numel, "mean_grad_sq": energy, "per_weight": energy / (numel + 2),
                         "share_of_energy": energy / sum(r["mean_grad_sq"] for r in rows)}
    layer_rate = groups["layer"]["per_weight"]
    for g in groups.values():
        g["zo_rate_vs_layer"] = g["per_weight"] / layer_rate
    return {"layer": layer, "batch_losses": batch_losses, "groups": groups, "tensors": rows,
            "seconds": round(time.perf_counter() - t0, 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--layer", default="11", help="a layer, a list (3,5) or all")
    ap.add_argument("--params", help="only the tensors whose name holds one of these parts (bias,layernorm)")
    ap.add_argument("--data")
    ap.add_argument("--mode")
    ap.add_argument("--dtype")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    result = measure(args.model, args.task, args.layer, args.data, args.mode, args.dtype, args.batch_size,
                     args.batches, args.seed, args.params)
    for g, v in result["groups"].items():
        print(f"{g:10s} {v['numel']:>10,d} weights  energy share {v['share_of_energy']:.3f}  "
              f"ZO rate vs whole layer {v['zo_rate_vs_layer']:8.1f}")
    info = {"command": "python bench/grad_energy.py " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, **result}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    main()
