"""`zolite export --format gguf`: the patched model as one GGUF file, for llama.cpp, Ollama and LM Studio.

From a GGUF base (a profile's package file, a .gguf path, or a folder zolite converted from one) the source file is
copied tensor by tensor: the patch's tensors replace theirs, encoded as `quant` (F16 unless told otherwise; 1-D
tensors such as norms and biases in F32, as llama.cpp's converter keeps them), and every other tensor keeps its bytes
and its quantization. The metadata is the source's plus zolite.* keys saying what was patched.

From a Hugging Face folder the whole patched model is written in `quant`, for the architectures in HF_ARCHS with a
byte-level BPE tokenizer; anything else is refused with the reason.

Names: HF `model.layers.11.self_attn.q_proj.weight` <-> GGUF `blk.11.attn_q.weight`, through gguf-py's TensorNameMap.
Layout: llama.cpp stores the llama architecture's q_proj / k_proj rows permuted for its RoPE (convert_hf_to_gguf.py,
LlamaModel.permute) and transformers' GGUF loader undoes that on load, so a patch's q/k are permuted the same way
when written. qwen2 has no such permutation.

Nothing reaches `out` unverified: the file is written beside it under a temporary name, reloaded through transformers'
GGUF loader (every tensor zolite encoded must read back as encoded, exactly), its other tensors and its metadata
compared with the source's, and its logits on PROBES compared with the patched model's (as `zolite apply` loads it);
only then is it renamed into place.
"""
from __future__ import annotations

import functools
import gc
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .version import __version__
from .errors import ZoliteError
from .io import atomic_path, file_sha256, refuse_clobber

PROBES = ("The quick brown fox jumps over the lazy dog. It was",
          "Review: a gripping, beautifully acted film. Sentiment:",
          "Question: What is the capital of France?\nAnswer:",
          "def fibonacci(n):\n    if n < 2:\n        return")
CANDIDATE_QUANTS = ("f16", "f32", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
PATCHABLE_ARCHS = ("llama", "qwen2")   # GGUF architectures whose tensors transformers reads as stored, but for:
ROPE_PERMUTED = ("llama",)             # q/k rows permuted for llama.cpp's RoPE
HF_ARCHS = {"llama": "llama", "qwen2": "qwen2"}   # HF model_type -> GGUF architecture, for the whole-model writer


@functools.cache
def encodable_quants() -> tuple[str, ...]:
    """The --quant types this gguf-py can write (it reads every type, but writes only some)."""
    from gguf import GGMLQuantizationType, quants

    names = []
    for name in CANDIDATE_QUANTS:
        try:
            quants.quantize(np.zeros((1, 256), np.float32), GGMLQuantizationType[name.upper()])
        except (NotImplementedError, KeyError):
            continue
        names.append(name)
    return tuple(names)


def gguf_quant(name: str):
    """The GGML type `--quant NAME` asks for; a ZoliteError if gguf-py cannot encode it."""
    from gguf import GGMLQuantizationType

    key = str(name).lower()
    if key not in encodable_quants():
        why = ("gguf-py reads it but cannot encode it (llama.cpp's llama-quantize can, from an F16 export)"
               if key.upper() in GGMLQuantizationType.__members__ else "not a GGML type")
        raise ZoliteError(f"--quant {name}: {why}; choose one of {', '.join(encodable_quants())}")
    return GGMLQuantizationType[key.upper()]


def encode(values: np.ndarray, qtype) -> tuple[np.ndarray, object]:
    """(the tensor's bytes as gguf-py lays them out, the GGML type written): 1-D tensors (norms, biases) in F32 as
    llama.cpp keeps them; a matrix whose rows do not split into the type's blocks in F16."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

    if values.ndim == 1:
        qtype = GGMLQuantizationType.F32
    elif values.shape[-1] % GGML_QUANT_SIZES[qtype][0]:
        qtype = GGMLQuantizationType.F16
    return quants.quantize(np.ascontiguousarray(values, dtype=np.float32), qtype), qtype


def decode(data: np.ndarray, qtype) -> np.ndarray:
    from gguf import quants

    return quants.dequantize(data, qtype)


def rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row order of a llama q/k projection (convert_hf_to_gguf.py, LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of rope_permute (what transformers' GGUF loader applies)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class TensorNames:
    """HF parameter names -> GGUF tensor names for one architecture (gguf-py's TensorNameMap)."""

    def __init__(self, arch: str, n_blocks: int):
        import gguf

        archs = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}
        if arch not in archs:
            raise ZoliteError(f"gguf-py does not know the architecture '{arch}'; upgrade it (pip install -U gguf)")
        self.arch = arch
        self.map = gguf.get_tensor_name_map(archs[arch], n_blocks)

    def __call__(self, hf_name: str) -> str:
        name = self.map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ZoliteError(f"{hf_name} has no GGUF name for the {self.arch} architecture (gguf-py's TensorNameMap)")
        return name


@dataclass
class Layout:
    """How a HF tensor is stored in this GGUF: its name and, for llama's q/k, llama.cpp's row permutation."""
    names: TensorNames
    n_head: int
    n_head_kv: int

    def heads(self, gguf_name: str) -> int | None:
        if self.names.arch in ROPE_PERMUTED:
            if ".attn_q." in gguf_name:
                return self.n_head
            if ".attn_k." in gguf_name:
                return self.n_head_kv
        return None

    def to_gguf(self, gguf_name: str, values: np.ndarray) -> np.ndarray:
        heads = self.heads(gguf_name)
        return values if heads is None else rope_permute(values, heads)

    def to_hf(self, gguf_name: str, values: np.ndarray) -> np.ndarray:
        heads = self.heads(gguf_name)
        return values if heads is None else rope_unpermute(values, heads)


@dataclass
class Encoded:
    """One tensor zolite writes: its bytes, its GGML type, and its values as transformers will read them back."""
    gguf_name: str
    data: np.ndarray
    qtype: object
    readback: torch.Tensor     # HF layout, float32
    hf_name: str = ""


@dataclass
class Plan:
    """What goes into the file, in order: (GGUF name, source tensor to copy | Encoded)."""
    arch: str
    entries: list = field(default_factory=list)
    metadata: Callable | None = None   # writes the key/values into a GGUFWriter
    alignment: int | None = None


def encode_tensor(layout: Layout, hf_name: str, tensor: torch.Tensor, qtype) -> Encoded:
    name = layout.names(hf_name)
    stored = layout.to_gguf(name, tensor.detach().float().cpu().numpy())
    data, written = encode(stored, qtype)
    readback = torch.from_numpy(np.ascontiguousarray(layout.to_hf(name, decode(data, written).reshape(stored.shape))))
    return Encoded(name, data, written, readback, hf_name)


def export_gguf(model: str | None, patch, out, *, quant: str = "f16", force: bool = False,
                prompts: tuple[str, ...] = PROBES) -> dict:
    """Write the patched model to `out` as one GGUF file (atomically, verified first; see the module's docstring)."""
    from .loading import gguf_source, load_model
    from .apply import apply_patch
    from .patch import load_patch

    started = time.monotonic()
    out = Path(out)
    refuse_clobber(out, force)
    qtype = gguf_quant(quant)
    p = load_patch(patch)
    spec = model or p.metadata["zolite.model"]
    source = gguf_source(spec)
    notes = []
    source_sha256 = _check_source(source, p, model, notes) if source is not None else None
    loaded = load_model(spec, device="cpu", dtype="float32", mode="fp16")
    dense = apply_patch(loaded.model, p)   # refuses a patch made for another base
    if source is not None:
        plan = _plan_from_gguf(source, dense.tensors, qtype, p.metadata)
    else:
        plan = _plan_from_hf(loaded, qtype, notes)
    encoded = {e.hf_name: e for _, e in plan.entries if isinstance(e, Encoded)}

    # the reference: the patched model as `zolite apply` loads it, then with what the file stores for what zolite encodes
    ids = [loaded.tokenizer(text, return_tensors="pt")["input_ids"] for text in prompts]
    patched = _logits(loaded.model, ids)
    params = dict(loaded.model.named_parameters())
    with torch.no_grad():
        for hf_name, e in encoded.items():
            params[hf_name].copy_(e.readback)
    as_stored = _logits(loaded.model, ids)
    tokenizer, folder = loaded.tokenizer, loaded.path
    del loaded, params, dense
    gc.collect()

    meta = {"zolite.version": __version__, "zolite.task": p.metadata["zolite.task"],
            "zolite.base_sha256": p.metadata["zolite.base_sha256"], "zolite.layer": p.metadata["zolite.layer"],
            "zolite.model": p.metadata["zolite.model"], "zolite.quant": quant.lower()}
    if source_sha256:
        meta["zolite.source_sha256"] = source_sha256
    with atomic_path(out, suffix=".partial.gguf") as tmp:
        _write(Path(tmp), plan, meta)
        verified = _verify(Path(tmp), plan, encoded, source, ids, patched, as_stored, tokenizer, prompts)
    types = {}
    for e in encoded.values():
        types[e.qtype.name] = types.get(e.qtype.name, 0) + 1
    return {"out": str(out), "format": "gguf", "quant": quant.lower(), "model": spec, "patch": str(patch),
            "task": p.metadata["zolite.task"], "layers": p.layers,
            "source": str(source if source is not None else folder),
            "source_kind": "gguf" if source is not None else "hf",
            "bytes": out.stat().st_size, "source_bytes": source.stat().st_size if source is not None else None,
            "encoded": len(encoded), "encoded_types": types,
            "copied": sum(1 for _, t in plan.entries if not isinstance(t, Encoded)),
            "verify": verified, "notes": notes, "seconds": round(time.monotonic() - started, 1)}


def _check_source(source: Path, p, model: str | None, notes: list) -> str:
    """The source GGUF's SHA-256, refused when the patch recorded another one."""
    if not source.is_file():
        raise ZoliteError(f"the base's GGUF file {source} is missing; restore it or pass --model")
    current = file_sha256(source)
    recorded = p.metadata.get("zolite.source_sha256")
    if recorded is None:
        notes.append("the patch does not record its GGUF source's SHA-256 (made by an older zolite): only the tuned "
                     "layer's fingerprint was checked against this base")
    elif recorded != current:
        where = p.path or "the patch"
        if model is not None and model != p.metadata["zolite.model"]:
            raise ZoliteError(f"{where} was tuned from another GGUF file (SHA-256 {recorded[:12]}...), not {source} "
                              f"({current[:12]}...); export it with --model {p.metadata['zolite.model']}")
        raise ZoliteError(f"{source} has changed since {where} was made (SHA-256 {current[:12]}... now, "
                          f"{recorded[:12]}... when tuned); export from the file it was tuned on")
    return current


def _plan_from_gguf(source: Path, tensors: dict[str, torch.Tensor], qtype, patch_meta: dict) -> Plan:
    """The source's tensors in its order, the patch's replaced by their encodings."""
    reader = _reader(source)
    arch = reader.get_field("general.architecture").contents()
    if arch not in PATCHABLE_ARCHS:
        raise ZoliteError(f"exporting a patched {arch} GGUF is not supported (supported: {', '.join(PATCHABLE_ARCHS)}); "
                          "export a Hugging Face checkpoint with --format hf instead")
    field_ = functools.partial(_field, reader)
    layout = Layout(TensorNames(arch, field_(f"{arch}.block_count")), field_(f"{arch}.attention.head_count"),
                    field_(f"{arch}.attention.head_count_kv", field_(f"{arch}.attention.head_count")))
    by_name = {t.name: t for t in reader.tensors}
    replaced = {}
    for hf_name, tensor in tensors.items():
        e = encode_tensor(layout, hf_name, tensor, qtype)
        src = by_name.get(e.gguf_name)
        shape = tuple(reversed([int(n) for n in src.shape])) if src is not None else None
        if src is None or shape != tuple(tensor.shape):
            raise ZoliteError(f"{source} has no tensor {e.gguf_name} of shape {tuple(tensor.shape)} for the patch's "
                              f"{hf_name} (made for {patch_meta['zolite.model']}); is the patch for another model?")
        replaced[e.gguf_name] = e
    plan = Plan(arch, [(t.name, replaced.get(t.name, t)) for t in reader.tensors],
                alignment=_field(reader, "general.alignment", None))
    plan.metadata = functools.partial(_copy_metadata, reader)
    return plan


def _reader(path: Path):
    from gguf import GGUFReader

    try:
        return GGUFReader(path, "r")
    except (ValueError, OSError) as e:
        raise ZoliteError(f"{path} could not be read as a GGUF file ({str(e).splitlines()[0][:160]})") from None


def _field(reader, key: str, default=...):
    f = reader.get_field(key)
    if f is None:
        if default is ...:
            raise ZoliteError(f"the GGUF file has no {key}; it is not a complete model file")
        return default
    return f.contents()


def _copy_metadata(reader, writer) -> None:
    """Every key of the source but the ones GGUFWriter writes itself and an earlier export's zolite.* keys."""
    from gguf import GGUFValueType

    for f in reader.fields.values():
        if f.name == "general.architecture" or f.name.startswith(("GGUF.", "zolite.")):
            continue
        sub_type = f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(f.name, f.contents(), f.types[0], sub_type=sub_type)


def _write(path: Path, plan: Plan, meta: dict[str, str]) -> None:
    from gguf import GGUFWriter

    writer = GGUFWriter(path, arch=plan.arch)
    if plan.alignment is not None:
        writer.data_alignment = plan.alignment
    plan.metadata(writer)
    for key, value in meta.items():
        writer.add_string(key, value)
    for name, t in plan.entries:
        if isinstance(t, Encoded):
            writer.add_tensor_info(name, t.data.shape, t.data.dtype, t.data.nbytes, raw_dtype=t.qtype)
        else:
            writer.add_tensor_info(name, t.data.shape, t.data.dtype, t.data.nbytes, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, t in plan.entries:
        writer.write_tensor_data(t.data)
    writer.close()


def _logits(model, ids: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [model(x.to(model.device), use_cache=False).logits[0].float().cpu() for x in ids]


def _verify(path: Path, plan: Plan, encoded: dict[str, Encoded], source: Path | None, ids, patched, as_stored,
            tokenizer, prompts) -> dict:
    """Reload `path` through transformers' GGUF loader and check it; a ZoliteError (and no file) when it fails."""
    import logging

    from transformers import AutoModelForCausalLM

    result = {}
    if source is not None:   # the tensors and metadata zolite did not touch are the source's
        src, new = _reader(source), _reader(path)
        new_tensors = {t.name: t for t in new.tensors}
        written = {e.gguf_name for e in encoded.values()}
        same = 0
        for t in src.tensors:
            if t.name in written:
                continue
            o = new_tensors[t.name]
            if o.tensor_type != t.tensor_type or not np.array_equal(o.data, t.data):
                raise ZoliteError(f"verification failed: {t.name} is not the source's byte for byte; nothing written")
            same += 1
        for f in src.fields.values():
            if not f.name.startswith(("GGUF.", "zolite.")) and (new.get_field(f.name) is None or
                                                               new.get_field(f.name).contents() != f.contents()):
                raise ZoliteError(f"verification failed: metadata {f.name} differs from the source's; nothing written")
        result["untouched_identical"] = same
        del src, new, new_tensors
    started = time.monotonic()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    except Exception as e:   # noqa: BLE001 - any failure here is the file's
        raise ZoliteError(f"verification failed: transformers cannot load the written GGUF ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:160]}); nothing written") from None
    result["reload_s"] = round(time.monotonic() - started, 1)
    params = back.state_dict()
    worst = 0.0
    for hf_name, e in encoded.items():
        got = params.get(hf_name)
        if got is None or got.shape != e.readback.shape:
            raise ZoliteError(f"verification failed: {hf_name} does not read back from the GGUF; nothing written")
        worst = max(worst, (got.float() - e.readback).abs().max().item())
    if worst != 0.0:
        raise ZoliteError(f"verification failed: the encoded tensors read back {worst:.3g} off what was written "
                          "(name or layout mapping); nothing written")
    result["encoded_exact"] = len(encoded)
    back_logits = _logits(back, ids)
    if not all(torch.isfinite(x).all() for x in back_logits):
        raise ZoliteError("verification failed: the written model's logits are not finite; nothing written")
    result["max_logit_diff"] = max((a - b).abs().max().item() for a, b in zip(back_logits, patched))
    result["max_logit_diff_as_stored"] = max((a - b).abs().max().item() for a, b in zip(back_logits, as_stored))
    result["encoding_logit_diff"] = max((a - b).abs().max().item() for a, b in zip(as_stored, patched))
    agree = [(a.argmax(-1) == b.argmax(-1)) for a, b in zip(back_logits, patched)]
    result["top1_agreement"] = round(float(torch.cat(agree).float().mean()), 4)
    result["prompts"] = len(ids)
    result["tokens"] = int(sum(x.shape[-1] for x in ids))
    result["logit_scale"] = max(x.abs().max().item() for x in patched)
    if source is None:
        result["tokenizer_match"] = _tokenizer_matches(path, tokenizer, prompts)
    return result


def _tokenizer_matches(path: Path, tokenizer, prompts) -> bool:
    from transformers import AutoTokenizer

    back = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return all(back(t)["input_ids"] == tokenizer(t)["input_ids"] for t in prompts)


# --- a Hugging Face folder: the whole model ---

def _plan_from_hf(loaded, qtype, notes: list) -> Plan:
    config, tokenizer = loaded.model.config, loaded.tokenizer
    arch = HF_ARCHS.get(config.model_type)
    if arch is None:
        raise ZoliteError(f"exporting a {config.model_type} model from a Hugging Face folder as GGUF is not supported "
                          f"(supported: {', '.join(HF_ARCHS)}); use --format hf, then llama.cpp's convert_hf_to_gguf.py")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ZoliteError(f"exporting a model with {rope['rope_type']} RoPE scaling as GGUF is not supported; "
                          "use --format hf, then llama.cpp's convert_hf_to_gguf.py")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim * config.num_attention_heads != config.hidden_size or \
            (arch == "llama" and (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False))):
        raise ZoliteError(f"this {arch} model's attention layout (head_dim {head_dim}, biases) is not one the GGUF "
                          "writer supports; use --format hf, then llama.cpp's convert_hf_to_gguf.py")
    vocab = _bpe_vocab(tokenizer, config, notes)
    layout = Layout(TensorNames(arch, config.num_hidden_layers), config.num_attention_heads,
                    config.num_key_value_heads)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    entries = []
    for hf_name, tensor in loaded.model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        e = encode_tensor(layout, hf_name, tensor, qtype)
        entries.append((e.gguf_name, e))

    def metadata(writer):
        import gguf

        writer.add_name(Path(str(config.name_or_path)).name or arch)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
        writer.add_rope_dimension_count(head_dim)
        writer.add_vocab_size(config.vocab_size)
        file_type = getattr(gguf.LlamaFileType, f"MOSTLY_{qtype.name}", gguf.LlamaFileType.ALL_F32)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(vocab["pre"])
        writer.add_token_list(vocab["tokens"])
        writer.add_token_types(vocab["types"])
        writer.add_token_merges(vocab["merges"])
        for key, token_id in vocab["special"].items():
            getattr(writer, f"add_{key}_token_id")(token_id)
        writer.add_add_bos_token(vocab["add_bos"])
        if vocab["chat_template"]:
            writer.add_chat_template(vocab["chat_template"])

    return Plan(arch, entries, metadata)


def _bpe_vocab(tokenizer, config, notes: list) -> dict:
    """llama.cpp's 'gpt2' (byte-level BPE) tokenizer keys from a fast tokenizer; a ZoliteError for any other kind."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model") or {}
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if model.get("type") != "BPE" or not any(s.get("type") == "ByteLevel" for s in steps):
        kind = model.get("type") or type(tokenizer).__name__
        raise ZoliteError(f"exporting this tokenizer ({kind}, not byte-level BPE) as GGUF is not supported; use "
                          "--format hf, then llama.cpp's convert_hf_to_gguf.py")
    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    if sorted(by_id) != list(range(len(by_id))):
        raise ZoliteError("the tokenizer's ids are not contiguous; exporting it as GGUF is not supported")
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    for i in range(max(len(by_id), config.vocab_size)):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if i in added and added[i].special else
                         gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL)
        else:   # the embedding has rows past the tokenizer's vocabulary: llama.cpp's converter pads them so
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    special = {key: getattr(tokenizer, f"{attr}_token_id") for key, attr in
               (("bos", "bos"), ("eos", "eos"), ("unk", "unk"), ("pad", "pad"))}
    name = _pre_tokenizer(steps)
    if name is None:
        name = "default"
        notes.append("the tokenizer's pre-tokenizer is not one llama.cpp names: wrote tokenizer.ggml.pre 'default', "
                     "so llama.cpp may split some text differently from transformers")
    template = getattr(tokenizer, "chat_template", None)
    return {"pre": name, "tokens": tokens, "types": types, "merges": merges,
            "special": {k: v for k, v in special.items() if v is not None},
            "add_bos": bool(getattr(tokenizer, "add_bos_token", False)),
            "chat_template": template if isinstance(template, str) else None}


def _pre_tokenizer(steps: list[dict]) -> str | None:
    """llama.cpp's name (tokenizer.ggml.pre) for a byte-level BPE pre-tokenizer, from its tokenizer.json steps."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    kinds = [s.get("type") for s in steps]
    byte_level = steps[-1] if kinds and kinds[-1] == "ByteLevel" else {}
    if kinds == ["ByteLevel"] and byte_level.get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and byte_level.get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not byte_level.get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        for name in ("qwen2", "llama-bpe"):
            if GGUF_PRE_TOKENIZER_SPLITS.get(name) == regex:
                return name
    return None


# --- llama.cpp, when it is installed ---

def llama_cpp_check(path, model: str, patch, prompt: str, max_tokens: int = 16) -> dict | None:
    """Run the GGUF at `path` through llama.cpp (llama-cpp-python; None when it is not installed): its next-token
    logits on the patched model's token ids for `prompt` against the patched model's (transformers, as `zolite apply`
    loads `model` + `patch`), and a greedy completion with its speed."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    from .loading import load_model
    from .apply import apply_patch

    loaded = load_model(model, device="cpu", dtype="float32", mode="fp16")
    apply_patch(loaded.model, patch)
    ids = loaded.tokenizer(prompt)["input_ids"]
    expected = _logits(loaded.model, [torch.tensor([ids])])[0]
    del loaded
    gc.collect()
    llm = Llama(model_path=str(path), n_ctx=256, n_threads=2, logits_all=True, verbose=False)
    llm.eval(ids)
    got = torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32))
    llm.reset()
    started = time.monotonic()
    out = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0)
    seconds = time.monotonic() - started
    llm.close() if hasattr(llm, "close") else None
    return {"max_logit_diff": (got - expected).abs().max().item(),
            "top1_agreement": round(float((got.argmax(-1) == expected.argmax(-1)).float().mean()), 4),
            "tokens": len(ids), "completion": out["choices"][0]["text"],
            "tokens_per_s": out["usage"]["completion_tokens"] / seconds}
