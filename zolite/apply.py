"""Put a patch into a model: a dense patch's tensors are copied in place once it is checked to fit; a seed trajectory
is replayed into dense weights first. The one module where the patch formats (patch.py, trajectory.py) meet the ZO
step (zo.py), so neither format depends on it."""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import ZoliteError
from .io import refuse_clobber
from .loading import load_model
from .patch import Patch, check_fits, fingerprint, load_patch, save_patch
from .trajectory import SCALE, device_descriptor, device_kind, is_trajectory
from .zo import TunedLayers


@torch.no_grad()
def apply_patch(model: torch.nn.Module, patch: Patch | str | Path, *, verify: bool = True) -> Patch:
    """Check that `patch` fits `model`, then copy its tensors into the model's parameters in place.
    A trajectory patch is replayed into dense weights first."""
    if not isinstance(patch, Patch):
        patch = load_patch(patch)
    if is_trajectory(patch):
        patch = replay(model, patch)   # checks the base itself before replaying
    elif verify:
        check_fits(model, patch)
    params = dict(model.named_parameters())
    for name, t in patch.tensors.items():
        params[name].copy_(t.to(params[name].device, params[name].dtype))
    return patch


@torch.no_grad()
def replay(model: torch.nn.Module, patch: Patch) -> Patch:
    """The dense patch a trajectory stands for, computed on `model` (its base layers are restored exactly after)."""
    if not is_trajectory(patch):
        raise ZoliteError(f"{patch.path} is already a dense patch")
    hparams = patch.hparams
    steps = int(patch.metadata["zolite.trajectory_steps"])
    seeds = patch.tensors["trajectory.seeds"].tolist()[:steps]
    grads = patch.tensors["trajectory.grads"].tolist()[:steps]
    tuned = TunedLayers(model, patch.layers, hparams.get("eps_scale", "absolute"), hparams.get("params"))
    tuned.set_scales({k.removeprefix(SCALE): v for k, v in patch.tensors.items() if k.startswith(SCALE)})
    here = device_descriptor(tuned.params[0].device, tuned.params[0].dtype)
    trained_on = patch.metadata.get("zolite.trained_on")
    if device_kind(trained_on) != device_kind(here):
        raise ZoliteError(f"{patch.path} was trained on {trained_on}; its seeds give the same z only there (this "
                          f"is {here}): use the dense patch, or make one there: zolite patch convert {patch.path} --out "
                          f"DENSE.safetensors (on that device, --dtype {hparams.get('dtype', 'as trained')})")
    check_fits(model, Patch(tuned.weights(), patch.metadata, patch.path))   # the base, as for a dense patch
    saved = [p.detach().clone() for p in tuned.params]
    try:
        for seed, g in zip(seeds, grads):
            tuned.sgd_update(seed, g, hparams["lr"], hparams.get("weight_decay", 0.0))
        tensors = {k: v.detach().half().cpu() for k, v in tuned.state().items()}
    finally:
        for p, s in zip(tuned.params, saved):
            p.copy_(s)
    if fingerprint(tensors) != patch.metadata.get("zolite.dense_sha256"):
        raise ZoliteError(f"replaying {patch.path} did not reproduce its dense patch (fingerprint differs; trained "
                          f"on {trained_on}, replayed on {here}); use the dense patch")
    metadata = {k: v for k, v in patch.metadata.items() if k not in ("zolite.kind", "zolite.trajectory_steps")}
    metadata["zolite.kind"] = "dense"
    return Patch(tensors, metadata, patch.path)


def convert_to_dense(path, out, *, model: str | None = None, force: bool = False, device=None, dtype=None) -> Patch:
    """Replay the trajectory patch `path` on its base (`model`, else the one it names) and write the dense patch to
    `out`; returns the trajectory patch."""
    p = load_patch(path)
    if not is_trajectory(p):
        raise ZoliteError(f"{path} is already dense; a dense patch cannot be turned into seeds (tune writes the "
                          "trajectory beside the dense patch)")
    refuse_clobber(out, force)
    loaded = load_model(model or p.metadata.get("zolite.model"), device=device, dtype=dtype, keep_layers=p.layers,
                        keep_params=p.unquantized_params)
    dense = replay(loaded.model, p)
    save_patch(out, dense.tensors, dense.metadata, force=force)
    return p
