"""`zolite scan`: find the dominant layer of a model by inference only (Dominant-Layer ZO, arXiv 2606.05516).

Two per-layer profiles over calibration text (the residual stream after decoder layer i, 0-based):
- activation: max |h|, mean |h|, median |h|, max / median, and where the max sits (prompt, token, channel);
  the dominant layer is the first where at least `share` of the prompts have max |h| >= `magnitude` and
  >= `ratio` x the layer's median |h| (the "massive activations" rule of Sun et al. 2024: ~100 in magnitude and
  ~1000x the median; asking it of most prompts keeps one odd prompt from deciding);
- sensitivity: |loss(W_i + eps z) - loss(W)| of the LM loss when only layer i is perturbed, mean over seeds. The
  perturbation is swapped in by forward hooks for one forward (zo.TunedLayers.shifted): weights are never written.

The result of the documented rule is cached per model identity (architecture + embedding weights), so `tune` finds it
without rescanning; a scan with another rule is reported, not cached.
"""
from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path

import torch

from .errors import ZoliteError, check_at_least
from .io import refuse_used_folder, write_json, write_text
from .layers import decoder_layers

MAGNITUDE, RATIO, SHARE = 100.0, 1000.0, 0.5


def calibration_prompts(source: str | None, n: int) -> list[str]:
    """n prompts: the bundled generic text (one per line), a task's prompts, or the lines of a text file."""
    check_at_least("--prompts", n, 1)
    if source is None:
        text = (resources.files("zolite") / "data" / "calibration.txt").read_text(encoding="utf-8")
        prompts = [line for line in text.splitlines() if line.strip()]
    elif Path(source).suffix == ".txt":
        try:
            prompts = [line for line in Path(source).read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise ZoliteError(f"cannot read {source}: {e}") from None
    else:
        from .data import sample_splits
        from .tasks import get_task, task_data

        task = get_task(source)
        rows = sample_splits(task_data(task, None), validate=task.validate, expand=task.expand).train
        prompts = [task.example(r).prompt for r in rows]
    if not prompts:
        raise ZoliteError(f"{source or 'the calibration text'} holds no prompts; pass a file with one prompt per line")
    return prompts[:n]


def _batches(tokenizer, prompts, batch_size, max_length, device):
    """Right-padded token batches and each row's length (statistics skip the padding)."""
    for start in range(0, len(prompts), batch_size):
        ids = [tokenizer(p)["input_ids"][:max_length] for p in prompts[start:start + batch_size]]
        lengths = torch.tensor([len(x) for x in ids], device=device)
        batch = torch.zeros(len(ids), int(lengths.max()), dtype=torch.long, device=device)
        for i, x in enumerate(ids):
            batch[i, :len(x)] = torch.tensor(x, device=device)
        yield start, batch, lengths


@torch.inference_mode()
def activation_profile(model, batches) -> list[dict]:
    """Per layer: max / mean / median |h| over real tokens (median: mean of per-batch medians), and the argmax."""
    _, layers = decoder_layers(model)
    stats = [{"layer": i, "max_abs": 0.0, "sum_abs": 0.0, "count": 0, "medians": [], "prompt_max": []}
             for i in range(len(layers))]
    current = {}

    def record(i):
        def hook(_module, _args, out):
            h = (out[0] if isinstance(out, tuple) else out).float().abs()         # [B, T, D]
            real = torch.arange(h.shape[1], device=h.device)[None, :] < current["lengths"][:, None]
            values = h[real]                                                       # [tokens, D]
            s = stats[i]
            top = values.max()
            if top.item() > s["max_abs"]:
                flat = int((h * real[..., None]).flatten().argmax())
                b, rest = divmod(flat, h.shape[1] * h.shape[2])
                t, c = divmod(rest, h.shape[2])
                s.update(max_abs=top.item(), where={"prompt": current["start"] + b, "token": t, "channel": c,
                                                    "token_id": int(current["ids"][b, t])})
            s["sum_abs"] += values.sum().item()
            s["count"] += values.numel()
            s["medians"].append(values.median().item())
            s["prompt_max"] += (h * real[..., None]).amax(dim=(1, 2)).tolist()
        return hook

    handles = [layer.register_forward_hook(record(i)) for i, layer in enumerate(layers)]
    try:
        for start, ids, lengths in batches:
            current.update(start=start, ids=ids, lengths=lengths)
            model.base_model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    out = []
    for s in stats:
        median = sum(s["medians"]) / len(s["medians"])
        out.append({"layer": s["layer"], "max_abs": s["max_abs"], "mean_abs": s["sum_abs"] / s["count"],
                    "median_abs": median, "ratio": s["max_abs"] / max(median, 1e-12), "where": s.get("where"),
                    "prompt_max": s["prompt_max"]})
    return out


@torch.inference_mode()
def lm_loss(model, batches) -> float:
    """Mean next-token NLL over the real tokens of the batches."""
    total, count = 0.0, 0
    for _, ids, lengths in batches:
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        real = torch.arange(1, ids.shape[1], device=ids.device)[None, :] < lengths[:, None]
        nll = torch.nn.functional.cross_entropy(logits[real], ids[:, 1:][real], reduction="sum")
        total += nll.item()
        count += int(real.sum())
    return total / max(count, 1)


def sensitivity_profile(model, batches, seeds: int, eps: float) -> tuple[float, list[dict]]:
    """The base LM loss and, per layer, the mean over seeds of |loss with only that layer at W + eps z - base|."""
    from .zo import TunedLayers

    batches = list(batches)
    base = lm_loss(model, batches)
    _, layers = decoder_layers(model)
    out = []
    for i in range(len(layers)):
        tuned = TunedLayers(model, [i])
        deltas = []
        for seed in range(seeds):
            with tuned.shifted(seed, eps, +1):
                deltas.append(abs(lm_loss(model, batches) - base))
        out.append({"layer": i, "delta_loss": sum(deltas) / len(deltas), "per_seed": deltas})
    return base, out


def outlier_share(a: dict, magnitude: float, ratio: float) -> float:
    """The fraction of prompts whose max |h| at this layer is >= magnitude and >= ratio x the layer's median."""
    hits = [m >= magnitude and m >= ratio * a["median_abs"] for m in a["prompt_max"]]
    return sum(hits) / len(hits)


def first_outlier_layer(activations: list[dict], magnitude: float = MAGNITUDE, ratio: float = RATIO,
                        share: float = SHARE) -> int | None:
    """The first layer where at least `share` of the prompts show a massive activation (0 = any one prompt)."""
    for a in activations:
        if a["prompt_max"] and outlier_share(a, magnitude, ratio) >= max(share, 1e-12):
            return a["layer"]
    return None


def folder_identity(path: Path, skeleton=None) -> str:
    """What a cached scan is keyed by: architecture, shape and the input embedding's fp16 bytes, read from the
    model's files (never quantized or offloaded there, so every load mode of one model shares the key)."""
    from safetensors import safe_open

    from .loading import model_skeleton

    skeleton = skeleton if skeleton is not None else model_skeleton(path)
    emb = skeleton.get_input_embeddings().weight
    name = next(n for n, p in skeleton.named_parameters(remove_duplicate=False) if p is emb)
    cfg = skeleton.config
    # a checkpoint saved from the base model has its keys without the head model's prefix (embed_tokens.weight)
    parts = name.split(".")
    names = [".".join(parts[k:]) for k in range(len(parts) - 1)]
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            found = next((n for n in names if n in st.keys()), None)
            if found is not None:
                digest = hashlib.sha256()
                digest.update(f"{cfg.model_type}/{cfg.num_hidden_layers}/{cfg.hidden_size}".encode())
                digest.update(st.get_tensor(found).to(torch.float16).contiguous().view(torch.uint8).numpy().tobytes())
                return digest.hexdigest()[:32]
    raise ZoliteError(f"{path} has no safetensors file holding {name}; pass --layer N (0-based)")


def cached_scan_path(identity: str) -> Path:
    from .loading import cache_dir

    return cache_dir() / "scans" / f"{identity}.json"


def cached_dominant_layer(identity: str) -> tuple[int | None, str | None]:
    """The dominant layer a scan of this model found, and the file it came from; (None, None) when never scanned."""
    path = cached_scan_path(identity)
    if not path.is_file():
        return None, None
    try:
        return json.loads(path.read_text())["dominant_layer"], str(path)
    except (json.JSONDecodeError, KeyError, OSError):
        return None, None


def scan(model: str = "smollm2-135m", *, prompts: int = 32, text: str | None = None, mode: str | None = None,
         magnitude: float = MAGNITUDE, ratio: float = RATIO, share: float = SHARE, seeds: int = 3, eps: float = 1e-3,
         batch_size: int = 8, max_length: int = 256, out: str | None = None, force: bool = False,
         device=None, dtype=None, loaded=None) -> dict:
    """Scan `model`: both profiles, the dominant layer; writes report.json / report.md / scan.png to `out` (if
    given) and, for the default rule, caches the result for `tune --layer auto`."""
    from .loading import load_model

    if magnitude <= 0 or ratio <= 0:
        raise ZoliteError("--magnitude and --ratio must be above 0")
    if not 0 <= share <= 1:
        raise ZoliteError(f"--share must be between 0 and 1, got {share}")
    check_at_least("--seeds", seeds, 0)
    if eps <= 0:
        raise ZoliteError(f"--eps must be above 0, got {eps}")
    if out is not None:
        refuse_used_folder(out, force)
    texts = calibration_prompts(text, prompts)
    loaded = loaded or load_model(model, device=device, dtype=dtype, mode=mode)
    net, tok = loaded.model, loaded.tokenizer
    batches = list(_batches(tok, texts, batch_size, max_length, loaded.device))
    activations = activation_profile(net, batches)
    # Quantized weights (int8 / nf4) are packed integers, offloaded ones are streamed from CPU memory: the probe
    # needs plain weights on the device.
    probe = seeds if loaded.mode == "fp16" else 0
    base_loss, sensitivity = sensitivity_profile(net, batches, probe, eps) if probe else (None, [])
    for a, s in zip(activations, sensitivity):
        a["delta_loss"] = s["delta_loss"]
    for a in activations:
        if a["where"]:
            a["where"]["text"] = tok.decode([a["where"]["token_id"]])
    for a in activations:
        a["outlier_share"] = outlier_share(a, magnitude, ratio)
    dominant = first_outlier_layer(activations, magnitude, ratio, share)
    try:
        identity = folder_identity(loaded.path)
    except ZoliteError:   # e.g. a folder of .bin weights: nothing to key a cache on, the report is still written
        identity = None
    result = {"model": model, "identity": identity, "mode": loaded.mode, "dtype": str(loaded.dtype).removeprefix("torch."),
              "device": str(loaded.device), "prompts": len(texts), "calibration": text or "bundled generic text",
              "tokens": int(sum(int(b[2].sum()) for b in batches)),
              "rule": {"magnitude": magnitude, "ratio": ratio, "share": share}, "dominant_layer": dominant,
              "profile_dominant_layer": loaded.profile.dominant_layer if loaded.profile else None,
              "sensitivity": {"seeds": probe, "eps": eps, "base_loss": base_loss,
                              "skipped": None if probe or not seeds else
                              f"not run in {loaded.mode}: quantized or offloaded weights cannot be perturbed here; "
                              "scan with --mode fp16",
                              "most_sensitive_layer": max(sensitivity, key=lambda s: s["delta_loss"])["layer"]
                              if sensitivity else None},
              "layers": activations}
    # only the documented rule's answer becomes `tune --layer auto`'s: an exploratory rule is reported, not cached
    result["cached"] = identity is not None and (magnitude, ratio, share) == (MAGNITUDE, RATIO, SHARE)
    if result["cached"]:
        write_json(cached_scan_path(identity), result)
    if out is not None:
        write_report(result, Path(out))
    return result


def markdown(result: dict) -> str:
    rule = result["rule"]
    lines = [f"# Layer scan: {result['model']} ({result['mode']}, {result['dtype']}, {result['device']})", "",
             f"{result['prompts']} prompts ({result['calibration']}), {result['tokens']} tokens. Layer i = the "
             "residual stream after decoder layer i (0-based).", "",
             f"Dominant layer: **{result['dominant_layer']}** = the first layer where at least {rule['share']:.0%} of "
             f"the prompts have max|h| >= {rule['magnitude']:g} and >= {rule['ratio']:g}x the layer's median |h|."
             + ("" if result["dominant_layer"] is not None else " No layer crosses the rule: pass --layer to tune."),
             ""]
    if result["sensitivity"].get("skipped"):
        lines += [f"Sensitivity: {result['sensitivity']['skipped']}.", ""]
    if result["sensitivity"]["seeds"]:
        s = result["sensitivity"]
        lines += [f"Sensitivity: |LM loss change| with only that layer at W + eps z, eps {s['eps']:g}, mean over "
                  f"{s['seeds']} seeds; base loss {s['base_loss']:.4f}. Most sensitive layer: "
                  f"{s['most_sensitive_layer']}.", ""]
    lines += ["| layer | max abs | mean abs | median abs | max / median | prompts with outlier | "
              "max at (prompt, token, channel) | delta loss |", "|---|---|---|---|---|---|---|---|"]
    for a in result["layers"]:
        w = a["where"] or {}
        mark = " **<-**" if a["layer"] == result["dominant_layer"] else ""
        delta = f"{a['delta_loss']:.3g}" if "delta_loss" in a else "-"
        lines.append(f"| {a['layer']}{mark} | {a['max_abs']:.4g} | {a['mean_abs']:.3g} | {a['median_abs']:.3g} | "
                     f"{a['ratio']:.4g} | {a['outlier_share']:.0%} | {w.get('prompt')}, {w.get('token')} ({w.get('text', '')!r}), "
                     f"{w.get('channel')} | {delta} |")
    return "\n".join(lines) + "\n"


def write_report(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", result)
    write_text(out / "report.md", markdown(result))
    plot(result, out / "scan.png")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import atomic_path

    layers = [a["layer"] for a in result["layers"]]
    panels = 2 if result["sensitivity"]["seeds"] else 1
    fig, axes = plt.subplots(panels, 1, figsize=(8, 3.2 * panels), sharex=True, squeeze=False)
    ax = axes[0][0]
    ax.semilogy(layers, [a["max_abs"] for a in result["layers"]], "o-", label="max |h|")
    ax.semilogy(layers, [a["median_abs"] for a in result["layers"]], "s-", label="median |h|")
    ax.axhline(result["rule"]["magnitude"], color="grey", ls=":", label=f"magnitude {result['rule']['magnitude']:g}")
    ax.set_ylabel("|activation|")
    ax.set_title(f"{result['model']}: layer outputs and sensitivity")
    if panels == 2:
        axes[1][0].plot(layers, [a.get("delta_loss", 0) for a in result["layers"]], "o-", color="C2")
        axes[1][0].set_ylabel(f"|loss change|, eps {result['sensitivity']['eps']:g}")
    for row in axes:
        if result["dominant_layer"] is not None:
            row[0].axvline(result["dominant_layer"], color="C3", ls="--", label=f"dominant layer {result['dominant_layer']}")
        row[0].legend(fontsize=8)
    axes[-1][0].set_xlabel("decoder layer (0-based)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def choose_layers(spec, num_layers: int, identity, profile, scan_now) -> tuple[list[int], str]:
    """The layers a run tunes and where that choice came from. 'auto' (or None): the dominant layer from this
    model's cached scan (`identity()` gives its key), else its profile, else `scan_now()` (then cached).
    Callables, so a model that is not loaded yet (quantized runs choose before loading) is read only if needed."""
    from .layers import parse_layers

    if spec is not None and str(spec).strip().lower() != "auto":
        return parse_layers(spec, num_layers), "given"
    layer, path = cached_dominant_layer(identity())
    if layer is not None:
        return [layer], f"scan cached in {path}"
    if profile is not None and profile.dominant_layer is not None:
        return [profile.dominant_layer], f"profile {profile.name} ({profile.dominant_layer_source})"
    result = scan_now()
    if result["dominant_layer"] is None:
        raise ZoliteError("no layer of this model shows massive activations under the scan's rule; pass "
                          "--layer N (0-based) or --layers all, or relax the rule with `zolite scan --magnitude/--ratio`")
    return [result["dominant_layer"]], "scanned now (zolite scan rule, bundled text); cached"
