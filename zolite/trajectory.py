"""The second patch form: the seed trajectory of a plain MeZO run (kilobytes instead of a layer's megabytes).

Plain MeZO's update at step t is W <- W - lr (g_t z_t + wd W), with z_t regenerated from the step's seed, so the
seeds and projected gradients g_t up to the kept step (plus lr and wd) rebuild the tuned layer from the base.
Replayed where the run trained, it gives the dense patch bit for bit (zolite.dense_sha256 says which bits, and
replay checks them). z comes from the device type's own generator (CPU: mt19937; CUDA: Philox, whose element order
also depends on the GPU's SM count), so another device type or dtype is refused up front: it draws other z, not a
rounding variant. Another GPU model may draw the same z or not: the replay runs and the fingerprint decides.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .patch import Patch, save_patch


SCALE = "trajectory.scale/"   # + a tensor's full name: its measured activation scale (--eps-scale activation)


def save_trajectory(path, trajectory: list, metadata: dict, *, force: bool = False,
                    scales: dict[str, torch.Tensor] | None = None) -> Path:
    """trajectory: [(seed, g), ...] up to the kept step. g is kept in float64: the update's step is computed from
    it in double precision, and must be the same number on replay. scales: measured per-tensor scales of z."""
    seeds = torch.tensor([int(s) for s, _ in trajectory] or [0], dtype=torch.int64)
    grads = torch.tensor([float(g) for _, g in trajectory] or [0.0], dtype=torch.float64)
    meta = {**metadata, "zolite.kind": "trajectory", "zolite.trajectory_steps": str(len(trajectory))}
    tensors = {"trajectory.seeds": seeds, "trajectory.grads": grads}
    tensors.update({SCALE + k: v.detach().cpu().contiguous() for k, v in (scales or {}).items()})
    return save_patch(path, tensors, meta, dtype=None, force=force)


def trajectory_path(dense: Path) -> Path:
    """Where tune writes the trajectory beside its dense patch: patch.safetensors -> patch.trajectory.safetensors."""
    dense = Path(dense)
    return dense.with_name(dense.name.removesuffix(".safetensors") + ".trajectory.safetensors")


def device_descriptor(device: torch.device, dtype: torch.dtype) -> str:
    """What decides z and the update's arithmetic: device type, GPU model and SM count, dtype."""
    dtype = str(dtype).removeprefix("torch.")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"cuda/{props.name}/{props.multi_processor_count} SMs/{dtype}"
    return f"{device.type}/{dtype}"


def device_kind(descriptor: str | None) -> tuple[str, str] | None:
    """(device type, dtype) of a device_descriptor: where they differ, z differs for sure."""
    return (descriptor.split("/")[0], descriptor.split("/")[-1]) if descriptor else None


def is_trajectory(patch: Patch) -> bool:
    return patch.metadata.get("zolite.kind") == "trajectory"
