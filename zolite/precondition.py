"""Activation-scaled perturbations (--eps-scale activation): a diagonal preconditioner measured by forward passes.

For a linear map y = W x the loss's curvature in weight W_ij grows with the energy of its input channel,
e_j = mean over tokens of x_j^2 (Gauss-Newton: H_ij,ij ~ e_j times the curvature at output i). In the layers with
massive activations a few channels carry thousands of times the energy of the rest, so they dominate tr(H), and a
perturbation z that treats every weight alike must use a step small enough for those few columns: the rest barely
move. Scaling column j of z by

    s_j = (e_j + median_k e_k)^(-1/2),  normalised so that the tensor's s has RMS 1,

evens the curvature along the perturbation out without amplifying any column by more than 1.4x a channel of median
energy (the damping keeps silent channels from being blown up). The damping is the median, not the mean: a few
massive channels raise the mean so far that every other channel gets nearly the same scale (the first H200 runs
damped by the mean). The update follows the same scaled z, so the step
is preconditioned SGD with P = diag(s^2).

A norm's weight g scales its normalized input r channel by channel (RMSNorm: g * r, LayerNorm: g * r + b), so the
curvature in g_j grows with e_j = mean r_j^2 the same way, and the massive channels make it just as uneven: g_j gets
the same s_j, from r's energy (on SmolLM2's SST-2 this lifted ZO on the final norm from 0.720 to 0.765, replayed
exactly from saved states: bench/results/probe_ceiling_cpu). Biases keep scale 1 (no input to weigh them by).

Measured once, on training batches, before the run; the scales travel in checkpoints and trajectories.
"""
from __future__ import annotations

import torch

from .zo import TunedLayers

CALIBRATION_BATCHES = 4


@torch.no_grad()
def input_energies(model, tuned: TunedLayers, sequences: list[list[int]], batch_size: int, device) -> dict[str, torch.Tensor]:
    """Mean square of each input channel of every tuned matrix, and of each normalized input channel of every tuned
    norm weight, over the real (unpadded) tokens of `sequences`, by full name of the tensor."""
    sums: dict[int, torch.Tensor] = {}
    mask: dict[str, torch.Tensor] = {}
    handles = []
    for i, (module, attr) in enumerate(tuned.owner):
        channels = _channels_weighed(module, tuned.params[i]) if attr == "weight" else None
        if channels is None:
            continue

        def record(_module, args, i=i, channels=channels):
            x = channels(args[0][mask["tokens"]].float())           # [real tokens, channels]
            sums[i] = sums.get(i, 0) + x.pow(2).sum(0)
        handles.append(module.register_forward_pre_hook(record))
    tokens = 0
    try:
        with torch.inference_mode():
            for start in range(0, len(sequences), batch_size):
                chunk = sequences[start:start + batch_size]
                longest = max(len(s) for s in chunk)
                ids = torch.zeros(len(chunk), longest, dtype=torch.long)
                real = torch.zeros(len(chunk), longest, dtype=torch.bool)
                for row, seq in enumerate(chunk):
                    ids[row, :len(seq)] = torch.tensor(seq)
                    real[row, :len(seq)] = True
                mask["tokens"] = real.to(device)
                tokens += int(real.sum())
                model.base_model(input_ids=ids.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {tuned.names[i]: s / max(tokens, 1) for i, s in sums.items()}


def _channels_weighed(module: torch.nn.Module, weight: torch.Tensor):
    """What a weight multiplies channel by channel, as a function of its module's input: a Linear's input as it is,
    a norm's input normalized (LayerNorm subtracts the mean, the RMSNorms of Llama, Qwen2, ... do not); None for
    any other weight."""
    if weight.dim() == 2 and isinstance(module, torch.nn.Linear):
        return lambda x: x
    if weight.dim() != 1:
        return None
    if isinstance(module, torch.nn.LayerNorm):
        return lambda x: torch.nn.functional.layer_norm(x, x.shape[-1:], eps=module.eps)
    if "RMSNorm" in type(module).__name__:
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
        return lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return None


def activation_scales(energies: dict[str, torch.Tensor], vectors: frozenset = frozenset()) -> dict[str, torch.Tensor]:
    """s_j = (e_j + median e)^(-1/2), RMS 1 per tensor, shaped [1, in] to broadcast over a matrix's rows (or [in]
    for the names in `vectors`: norm weights)."""
    scales = {}
    for name, e in energies.items():
        s = (e + e.quantile(0.5)).rsqrt()
        s = s / s.pow(2).mean().sqrt()
        scales[name] = s if name in vectors else s.unsqueeze(0)
    return scales


def measure_scales(model, tuned: TunedLayers, examples: list, batch_size: int, device) -> dict[str, torch.Tensor]:
    """The scales from the prompts of encoded training examples (their first candidate's sequence)."""
    sequences = [list(e.sequences[0]) for e in examples[:CALIBRATION_BATCHES * batch_size]]
    vectors = frozenset(n for n, p in zip(tuned.names, tuned.params) if p.dim() == 1)
    return activation_scales(input_energies(model, tuned, sequences, batch_size, device), vectors)


def scale_summary(scales: dict[str, torch.Tensor]) -> dict:
    """Per tensor: the smallest and largest scale (how unevenly the inputs' energy was spread)."""
    return {name.rsplit(".", 2)[-2]: [round(float(s.min()), 4), round(float(s.max()), 4)] for name, s in scales.items()}
