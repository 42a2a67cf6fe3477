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
from .io import file_stamp
from .apply import replay
from .patch import Patch, check_fits, fingerprint, load_patch
from .trajectory import is_trajectory

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
        kind = patch.metadata.get("zolite.kind", "dense")   # as given (a trajectory is kept replayed, dense)
        if is_trajectory(patch):
            if where == "disk":
                raise ZoliteError(f"{patch.path} is a trajectory: keep it on the device or pinned (its replayed "
                                  "weights have no file to map), or convert it with zolite patch convert")
            active = self.active
            self.reset()   # replayed on the base; whatever patch was active is put back after
            try:
                patch = replay(self.model, patch)
            finally:
                self.swap(active)
        # the base's fingerprint over the names it has: check_fits reports unknown names and shapes first
        check_fits(self.model, patch, base_sha256=self._base_fingerprint([n for n in patch.tensors if n in self.base]))
        # the entry keeps the metadata only: the tensors live where `where` says (a disk patch holds no RAM)
        entry = {"patch": Patch({}, patch.metadata, patch.path), "where": where, "names": sorted(patch.tensors),
                 "kind": kind}
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
            entry["stamp"] = file_stamp(patch.path)   # the file checked now is the file each swap reads
        if name == self.active:   # replacing the active patch: back to the base first, so nothing stale is used
            self.reset()
        self.patches[name] = entry
        return patch

    def names(self) -> list[str]:
        return list(self.patches)

    @torch.no_grad()
    def swap(self, name: str | None) -> None:
        """Make patch `name` active (None: the base). If it fails midway, every module is back on the base."""
        if name is None:
            return self.reset()
        if name not in self.patches:
            raise ZoliteError(f"unknown patch '{name}'; attached: {', '.join(self.patches) or 'none'}")
        if name == self.active:
            return
        entry = self.patches[name]
        previous = self.patches[self.active]["names"] if self.active is not None else []
        self.active = None   # until the swap is complete
        try:
            for n in set(previous) - set(entry["names"]):   # layers the new patch does not cover: the base
                self._point(n, self.base[n])
            if entry["where"] == "device":
                for n, t in entry["tensors"].items():
                    self._point(n, t)
            elif entry["where"] == "pinned":
                self._copy_in(entry["names"], entry["tensors"].__getitem__, non_blocking=True)
            else:
                if file_stamp(entry["path"]) != entry["stamp"]:
                    raise ZoliteError(f"patch file {entry['path']} changed since it was attached (it was checked "
                                      f"against the base then); attach it again")
                with safe_open(entry["path"], framework="pt") as f:
                    self._copy_in(entry["names"], f.get_tensor, non_blocking=False)
        except Exception as e:
            for n in set(previous) | set(entry["names"]):
                self._point(n, self.base[n])
            if isinstance(e, ZoliteError):
                raise
            raise ZoliteError(f"patch '{name}' could not be swapped in ({type(e).__name__}: {e}); the base is "
                              "active") from None
        self.active = name

    def _copy_in(self, names, source, non_blocking: bool) -> None:
        """Copy a non-resident patch into the shared device buffers and point the modules at them."""
        for n in names:
            buf = self.buffers.get(n)
            if buf is None:
                buf = self.buffers[n] = torch.nn.Parameter(torch.empty_like(self.base[n]), requires_grad=False)
            src = source(n)
            if tuple(src.shape) != tuple(buf.shape):
                raise ZoliteError(f"{n} in the patch file has shape {tuple(src.shape)}, not {tuple(buf.shape)}: "
                                  "the file changed since it was attached")
            buf.copy_(src, non_blocking=non_blocking)
            self._point(n, buf)
        if names and self.buffers[names[0]].device.type == "cuda":
            torch.cuda.current_stream(self.buffers[names[0]].device).synchronize()

    def reset(self) -> None:
        """Every patched module back on the base's own tensors (untouched, so bit-exact)."""
        if self.active is not None:
            for n in self.patches[self.active]["names"]:
                self._point(n, self.base[n])
        self.active = None

    def _point(self, name: str, tensor: torch.nn.Parameter) -> None:
        module, attr = self.owner[name]
        module._parameters[attr] = tensor

    def can_route(self) -> bool:
        """Whether a batch can mix patches (RowRouter): every patch resident on the device, and every patched tensor
        held by a leaf module (a linear, a norm), whose rows do not mix."""
        return bool(self.patches) and all(
            e["where"] == "device" and not any(True for _ in self.owner[n][0].children())
            for e in self.patches.values() for n in e["names"])


class RowRouter:
    """One forward, each batch row through its own patch (None: the base), with no copy.

    Within `with RowRouter(patch_set) as router:`, `router.route(names)` (one name per batch row, before each
    forward) makes the most common patch of the batch active (a pointer swap), and each module a patch covers (a
    linear or a norm of the patched layer) runs once more on the rows that want other tensors there (another
    patch's, or the base's), writing over the output for those rows. The rest of the model runs once for the whole
    batch. A batch of one patch costs what it costs without the router. Needs `patch_set.can_route()`.
    """

    def __init__(self, patch_set: PatchSet):
        if not patch_set.can_route():
            raise ZoliteError("patches can share a batch only when every patch is resident on the device (--where "
                              "device)")
        self.patch_set, self.groups, self.handles = patch_set, {}, []

    def __enter__(self) -> "RowRouter":
        modules: dict[torch.nn.Module, dict[str, str]] = {}
        for entry in self.patch_set.patches.values():
            for name in entry["names"]:
                module, attr = self.patch_set.owner[name]
                modules.setdefault(module, {})[attr] = name
        self.handles = [m.register_forward_hook(self._hook(attrs)) for m, attrs in modules.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles, self.groups = [], {}
        self.patch_set.reset()

    def route(self, names: list[str | None], device) -> None:
        """The patch of each batch row, for the next forward."""
        rows: dict[str | None, list[int]] = {}
        for i, name in enumerate(names):
            rows.setdefault(name, []).append(i)
        most = max(rows, key=lambda n: len(rows[n]))
        self.patch_set.swap(most)
        self.groups = {name: torch.tensor(index, device=device) for name, index in rows.items() if name != most}

    def _hook(self, attrs: dict[str, str]):
        patches, base = self.patch_set.patches, self.patch_set.base

        def hook(module, args, output):
            for name, index in self.groups.items():
                tensors = patches[name]["tensors"] if name is not None else {}
                wanted = {attr: tensors.get(full, base[full]) for attr, full in attrs.items()}
                if all(module._parameters[attr] is t for attr, t in wanted.items()):
                    continue   # these rows want what the module holds now
                held = {attr: module._parameters[attr] for attr in wanted}
                try:
                    module._parameters.update(wanted)
                    output[index] = type(module).forward(module, args[0][index])   # (no hooks: not this one again)
                finally:
                    module._parameters.update(held)
            return output
        return hook


def load_with_patches(model: str | None, patches: dict[str, str], *, where: str = "device", **load_options):
    """Read the patches (a bad one fails before the model loads), load the base with their layers unquantized,
    and attach them all. model None: the one named in the first patch. Returns (LoadedModel, PatchSet)."""
    from .loading import load_model

    if not patches:
        raise ZoliteError("no patches given; pass at least one NAME=PATH")
    read = {name: load_patch(path) for name, path in patches.items()}
    model = model or next(iter(read.values())).metadata.get("zolite.model")
    # the Linears any patch changes stay unquantized, and only those: each layer keeps its own patches' --params
    params_of = {}
    for p in read.values():
        for i in p.layers:
            params_of.setdefault(i, []).append(p.unquantized_params)
    keep = {i: ",".join(params) if all(params) else None for i, params in params_of.items()}
    loaded = load_model(model, keep_layers=sorted(keep), keep_params=keep, **load_options)
    patch_set = PatchSet(loaded.model)
    for name, patch in read.items():
        patch_set.attach(name, patch, where)   # already read: a disk patch maps its file (patch.path) on each swap
    return loaded, patch_set
