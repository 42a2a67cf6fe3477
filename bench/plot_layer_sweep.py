"""Plot a layer sweep made by bench/tune_smollm2.py (the dominant-layer paper's Fig. 1, on SmolLM2-135M).

    python bench/plot_layer_sweep.py bench/results/layer_sweep/results.json --dominant 11

Writes layers.png beside the results: test score by tuned layer (mean ± std over seeds at each arm's picked lr,
zero-shot and full-model MeZO as lines), val score over steps, and the training loss (means of 25 steps) where
the runs recorded it.
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def picked_runs(results: dict) -> dict[str, list[dict]]:
    """Runs at each arm's picked lr, keyed by arm."""
    by_arm = defaultdict(list)
    for r in results["runs"]:
        if r.get("test") is not None and results["picked_lr"].get(f"{r['task']}/{r['arm']}") == r["lr"]:
            by_arm[r["arm"]].append(r)
    return by_arm


def mean_curve(curves: list[list]) -> list:
    n = min(len(c) for c in curves)
    return [statistics.mean(c[i] for c in curves) for i in range(n)]


def plot(results: dict, dominant: int, out: Path) -> None:
    by_arm = picked_runs(results)
    task = next(iter(by_arm.values()))[0]["task"]
    layers = sorted((int(a[1:]), a) for a in by_arm if a.startswith("L"))
    fig, (ax_bar, ax_val, ax_loss) = plt.subplots(1, 3, figsize=(16, 4.5))

    xs = range(len(layers))
    means = [statistics.mean(r["test"] for r in by_arm[a]) for _, a in layers]
    stds = [statistics.stdev(r["test"] for r in by_arm[a]) if len(by_arm[a]) > 1 else 0 for _, a in layers]
    colors = ["tab:red" if i == dominant else "tab:blue" for i, _ in layers]
    ax_bar.bar(xs, means, yerr=stds, color=colors, capsize=3)
    ax_bar.set_xticks(list(xs), [f"{i}\n({len(by_arm[a])} s)" for i, a in layers])
    ax_bar.axhline(results["zero_shot"][task]["test"], color="gray", ls=":", label="zero-shot")
    if "full" in by_arm:
        ax_bar.axhline(statistics.mean(r["test"] for r in by_arm["full"]), color="black", ls="--", label="full-model MeZO")
    ax_bar.set_ylim(min(means + [results["zero_shot"][task]["test"]]) - 0.05, max(means) + 0.05)
    ax_bar.set(xlabel=f"tuned layer (0-based; red = scanned dominant layer {dominant}; seeds)", ylabel="test score",
               title=f"{task}: one layer tuned at a time")
    ax_bar.legend(loc="lower right")

    arms = [a for _, a in layers] + ["full"] * ("full" in by_arm)
    palette = iter(plt.get_cmap("tab10").colors[i] for i in (0, 1, 2, 4, 5, 6, 7, 8, 9, 0, 1, 2))
    for arm in arms:   # the same colour per arm in both panels; the scanned layer red and thick
        style = {"color": "tab:red", "lw": 2.5} if arm == f"L{dominant}" else {"color": next(palette), "lw": 1}
        curve = mean_curve([[v for _, v in r["val_curve"]] for r in by_arm[arm]])
        steps = [s for s, _ in by_arm[arm][0]["val_curve"]][:len(curve)]
        ax_val.plot(steps, curve, label=arm, ls="--" if arm == "full" else "-", **style)
        with_loss = [r["loss_by_25"] for r in by_arm[arm] if "loss_by_25" in r]
        if with_loss:
            loss = mean_curve(with_loss)
            ax_loss.plot([25 * i for i in range(len(loss))], loss, label=arm, ls="--" if arm == "full" else "-", **style)
    ax_val.set(xlabel="step", ylabel="val score (mean over seeds)", title="dev score while tuning")
    ax_loss.set(xlabel="step", ylabel="training loss (25-step means)", title="training loss (runs that recorded it)")
    ax_val.legend(fontsize=7, ncol=2)
    ax_loss.legend(fontsize=7, ncol=2)
    fig.suptitle(f"SmolLM2-135M, {task}: {results['env'].get('gpu', 'CPU')}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--dominant", type=int, required=True, help="the scanned dominant layer, highlighted")
    args = ap.parse_args()
    out = args.results.parent / "layers.png"
    plot(json.loads(args.results.read_text()), args.dominant, out)
    print(out)


if __name__ == "__main__":
    main()
