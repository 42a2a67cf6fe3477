"""The patch file: the tuned layers' weights as safetensors, with metadata naming the base they fit.

Tensors are stored under their full names in the base model (`model.layers.12.self_attn.q_proj.weight`), so a
patch is a partial state dict; `zolite.base_sha256` is the SHA-256 of the same tensors in the base model, in
fp16, so a patch is refused by a base whose tuned layers differ (the rest of the base is not hashed: `zolite.model`
names it).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from .version import __version__
from .errors import ZoliteError
from .layers import parse_params
from .loading import QUANT_MODES
from .io import atomic_path, refuse_clobber

FORMAT = "zolite-patch/1"


@dataclass
class Patch:
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    path: Path | None = None

    @property
    def layers(self) -> list[int]:
        return [int(i) for i in self.metadata["zolite.layer"].split(",")]

    @property
    def unquantized_params(self) -> str | None:
        """The --params whose Linears stay unquantized when the patch goes onto a quantized base, as in its run (None:
        every Linear of its layers)."""
        return None if whole_layers_kept(self.hparams) else self.hparams.get("params")

    @property
    def task(self) -> str | None:
        return self.metadata.get("zolite.task")

    @property
    def hparams(self) -> dict:
        """The tune options of the run that made the patch."""
        return json.loads(self.metadata.get("zolite.hparams", "{}"))

    def task_options(self) -> dict:
        """A custom task's template options, as the run that made the patch had them (a TOML task's from the
        patch's zolite.task_spec: the TOML file may have changed or gone since)."""
        spec = json.loads(self.metadata.get("zolite.task_spec", "null"))
        if spec:
            return {"template": spec["template"], "candidates": ",".join(spec["candidates"]) or None,
                    "label_field": spec["label_field"], "answer_field": spec["answer_field"]}
        hparams = self.hparams
        return {k: hparams.get(k) for k in ("template", "candidates", "label_field", "answer_field")}


def whole_layers_kept(hparams: dict) -> bool:
    """Whether a run (its config, or a patch's hparams) kept every Linear of its layers unquantized: as recorded, else
    (zolite before 2026-12-06) where --params chose a subset of a quantized run's layers."""
    if "keep_whole_layers" in hparams:
        return bool(hparams["keep_whole_layers"])
    return bool(parse_params(hparams.get("params"))) and hparams.get("mode") in QUANT_MODES


def fingerprint(tensors: dict[str, torch.Tensor], *, as_stored: bool = False) -> str:
    """SHA-256 over the names and fp16 bytes of `tensors` (sorted by name); as_stored: over their bytes as they are
    (what a seed checkpoint's replay must rebuild, bit for bit)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        t = tensors[name].detach().cpu()
        t = (t if as_stored else t.to(torch.float16)).contiguous()
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_patch(path, tensors: dict[str, torch.Tensor], metadata: dict[str, object], *,
               dtype: torch.dtype | None = torch.float16, force: bool = False) -> Path:
    """Write the patch atomically (tensors cast to `dtype`; None keeps theirs); refuse to overwrite unless force."""
    refuse_clobber(path, force)
    meta = {"zolite.kind": "dense", **{k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()},
            "zolite.format": FORMAT, "zolite.version": __version__}   # format and version are this writer's
    if dtype is not None:
        meta["zolite.dtype"] = str(dtype).removeprefix("torch.")
    cpu = {name: t.detach().to("cpu", dtype or t.dtype).contiguous() for name, t in tensors.items()}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(_sorted_header(save(cpu, metadata=meta)))
    return Path(path)


def _sorted_header(blob: bytes) -> bytes:
    """safetensors writes its header keys in hash order; sort them so the same patch is the same bytes."""
    n = int.from_bytes(blob[:8], "little")
    header = json.dumps(json.loads(blob[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)   # the data must stay 8-byte aligned
    return len(header).to_bytes(8, "little") + header + blob[8 + n:]


def load_patch(path) -> Patch:
    """Read and check a patch file; a clear error if it is missing, corrupt or not a zolite patch."""
    path = Path(path)
    if not path.is_file():
        raise ZoliteError(f"patch file {path} does not exist" if not path.exists() else f"{path} is not a patch file")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ZoliteError(f"{path} is not a readable safetensors patch ({str(e).splitlines()[0]}); "
                          "re-create it with zolite tune") from None
    if metadata.get("zolite.format") != FORMAT:
        raise ZoliteError(f"{path} is not a zolite patch (format {metadata.get('zolite.format')!r}, "
                          f"expected {FORMAT!r})")
    needed = ("zolite.model", "zolite.task", "zolite.layer", "zolite.base_sha256", "zolite.arch")
    missing = [k for k in needed if k not in metadata]
    if missing or not tensors:
        raise ZoliteError(f"{path} is an incomplete zolite patch (missing {', '.join(missing) or 'tensors'})")
    if not re.fullmatch(r"\d+(,\d+)*", metadata["zolite.layer"]):
        raise ZoliteError(f"{path} has a broken zolite.layer ({metadata['zolite.layer']!r}, expected e.g. 11 or 3,5); "
                          "re-create it with zolite tune")
    return Patch(tensors, metadata, path)


def patch_summary(path) -> dict:
    """What `zolite patch info` shows: kind, size, the base it fits (model, arch, layers, fingerprint), task, steps
    and all its metadata."""
    p = load_patch(path)
    return {"file": str(path), "bytes": Path(path).stat().st_size, "kind": p.metadata.get("zolite.kind", "dense"),
            "model": p.metadata.get("zolite.model"), "arch": p.metadata.get("zolite.arch"),
            "layers": p.metadata.get("zolite.layer"), "base_sha256": p.metadata.get("zolite.base_sha256"),
            "task": p.metadata.get("zolite.task"), "steps": p.metadata.get("zolite.steps"),
            "tensors": len(p.tensors), "metadata": p.metadata}


def base_tensors(model: torch.nn.Module, names) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {name: params[name] for name in names if name in params}


def check_fits(model: torch.nn.Module, patch: Patch, base_sha256: str | None = None) -> None:
    """Refuse a patch made for another architecture, layer layout or base model."""
    where = patch.path or "patch"
    arch = model.config.model_type
    if patch.metadata["zolite.arch"] != arch:
        raise ZoliteError(f"{where} was made for a {patch.metadata['zolite.arch']} model, not this {arch} model "
                          f"({patch.metadata.get('zolite.model', '?')}); pass --model {patch.metadata.get('zolite.model', '...')}")
    params = dict(model.named_parameters())
    for name, t in patch.tensors.items():
        if name not in params:
            raise ZoliteError(f"{where} holds {name}, which this model does not have "
                              f"(made for {patch.metadata.get('zolite.model', '?')}, layer {patch.metadata['zolite.layer']})")
        if tuple(params[name].shape) != tuple(t.shape):
            raise ZoliteError(f"{where}: {name} has shape {tuple(t.shape)} but the model's is "
                              f"{tuple(params[name].shape)}; the patch is for another model")
    if base_sha256 is None:
        base_sha256 = fingerprint(base_tensors(model, patch.tensors))
    if base_sha256 != patch.metadata["zolite.base_sha256"]:
        loaded_in = {str(params[name].dtype).removeprefix("torch.") for name in patch.tensors}
        tuned_in = patch.hparams.get("dtype")
        if loaded_in == {"bfloat16"} and tuned_in != "bfloat16":   # the likely cause: rounding, not another model
            raise ZoliteError(f"{where} does not match this base as loaded in bfloat16 (layer "
                              f"{patch.metadata['zolite.layer']} fingerprint differs: bfloat16 rounds the weights it "
                              f"was tuned from); load the base with --dtype float32 or float16")
        raise ZoliteError(f"{where} was tuned from another base (layer {patch.metadata['zolite.layer']} fingerprint "
                          f"differs; made for {patch.metadata.get('zolite.model', '?')}); apply it to that base model")
