"""Several patches on one loaded base: `swap(name)` makes one active in place, `reset()` restores the base exactly.

The base model's parameters are never written: a swap points each patched module at other tensors and a reset
points it back, so the base is bit-identical afterwards. Where a patch lives decides what a swap costs:
- `device`: its tensors resident on the model's device -> a swap only re-points (no copy);
- `pinned`: in pinned CPU memory -> copied (asynchronously) into one device buffer per tensor, shared by all
  non-resident patches;
- `disk`: memory-mapped from its safetensors file (nothing read until used) -> read and copied into that buffer.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from .errors import ZoliteError
from .patch import Patch, check_fits, fingerprint, load_patch
from .trajectory import is_trajectory, replay

PLACES = ("device", "pinned", "disk")


class PatchSet:
    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.base: dict[str, torch.nn.Parameter] = dict(model.named_parameters())
        self.owner = {}
        for module_name, module in model.named_modules():
            for attr, p in module.named_parameters(recurse=False):
                self.owner[f"{module_name}.{attr}" if module_name else attr] = (module, attr)
        self.patches: dict[str, dict] = {}
        self.buffers: dict[str, torch.nn.Parameter] = {}   # device buffers for pinned / disk patches
        self.active: str | None = None
        self._fingerprints: dict[tuple, str] = {}

    def _base_fingerprint(self, names) -> str:
        key = tuple(sorted(names))
        if key not in self._fingerprints:
            self._fingerprints[key] = fingerprint({n: self.base[n] for n in key})
        return self._fingerprints[key]

    def attach(self, name: str, patch: Patch | str | Path, where: str = "device") -> Patch:
        """Verify `patch` against the base and keep it under `name` (resident, pinned or on disk)."""
        if where not in PLACES:
            raise ZoliteError(f"unknown place '{where}' for a patch; choose one of {', '.join(PLACES)}")
        if not isinstance(patch, Patch):
            patch = load_patch(patch)
        if is_trajectory(patch):   # replayed on the base (whatever patch is active meanwhile is put back after)
            active = self.active
            self.reset()
            patch = replay(self.model, patch)
            self.swap(active)
            if where == "disk":
                raise ZoliteError(f"{patch.path} is a trajectory: keep it on the device or pinned (its replayed "
                                  "weights have no file to map), or convert it with zolite patch convert")
        check_fits(self.model, patch, base_sha256=self._base_fingerprint(patch.tensors))
        entry = {"patch": patch, "where": where, "names": sorted(patch.tensors)}
        if where == "device":
            entry["tensors"] = {n: torch.nn.Parameter(t.to(self.base[n].device, self.base[n].dtype), requires_grad=False)
                                for n, t in patch.tensors.items()}
        elif where == "pinned":
            pin = torch.cuda.is_available()
            entry["tensors"] = {n: (t.to(self.base[n].dtype).pin_memory() if pin else t.to(self.base[n].dtype))
                                for n, t in patch.tensors.items()}
        else:
            if patch.path is None:
                raise ZoliteError("a patch kept on disk needs its file; attach it by path")
            entry["path"] = str(patch.path)
        self.patches[name] = entry
        return patch

    def names(self) -> list[str]:
        return list(self.patches)

    @torch.no_grad()
    def swap(self, name: str | None) -> None:
        """Make patch `name` active (None: the base)."""
        if name is None:
            return self.reset()
        if name not in self.patches:
            raise ZoliteError(f"unknown patch '{name}'; attached: {', '.join(self.patches) or 'none'}")
        if name == self.active:
            return
        entry = self.patches[name]
        if self.active is not None:   # layers the new patch does not cover go back to the base
            for n in set(self.patches[self.active]["names"]) - set(entry["names"]):
                self._point(n, self.base[n])
        if entry["where"] == "device":
            for n, t in entry["tensors"].items():
                self._point(n, t)
        else:
            sources = entry.get("tensors")
            handle = None if sources is not None else safe_open(entry["path"], framework="pt")
            for n in entry["names"]:
                buf = self.buffers.get(n)
                if buf is None:
                    buf = self.buffers[n] = torch.nn.Parameter(torch.empty_like(self.base[n]), requires_grad=False)
                src = sources[n] if sources is not None else handle.get_tensor(n)
                buf.copy_(src, non_blocking=sources is not None)
                self._point(n, buf)
            if buf.device.type == "cuda":
                torch.cuda.current_stream(buf.device).synchronize()
        self.active = name

    def reset(self) -> None:
        """Every patched module back on the base's own tensors (untouched, so bit-exact)."""
        if self.active is not None:
            for n in self.patches[self.active]["names"]:
                self._point(n, self.base[n])
        self.active = None

    def _point(self, name: str, tensor: torch.nn.Parameter) -> None:
        module, attr = self.owner[name]
        module._parameters[attr] = tensor


def load_with_patches(model: str | None, patches: dict[str, str], *, where: str = "device", **load_options):
    """Read the patches (a bad one fails before the model loads), load the base with their layers unquantized,
    and attach them all. model None: the one named in the first patch. Returns (LoadedModel, PatchSet)."""
    from .loading import load_model

    if not patches:
        raise ZoliteError("no patches given; pass at least one NAME=PATH")
    read = {name: load_patch(path) for name, path in patches.items()}
    model = model or next(iter(read.values())).metadata.get("zolite.model")
    layers = sorted({i for p in read.values() for i in p.layers})
    loaded = load_model(model, keep_layers=layers, **load_options)
    patch_set = PatchSet(loaded.model)
    for name, patch in read.items():
        patch_set.attach(name, patch if where != "disk" else patches[name], where)
    return loaded, patch_set
