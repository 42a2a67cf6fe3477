"""`zolite export`: the base with a patch merged in, as a plain Hugging Face checkpoint (safetensors shards,
config, tokenizer) that transformers, vLLM or llama.cpp's converter load like any other model, or (format "gguf",
zolite.export_gguf) as one GGUF file for llama.cpp and Ollama. Verified by loading it back and comparing logits with
the patched model."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import ZoliteError
from .io import refuse_used_folder, umask

PROBE = "The quick brown fox jumps over the lazy dog. It was"


def export(model: str | None, patch, out, *, format: str = "hf", dtype: str = "float16", quant: str | None = None,
           force: bool = False, device=None) -> dict:
    """Write the patched model to `out`: format "hf", a merged checkpoint folder in `dtype`; format "gguf", one GGUF
    file (zolite.export_gguf; `quant`, default f16, is the tuned layer's encoding). Both atomic and verified."""
    if format == "gguf":
        from .export_gguf import export_gguf

        return export_gguf(model, patch, out, quant=quant or "f16", force=force)
    if format != "hf":
        raise ZoliteError(f"unknown export format '{format}'; choose hf or gguf")
    if quant is not None:
        raise ZoliteError("--quant is for --format gguf; a Hugging Face checkpoint takes --dtype")
    return _export_hf(model, patch, out, dtype=dtype, force=force, device=device)


def _export_hf(model: str | None, patch, out, *, dtype: str, force: bool, device) -> dict:
    """Write the merged checkpoint to `out` (atomically: a temporary folder renamed at the end)."""
    from transformers import AutoModelForCausalLM

    from .loading import load_model
    from .apply import apply_patch
    from .patch import load_patch

    out = Path(out)
    refuse_used_folder(out, force)   # a folder: config, tokenizer, shards
    p = load_patch(patch)
    model = model or p.metadata.get("zolite.model")
    loaded = load_model(model, device=device or "cpu", dtype=dtype, mode="fp16")
    apply_patch(loaded.model, p)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o777 & ~umask())   # mkdtemp makes it 0700; the export gets a normal folder's mode
    try:
        loaded.model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        (tmp / "zolite_patch.json").write_text(json.dumps({"base": model, **p.metadata}, indent=1) + "\n")
        ids = loaded.tokenizer(PROBE, return_tensors="pt")["input_ids"].to(loaded.device)
        back = AutoModelForCausalLM.from_pretrained(tmp, dtype=loaded.dtype).to(loaded.device).eval()
        with torch.inference_mode():
            diff = (back(ids).logits.float() - loaded.model(ids).logits.float()).abs().max().item()
        if diff != 0.0:
            raise ZoliteError(f"the exported checkpoint does not reproduce the patched model (max logit difference "
                              f"{diff:.3g}); nothing was written to {out}")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"out": str(out), "model": model, "patch": str(patch), "dtype": dtype, "max_logit_diff": diff,
            "files": sorted(f.name for f in out.iterdir())}
