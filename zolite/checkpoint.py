"""Run-folder checkpoints: the loop's state and either every step's seeds and projected gradients (ZO runs: a seed
checkpoint of kilobytes; resuming replays them from the base weights, on the device and dtype that drew the z) or
(backprop) the tuned layers as stored (weights + residuals), the best weights so far and the optimiser's buffers.

There is no RNG state to save: step seeds and batches are functions of (run seed, step).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import ZoliteError
from .io import atomic_path

FILE = "checkpoint.safetensors"


class CheckpointDevice(ZoliteError):
    """A seed checkpoint resumed on another device or dtype than the one that drew its z."""


def save_checkpoint(run_dir, masters: dict[str, torch.Tensor], best: dict[str, torch.Tensor] | None, state: dict) -> None:
    tensors = {f"master/{k}": v.detach().cpu().contiguous() for k, v in masters.items()}
    if best is not None:
        tensors.update({f"best/{k}": v.detach().cpu().contiguous() for k, v in best.items()})
    with atomic_path(Path(run_dir) / FILE) as tmp:
        save_file(tensors, tmp, metadata={"zolite.state": json.dumps(state)})


def load_checkpoint(run_dir) -> tuple[dict, dict | None, dict] | None:
    """(masters, best or None, state), or None when the folder has no checkpoint yet."""
    path = Path(run_dir) / FILE
    if not path.is_file():
        return None
    try:
        with safe_open(path, framework="pt") as f:
            state = json.loads(f.metadata()["zolite.state"])
            masters, best = {}, {}
            for key in f.keys():
                kind, _, name = key.partition("/")
                (masters if kind == "master" else best)[name] = f.get_tensor(key)
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise ZoliteError(f"{path} is unreadable ({e}); delete it to restart the run from scratch") from None
    return masters, (best or None), state
