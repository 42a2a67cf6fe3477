"""What a read-out of the frozen base's hidden states can reach on a two-answer task, and what ZO on the final norm
reaches of it. Works on the states `bench/probe_features.py` saved (CPU, seconds).

1. Zero-shot from the saved states (checks them: the same margin zolite scores).
2. A logistic probe on each layer's state at the answer position (weights and bias, L2 chosen on val): the most any
   linear read-out of that layer can do. A row's `layer` indexes transformers' hidden states: 0 is the embeddings,
   k the output of decoder layer k-1 (0-based), the last one the final norm's output.
3. The final norm's weights alone, trained with exact gradients (L2 toward the base's, chosen on val): with a single
   token per answer the margin is d . (g * r) (d = head[yes] - head[no], r the normalized state), so tuning g is a
   linear probe on r without a bias, started at the base.
4. The same weights tuned by ZO exactly as zolite's plain MeZO step would (SPSA with one z, SGD, cross-entropy over
   the two answers, batch 16, the best val kept), replayed from the saved states: a ZO recipe's ceiling on them;
   with --activation-scaled, z scaled as `--eps-scale activation` scales a norm weight's.

    python bench/probe_ceiling.py --features OUT/features.pt --out OUT
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from calibration_ceiling import accuracy_at, auc   # bench/, beside this script
from zolite.precondition import activation_scales


def accuracy(margin: torch.Tensor, label: torch.Tensor) -> float:
    return accuracy_at(margin, label, 0.0)


def fit_logistic(x, y, l2: float, anchor=None, bias: bool = True, iters: int = 200):
    """Minimise mean logistic loss + l2 * |w - anchor|^2 with L-BFGS; returns (w, b)."""
    anchor = torch.zeros(x.shape[1]) if anchor is None else anchor
    w = anchor.clone().requires_grad_(True)
    b = torch.zeros((), requires_grad=bias)
    opt = torch.optim.LBFGS([w, b] if bias else [w], max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ w + b, y.float()) + l2 * (w - anchor).pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def layer_probes(data, l2_grid) -> list[dict]:
    """A logistic probe per layer, features standardised on train, L2 chosen on val."""
    rows = []
    for layer in range(data["train"]["layers"].shape[1]):
        xs = {s: data[s]["layers"][:, layer].float() for s in ("train", "val", "test")}
        mu, sd = xs["train"].mean(0), xs["train"].std(0) + 1e-6
        xs = {s: (x - mu) / sd for s, x in xs.items()}
        best = None
        for l2 in l2_grid:
            w, b = fit_logistic(xs["train"], data["train"]["label"], l2)
            val = accuracy(xs["val"] @ w + b, data["val"]["label"])
            if best is None or val > best[0]:
                best = (val, l2, w, b)
        val, l2, w, b = best
        m = xs["test"] @ w + b
        rows.append({"layer": layer, "l2": l2, "val": val, "test": accuracy(m, data["test"]["label"]),
                     "test_auc": auc(m, data["test"]["label"]),
                     "train": accuracy(xs["train"] @ w + b, data["train"]["label"])})
        print(f"hidden state {layer:2d}: l2 {l2:g} train {rows[-1]['train']:.3f} val {val:.3f} "
              f"test {rows[-1]['test']:.3f}", flush=True)
    return rows


def zo_replay(r_train, y_train, r_val, y_val, r_test, y_test, d, g0, *, lr, eps, steps, batch, seed, every=100,
              scale=None):
    """Plain MeZO on the final norm's weights g: z ~ N(0, I) from the step's seed, one SPSA estimate, SGD; with
    `scale`, z is scaled channel by channel (zolite's --eps-scale activation) in the perturbation and the update."""
    gen = torch.Generator().manual_seed(seed)
    g, best = g0.clone(), None
    xt, xv, xs = r_train * d, r_val * d, r_test * d           # margin = x @ g

    def ce(margin, y):
        return F.binary_cross_entropy_with_logits(margin, y.float())

    curve = []
    for step in range(steps + 1):
        if step % every == 0:
            val = accuracy(xv @ g, y_val)
            curve.append((step, val))
            if best is None or val > best[0]:
                best = (val, step, accuracy(xs @ g, y_test))
        if step == steps:
            break
        idx = torch.randint(len(y_train), (batch,), generator=gen)
        z = torch.randn(g.shape, generator=gen) * (1.0 if scale is None else scale)
        plus, minus = ce(xt[idx] @ (g + eps * z), y_train[idx]), ce(xt[idx] @ (g - eps * z), y_train[idx])
        g = g - lr * (plus - minus) / (2 * eps) * z
    return {"best_val": best[0], "best_step": best[1], "test_at_best": best[2], "last_val": curve[-1][1],
            "last_test": accuracy(xs @ g, y_test), "curve": curve}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", required=True)
    ap.add_argument("--out", required=True, help="folder for ceiling.json")
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--lrs", default="1e-4,3e-4,1e-3,3e-3,1e-2")
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--activation-scaled", action="store_true",
                    help="replay ZO with --eps-scale activation's z (scaled by the normed state's channel energy)")
    args = ap.parse_args()
    if not Path(args.features).is_file():
        raise SystemExit(f"probe_ceiling.py: no file {args.features}; make it with bench/probe_features.py --out DIR "
                         "and pass DIR/features.pt")
    data = torch.load(args.features)
    if not all(data[s].get("single_token", True) for s in ("train", "val", "test")):
        raise SystemExit("probe_ceiling.py: an answer here is more than one token, so the margin is not one read-out "
                         "of the state; use a model whose tokenizer gives each answer one token")
    no, yes = (int(t) for t in data["train"]["answers"][0])
    d = data["head_rows"][yes] - data["head_rows"][no]
    g0, norm_eps = data["final_norm"]["weight"], data["final_norm"]["eps"]

    def normed(split):   # the final norm without its weight: RMSNorm's r
        pre = data[split]["pre_norm"]
        return pre * torch.rsqrt(pre.pow(2).mean(-1, keepdim=True) + norm_eps)

    r = {s: normed(s) for s in ("train", "val", "test")}
    y = {s: data[s]["label"] for s in ("train", "val", "test")}
    result = {"zero_shot": {s: accuracy((r[s] * g0) @ d, y[s]) for s in r},
              "zero_shot_auc": {s: auc((r[s] * g0) @ d, y[s]) for s in r},
              "share_yes": {s: y[s].float().mean().item() for s in r}}
    print(json.dumps(result), flush=True)

    result["layer_probes"] = layer_probes(data, [1e-4, 1e-3, 1e-2, 1e-1, 1.0])

    best = None   # the final norm alone, exact gradients, pulled toward the base's weights
    for l2 in [0.0, 1e-5, 1e-4, 1e-3, 1e-2]:
        g, _ = fit_logistic(r["train"] * d, y["train"], l2, anchor=g0, bias=False)
        val = accuracy((r["val"] * d) @ g, y["val"])
        if best is None or val > best["val"]:
            best = {"l2": l2, "val": val, "test": accuracy((r["test"] * d) @ g, y["test"]),
                    "train": accuracy((r["train"] * d) @ g, y["train"]),
                    "test_auc": auc((r["test"] * d) @ g, y["test"])}
    result["final_norm_exact"] = best
    print("final norm, exact:", best, flush=True)

    scale = None
    if args.activation_scaled:   # zolite's own formula, from the train rows' normed states
        scale = activation_scales({"g": r["train"].pow(2).mean(0)}, vectors=frozenset({"g"}))["g"]
    result["final_norm_zo"] = []
    for lr in (float(v) for v in args.lrs.split(",")):
        runs = [zo_replay(r["train"], y["train"], r["val"], y["val"], r["test"], y["test"], d, g0, lr=lr,
                          eps=args.eps, steps=args.steps, batch=16, seed=s, scale=scale) for s in range(args.seeds)]
        tests = torch.tensor([x["test_at_best"] for x in runs])
        row = {"lr": lr, "eps": args.eps, "steps": args.steps, "activation_scaled": args.activation_scaled,
               "best_val": [x["best_val"] for x in runs], "test_at_best": tests.tolist(),
               "test_mean": tests.mean().item(), "test_std": tests.std().item() if len(runs) > 1 else 0.0,
               "last_test": [x["last_test"] for x in runs], "curves": [x["curve"] for x in runs]}
        result["final_norm_zo"].append(row)
        print(f"ZO lr {lr:g}: val {row['best_val']} test {row['test_mean']:.3f} ± {row['test_std']:.3f} "
              f"last {row['last_test']}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ceiling.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
