"""Plan a run to fit a GPU memory budget (`--gpu-memory 8GiB`): pick the mode and the micro-batch.

The estimate is built from the model's shapes (its meta-device skeleton: nothing is loaded):
- resident weights: per mode, what stays on the GPU. fp16: everything in `dtype`; int8 / nf4: decoder Linear
  weights at 1 / 0.5 bytes (+ their scales), the rest (embeddings, norms, lm_head, the tuned layers) in `dtype`;
  offload: the tuned layers and the input embedding, plus three of the modules streamed in (the one computing, the
  next in flight, the last one until the GPU is done with it);
- the tuned layers' compensation residuals (same dtype as the layer; none when `dtype` is fp32) and one tensor's z
  (fp32) and W + eps z (in `dtype`) while it runs;
- activations of one ZO forward: the micro-batch is doubled from the first tuned layer on (+eps and -eps halves),
  and a decoder layer holds about (6 H + 3 I) values per token at its peak (attention q/k/v/out, the MLP's
  gate/up/act products; no KV cache, logits only at the answer tokens), times ACTIVATION_MARGIN for the
  allocator's rounding and the norms' fp32 upcasts.
Where `zolite profile` has measured this model on a GPU, its activation bytes per (doubled) token replace the
analytic estimate (times MEASURED_MARGIN), per mode: the measurement is cached under $ZOLITE_CACHE/activations/.
Modes are tried fastest first (fp16, nf4, offload; int8 only when asked for: on an H100 it was both slower and larger
than nf4, and it hurts ZO accuracy, see zolite.loading.choose_mode) and, within a mode, the largest micro-batch that
divides the batch; a mode that needs more than MAX_FORWARDS micro-batches per step is passed over for the next one, and taken
only if no mode fits otherwise. A micro-batch changes nothing but memory: ZO losses are means over examples, so the micro-batches' losses,
weighted by their sizes, give the batch's (the same up to float summation order).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import ZoliteError
from .layers import decoder_layers, is_weight_matrix, parse_params
from .zo import FUSED_MAX_NUMEL, UPDATE_CHUNK

GIB = 2**30
ACTIVATION_MARGIN = 1.5
MEASURED_MARGIN = 1.1
CUDA_CONTEXT_GIB = 0.5     # not in torch's allocator, but on the card: leave room for it
PLAN_ORDER = ("fp16", "nf4", "offload")
MAX_FORWARDS = 4           # a mode is preferred only if its micro-batch is at least a quarter of the batch


def parse_size(text: str) -> int:
    """'8GiB', '8 GB', '512MiB', '8' (GiB) -> bytes. GB is read as GiB, as GPU memory is sold ("8 GB" = 8 GiB)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B|[KMGT]|B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ZoliteError(f"--gpu-memory '{text}' is not a size; write it like 8GiB, 6GB or 512MiB")
    unit = (m.group(2) or "GiB").upper().replace("I", "").rstrip("B") or "B"
    factor = {"B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[unit]
    return int(float(m.group(1)) * factor)


@dataclass
class Plan:
    mode: str
    micro_batch: int
    estimate_gib: float
    budget_gib: float
    parts_gib: dict
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def _sizes(skeleton, layers: list[int], params: str | None = None) -> dict:
    """Parameter counts by how a run holds them: tuned (the layers' tensors --params selects), the frozen Linear
    weights of the decoder (what nf4 / int8 quantize), the rest."""
    prefix, _ = decoder_layers(skeleton)
    tuned_names = {f"{prefix}.{i}." for i in layers}
    wanted = parse_params(params)
    sizes = {"linear_frozen": 0, "linear_frozen_rows": 0, "other_frozen": 0, "tuned": 0, "largest_tuned": 0,
             "largest_streamed": 0, "tuned_matrices": 0}
    seen = set()
    for name, module in skeleton.named_modules():
        for attr, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{name}.{attr}"
            layer = next((t for t in tuned_names if full.startswith(t)), None)
            if layer and (not wanted or any(w in full[len(layer):] for w in wanted)):
                sizes["tuned"] += p.numel()
                sizes["largest_tuned"] = max(sizes["largest_tuned"], p.numel())
                sizes["tuned_matrices"] += p.dim() != 1
            elif is_weight_matrix(module) and full.startswith(prefix + ".") and attr == "weight":
                sizes["linear_frozen"] += p.numel()
                sizes["linear_frozen_rows"] += p.shape[0]
                sizes["largest_streamed"] = max(sizes["largest_streamed"], p.numel())
            else:
                sizes["other_frozen"] += p.numel()
    head, embedding = skeleton.get_output_embeddings(), skeleton.get_input_embeddings()
    sizes["embedding"] = embedding.weight.numel()
    if head is not None and head.weight is not embedding.weight:   # offload streams an untied head too
        sizes["largest_streamed"] = max(sizes["largest_streamed"], head.weight.numel())
    return sizes


def estimate(skeleton, layers: list[int], mode: str, micro_batch: int, seq_len: int, dtype: torch.dtype,
             measured: dict | None = None, estimator: str = "spsa", optimizer: str = "sgd",
             cuda_graphs: bool | None = False, params: str | None = None) -> dict:
    """Estimated peak GPU bytes of a run, by part (GiB). measured: {mode: activation bytes per doubled token}.
    Optimiser state: fp32 buffers per tuned parameter (momentum 1, adam 2) plus one fp32 direction tensor.
    Backprop (`fo`): no doubled batch, but every layer from the first tuned one keeps its activations for the
    backward pass, and the gradients are held in fp32. cuda_graphs: z of every tuned tensor in fp32 buffers, where
    the step is graphed (zolite.graphs: the fused path of small tensors, not offload); None: graphed in mode fp16
    only (a profile's default: zolite.tune_setup.speed_option); half-precision vectors alone (--params norm,bias)
    hold their z in one fp32 buffer either way. params: --params (the tuned tensors; the Linear
    weights it leaves out are quantized with the rest)."""
    cfg = skeleton.config
    b = torch.finfo(dtype).bits // 8
    s = _sizes(skeleton, layers, params)
    # offload keeps the tuned layers whole on the GPU
    resident = _sizes(skeleton, layers) if mode == "offload" and params else s
    if mode == "fp16":
        weights = (s["linear_frozen"] + s["other_frozen"] + s["tuned"]) * b
    elif mode == "int8":   # int8 weights + one fp32 scale per output row
        weights = s["linear_frozen"] + 4 * s["linear_frozen_rows"] + (s["other_frozen"] + s["tuned"]) * b
    elif mode == "nf4":    # 4-bit weights + one fp32 absmax per 64 values
        weights = s["linear_frozen"] // 2 + s["linear_frozen"] // 16 + (s["other_frozen"] + s["tuned"]) * b
    elif mode == "offload":   # streamed modules: the one computing, the next in flight, the last being freed
        weights = (resident["tuned"] + s["embedding"] + 3 * resident["largest_streamed"]) * b
    else:
        raise ZoliteError(f"unknown mode '{mode}'; choose one of fp16, int8, nf4, offload")
    master = 0 if dtype == torch.float32 else b * s["tuned"]
    perturb = (4 + b) * s["largest_tuned"]   # z (fp32) and W + eps z (dtype) of one tensor, during its forward
    hidden, inter = cfg.hidden_size, getattr(cfg, "intermediate_size", 4 * cfg.hidden_size)
    tokens = 2 * micro_batch * seq_len
    if measured and mode in measured and estimator != "fo":
        activations = int(MEASURED_MARGIN * tokens * measured[mode])
    else:
        activations = int(ACTIVATION_MARGIN * tokens * (6 * hidden + 3 * inter) * b)
    optimizer_state = 4 * s["tuned"] * {"momentum": 1, "adam": 2}.get(optimizer, 0)
    if estimator == "fo":   # half the rows (no +eps/-eps copies), kept by every layer from the first tuned one
        kept = len(decoder_layers(skeleton)[1]) - min(layers)
        activations = activations // 2 * kept
        optimizer_state += 4 * s["tuned"]   # the gradients, fp32
    graphed = (cuda_graphs if cuda_graphs is not None else mode == "fp16") and estimator == "spsa" \
        and mode != "offload" and s["largest_tuned"] < FUSED_MAX_NUMEL
    # half-precision vectors alone (biases, norms) are stepped together, z drawn into one fp32 buffer (TunedLayers)
    together = estimator == "spsa" and dtype != torch.float32 and s["tuned_matrices"] == 0 \
        and s["tuned"] <= UPDATE_CHUNK
    if together:   # their pairs and the weights' concatenation, during the forward
        perturb = max(perturb, 3 * b * s["tuned"])
    parts = {"weights": weights, "master_copy": master, "perturbation": perturb, "activations": activations,
             "optimizer_state": optimizer_state, "z_buffers": 4 * s["tuned"] if graphed or together else 0,
             "cuda_context": int(CUDA_CONTEXT_GIB * GIB)}
    return {k: round(v / GIB, 3) for k, v in parts.items()}


def plan_memory(skeleton, layers: list[int], budget: int, batch_size: int, seq_len: int, dtype: torch.dtype,
                mode: str | None = None, measured: dict | None = None, micro_batch: int | None = None,
                estimator: str = "spsa", optimizer: str = "sgd", cuda_graphs: bool | None = False,
                params: str | None = None) -> Plan:
    """The fastest mode (or the given one) and the largest micro-batch (or the given one) that fit `budget` bytes."""
    modes = [mode] if mode else list(PLAN_ORDER)
    if _sizes(skeleton, layers, params)["linear_frozen"] == 0 and not mode:
        modes = ["fp16", "offload"]   # every layer's weights tuned: nothing left to quantize
    if estimator == "fo" and not mode:   # backprop keeps every streamed copy for its backward pass: offload saves nothing
        modes = [m for m in modes if m != "offload"]
    divisors = [micro_batch] if micro_batch else [d for d in range(batch_size, 0, -1) if batch_size % d == 0]
    smallest = None
    # First pass: a mode counts only if it runs the batch in at most MAX_FORWARDS forwards (tiny micro-batches
    # would make a faster mode slower than the next one); second pass: any micro-batch.
    for least in (batch_size / MAX_FORWARDS, 1):
        for m in modes:
            for mb in (d for d in divisors if d >= least):
                parts = estimate(skeleton, layers, m, mb, seq_len, dtype, measured, estimator, optimizer, cuda_graphs,
                                 params)
                total = sum(parts.values())
                if smallest is None or total < smallest[2]:
                    smallest = (m, mb, total)
                if total * GIB <= budget:
                    skipped = modes[:modes.index(m)]
                    why = (f"{m}, micro-batch {mb} of {batch_size}: estimated {total:.2f} GiB of {budget / GIB:.2f} GiB"
                           + (f" ({', '.join(skipped)} would not fit"
                              + (f" with at most {MAX_FORWARDS} forwards per step" if least > 1 else "") + ")"
                              if skipped else "")
                           + (f"; a micro-batch of {batch_size} would not fit" if mb < batch_size else ""))
                    return Plan(m, mb, round(total, 3), round(budget / GIB, 3), parts, why)
    m, mb, total = smallest
    raise ZoliteError(f"nothing fits in {budget / GIB:.2f} GiB: the smallest plan ({m}, micro-batch {mb}, sequence "
                      f"{seq_len}) needs about {total:.2f} GiB; raise --gpu-memory, lower --max-length, or use a "
                      "smaller model")


def measured_path(identity: str) -> Path:
    from .loading import cache_dir

    return cache_dir() / "activations" / f"{identity}.json"


def load_measured(identity: str, dtype: torch.dtype) -> dict:
    """{mode: activation bytes per doubled token} measured by `zolite profile` on a GPU in `dtype`; {} if never."""
    import json

    path = measured_path(identity)
    suffix = "/" + str(dtype).removeprefix("torch.")
    try:
        return {key.removesuffix(suffix): v["bytes_per_token"] for key, v in json.loads(path.read_text()).items()
                if key.endswith(suffix)}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def measured_activations(identity: str | None, dtype: torch.dtype, profile=None) -> dict:
    """{mode: bytes per doubled token}: this machine's own `zolite profile` measurements of the model (none when
    identity is None), else the profile's shipped ones (measured on a GPU for the model's shape)."""
    suffix = "/" + str(dtype).removeprefix("torch.")
    shipped = {key.removesuffix(suffix): v for key, v in (profile.activation_bytes_per_token if profile else {}).items()
               if key.endswith(suffix)}
    return {**shipped, **(load_measured(identity, dtype) if identity is not None else {})}


def record_measured(identity: str, mode: str, dtype: torch.dtype, bytes_per_token: float, source: dict) -> None:
    import json

    from .io import write_json

    path = measured_path(identity)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    data[f"{mode}/{str(dtype).removeprefix('torch.')}"] = {"bytes_per_token": bytes_per_token, **source}
    write_json(path, data)
