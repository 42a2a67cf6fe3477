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
is preconditioned SGD with P = diag(s^2). Vectors (norms, biases) keep scale 1.

Measured once, on training batches, before the run; the scales travel in checkpoints and trajectories.
"""
from __future__ import annotations

import torch

from .zo import TunedLayers

CALIBRATION_BATCHES = 4


@torch.no_grad()
def input_energies(model, tuned: TunedLayers, sequences: list[list[int]], batch_size: int, device) -> dict[str, torch.Tensor]:
    """Mean square of each input channel of every tuned matrix over the real (unpadded) tokens of `sequences`,
    by full name of the matrix."""
    sums: dict[int, torch.Tensor] = {}
    mask: dict[str, torch.Tensor] = {}
    handles = []
    for i, (module, attr) in enumerate(tuned.owner):
        if attr != "weight" or tuned.params[i].dim() != 2 or not isinstance(module, torch.nn.Linear):
            continue

        def record(_module, args, i=i):
            x = args[0][mask["tokens"]].float()                      # [real tokens, in]
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


def activation_scales(energies: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """s_j = (e_j + median e)^(-1/2), RMS 1 per tensor, shaped [1, in] to broadcast over the matrix's rows."""
    scales = {}
    for name, e in energies.items():
        s = (e + e.quantile(0.5)).rsqrt()
        s = s / s.pow(2).mean().sqrt()
        scales[name] = s.unsqueeze(0)
    return scales


def measure_scales(model, tuned: TunedLayers, examples: list, batch_size: int, device) -> dict[str, torch.Tensor]:
    """The scales from the prompts of encoded training examples (their first candidate's sequence)."""
    sequences = [list(e.sequences[0]) for e in examples[:CALIBRATION_BATCHES * batch_size]]
    return activation_scales(input_energies(model, tuned, sequences, batch_size, device))


def scale_summary(scales: dict[str, torch.Tensor]) -> dict:
    """Per tensor: the smallest and largest scale (how unevenly the inputs' energy was spread)."""
    return {name.rsplit(".", 2)[-2]: [round(float(s.min()), 4), round(float(s.max()), 4)] for name, s in scales.items()}
