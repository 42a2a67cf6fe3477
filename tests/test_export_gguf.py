"""`zolite export --format gguf`: a GGUF base copied with the patch's tensors re-encoded, a Hugging Face folder written
whole, the llama q/k permutation, the verification and the refusals. Tiny random Llama and Qwen2 models built here;
their GGUF files are written by the HF-folder path (with quantized tensors, Q4_1, so that copying them byte for byte
means something)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import zolite
from conftest import build_tiny_qwen2, run_cli
from test_errors import assert_user_error
from zolite.errors import ZoliteError
from zolite.export_gguf import encodable_quants, gguf_quant, rope_permute, rope_unpermute
from zolite.patch import base_tensors, fingerprint, load_patch, save_patch

PROMPT = "the film was a gripping"


def hand_patch(spec: str, layer: int, out: Path, scale: float = 0.3, seed: int = 0) -> Path:
    """A patch for `spec`'s layer made without tuning: its weights moved by noise (and no zolite.source_sha256, as an
    older zolite wrote)."""
    loaded = zolite.load_model(spec, device="cpu", dtype="float32")
    names = [n for n, _ in loaded.model.named_parameters() if n.startswith(f"model.layers.{layer}.")]
    base = base_tensors(loaded.model, names)
    g = torch.Generator().manual_seed(seed)
    tuned = {n: t + scale * t.abs().mean() * torch.randn(t.shape, generator=g) for n, t in base.items()}
    return save_patch(out, tuned, {"zolite.model": spec, "zolite.arch": loaded.model.config.model_type,
                                   "zolite.layer": str(layer), "zolite.base_sha256": fingerprint(base),
                                   "zolite.task": "sst2"}, force=True)


@pytest.fixture(scope="module")
def bases(tiny_model, small_data, tmp_path_factory):
    """{arch: {"hf", "gguf", "whole", "patch"}}: a tiny HF folder, its GGUF (Q4_1 matrices, written by the HF-folder
    path; `whole` is that export's result) and a patch tuned on that GGUF (so it records the file's SHA-256)."""
    root = tmp_path_factory.mktemp("gguf-bases")
    out = {}
    with pytest.MonkeyPatch.context() as mp:   # module scope: isolated_cache has not run yet
        mp.setenv("ZOLITE_CACHE", str(root / "cache"))
        for arch, folder in (("llama", tiny_model), ("qwen2", str(build_tiny_qwen2(root / "qwen2", seed=2, hidden=64, bias_std=0.5, tokenizer_from=tiny_model)))):
            seed_patch = hand_patch(folder, 0, root / f"{arch}-seed.safetensors")
            source = root / f"{arch}.gguf"
            whole = zolite.export(None, seed_patch, source, format="gguf", quant="q4_1")
            zolite.tune(str(source), "sst2", data=small_data, run_dir=root / f"{arch}-run", layer="1", steps=2,
                        eval_every=0, batch_size=2, lr=0.5, eps=0.05, progress=False)
            out[arch] = {"hf": folder, "gguf": source, "whole": whole, "patch": root / f"{arch}-run" / "patch.safetensors"}
    return out


def _patched_logits(spec, patch):
    loaded = zolite.load_model(str(spec), device="cpu", dtype="float32")
    zolite.apply_patch(loaded.model, patch)
    ids = loaded.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        return loaded.model(ids).logits[0], ids


def _gguf_logits(path: Path, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    with torch.inference_mode():
        return model(ids).logits[0], model


def test_rope_permutation_is_llama_cpps_and_transformers_undoes_it():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.arange(8 * 64 * 3, dtype=np.float32).reshape(8 * 64, 3)   # 8 heads of 64 rows
    stored = rope_permute(w, 8)
    assert not np.array_equal(stored, w)
    # llama.cpp's order: within each head, the first half's rows interleaved with the second half's
    head = stored[:64, 0] // 3
    assert list(head[:4]) == [0, 32, 1, 33]
    assert np.array_equal(LlamaTensorProcessor()._reverse_permute_weights(stored, 8, 8), w)
    assert np.array_equal(rope_unpermute(stored, 8), w)
    kv = rope_permute(w[:2 * 64], 2)   # k: permuted per key/value head
    assert np.array_equal(LlamaTensorProcessor()._reverse_permute_weights(kv, 8, 2), w[:2 * 64])


def test_quant_types_gguf_py_can_encode():
    assert {"f16", "q8_0", "q4_0"} <= set(encodable_quants())
    assert gguf_quant("Q8_0") == gguf.GGMLQuantizationType.Q8_0
    with pytest.raises(ZoliteError, match="q4_k: gguf-py reads it but cannot encode it"):
        gguf_quant("q4_k")
    with pytest.raises(ZoliteError, match="not a GGML type"):
        gguf_quant("int3")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_base_keeps_untouched_tensors_and_writes_the_patch(bases, arch, tmp_path):
    base = bases[arch]
    patch = load_patch(base["patch"])
    assert patch.metadata["zolite.source_sha256"] == zolite.io.file_sha256(base["gguf"])   # recorded by tune
    out = tmp_path / "tuned.gguf"
    result = run_cli("export", "--patch", base["patch"], "--format", "gguf", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{"):])
    assert summary["source_kind"] == "gguf" and summary["notes"] == []

    src, new = gguf.GGUFReader(base["gguf"]), gguf.GGUFReader(out)
    new_tensors = {t.name: t for t in new.tensors}
    assert [t.name for t in new.tensors] == [t.name for t in src.tensors]
    tuned = {t.name for t in src.tensors if t.name.startswith("blk.1.")}
    for t in src.tensors:   # untouched: the same bytes, the same quantization
        o = new_tensors[t.name]
        if t.name in tuned:
            assert o.tensor_type == (gguf.GGMLQuantizationType.F16 if len(o.shape) == 2 else
                                     gguf.GGMLQuantizationType.F32), t.name
        else:
            assert o.tensor_type == t.tensor_type and np.array_equal(o.data, t.data), t.name
    assert {t.tensor_type for t in src.tensors if len(t.shape) == 2} == {gguf.GGMLQuantizationType.Q4_1}
    assert summary["copied"] == len(src.tensors) - len(tuned) == summary["verify"]["untouched_identical"]

    # on disk in llama.cpp's layout: q/k rows permuted for llama only
    q = new_tensors["blk.1.attn_q.weight"].data.astype(np.float32)
    q_hf = patch.tensors["model.layers.1.self_attn.q_proj.weight"].float().numpy()
    heads = int(new.get_field(f"{arch}.attention.head_count").contents())
    assert np.array_equal(q, rope_permute(q_hf, heads) if arch == "llama" else q_hf)
    if arch == "qwen2":
        bias = new_tensors["blk.1.attn_k.bias"]
        assert bias.tensor_type == gguf.GGMLQuantizationType.F32
        assert np.array_equal(bias.data, patch.tensors["model.layers.1.self_attn.k_proj.bias"].float().numpy())

    # metadata: the source's, plus what was patched
    for f in src.fields.values():   # (this source is itself an export: its zolite.* keys are replaced)
        if not f.name.startswith(("GGUF.", "zolite.")):
            assert new.get_field(f.name).contents() == f.contents(), f.name
    meta = {k: new.get_field(k).contents() for k in new.fields if k.startswith("zolite.")}
    assert meta["zolite.task"] == "sst2" and meta["zolite.version"] == zolite.__version__
    assert meta["zolite.base_sha256"] == patch.metadata["zolite.base_sha256"] and meta["zolite.layer"] == "1"
    assert meta["zolite.source_sha256"] == patch.metadata["zolite.source_sha256"]

    # reloaded by transformers: the patch's tensors exactly; logits as the patched model's (zolite apply)
    expected, ids = _patched_logits(base["gguf"], base["patch"])
    logits, model = _gguf_logits(out, ids)
    params = dict(model.named_parameters())
    for name, t in patch.tensors.items():
        assert torch.equal(params[name], t.float()), name
    # the only difference left: the converted base (apply's) rounds the de-quantized frozen weights to fp16
    assert (logits - expected).abs().max().item() < 1e-3
    assert summary["verify"]["max_logit_diff"] < 1e-3 and summary["verify"]["encoding_logit_diff"] == 0.0


def test_quant_re_encodes_the_tuned_layer(bases, tmp_path):
    base = bases["llama"]
    summary = zolite.export(None, base["patch"], tmp_path / "q8.gguf", format="gguf", quant="q8_0")
    assert summary["encoded_types"] == {"Q8_0": 7, "F32": 2}
    # Q8_0 rows of 32 weights: 34 bytes against F16's 64
    q8 = {t.name: t.n_bytes for t in gguf.GGUFReader(tmp_path / "q8.gguf").tensors}
    assert q8["blk.1.attn_q.weight"] == 32 * 34 and q8["blk.1.attn_norm.weight"] == 32 * 4
    v = summary["verify"]
    assert 0 < v["encoding_logit_diff"] < 0.05 and v["max_logit_diff_as_stored"] < 1e-3
    assert v["encoded_exact"] == 9 and v["untouched_identical"] == summary["copied"] == 29


def test_hf_folder_is_written_whole(bases, tmp_path):
    for arch in ("llama", "qwen2"):   # the fixture's Q4_1 exports of the HF folders
        whole = bases[arch]["whole"]
        assert whole["source_kind"] == "hf" and whole["copied"] == 0 and whole["encoded_types"]["Q4_1"] > 0
        v = whole["verify"]
        assert v["tokenizer_match"] and v["max_logit_diff_as_stored"] < 1e-4   # Q4_1 itself moves these flat logits
        reader = gguf.GGUFReader(bases[arch]["gguf"])
        assert reader.get_field("general.architecture").contents() == arch
        assert reader.get_field("tokenizer.ggml.model").contents() == "gpt2"
        # the llama folder's tokenizer splits with GPT-2's regex, transformers' Qwen2 tokenizer with Qwen2's
        assert reader.get_field("tokenizer.ggml.pre").contents() == {"llama": "gpt-2", "qwen2": "qwen2"}[arch]
        assert "output.weight" not in {t.name for t in reader.tensors}   # tied embeddings
    folder = bases["llama"]["hf"]   # and in F16, checked independently
    patch = hand_patch(folder, 1, tmp_path / "p.safetensors")
    summary = zolite.export(None, patch, tmp_path / "whole.gguf", format="gguf")
    assert summary["encoded_types"] == {"F16": 29, "F32": 9} and summary["verify"]["max_logit_diff"] < 1e-3
    expected, ids = _patched_logits(folder, patch)
    logits, _ = _gguf_logits(tmp_path / "whole.gguf", ids)
    assert (logits - expected).abs().max().item() < 1e-3


def test_hf_folder_of_an_unsupported_architecture_is_refused(tiny_model, tmp_path):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(tiny_model)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2)).save_pretrained(tmp_path / "g")
    tok.save_pretrained(tmp_path / "g")
    loaded = zolite.load_model(str(tmp_path / "g"), device="cpu")
    names = [n for n, _ in loaded.model.named_parameters() if n.startswith("transformer.h.1.")]
    base = base_tensors(loaded.model, names)
    save_patch(tmp_path / "p.safetensors", base, {"zolite.model": str(tmp_path / "g"), "zolite.arch": "gpt2",
                                                   "zolite.layer": "1", "zolite.base_sha256": fingerprint(base),
                                                   "zolite.task": "sst2"})
    assert_user_error(run_cli("export", "--patch", tmp_path / "p.safetensors", "--format", "gguf", "--out",
                              tmp_path / "g.gguf"), "gpt2 model", "not supported", "--format hf")
    assert not (tmp_path / "g.gguf").exists()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_bad_input_is_one_line_and_writes_nothing(bases, tiny_model, other_tiny_model, tmp_path):
    base = bases["llama"]
    out = tmp_path / "tuned.gguf"
    out.write_text("mine")
    assert_user_error(run_cli("export", "--patch", base["patch"], "--format", "gguf", "--out", out),
                      "already exists", "--force")
    assert out.read_text() == "mine"
    assert_user_error(run_cli("export", "--patch", base["patch"], "--format", "gguf", "--out", tmp_path / "a.gguf",
                              "--quant", "q4_k"), "cannot encode", "q8_0")
    assert_user_error(run_cli("export", "--patch", base["patch"], "--out", tmp_path / "hf", "--quant", "q8_0"),
                      "--quant is for --format gguf")

    # a patch for another base: the other GGUF file, or a same-shaped model with other weights
    assert_user_error(run_cli("export", "--patch", base["patch"], "--model", bases["qwen2"]["gguf"], "--format",
                              "gguf", "--out", tmp_path / "b.gguf"), "tuned from another GGUF file")
    other = hand_patch(other_tiny_model, 1, tmp_path / "other.safetensors")
    assert_user_error(run_cli("export", "--patch", other, "--model", tiny_model, "--format", "gguf", "--out",
                              tmp_path / "c.gguf"), "tuned from another base")

    # the GGUF the patch was tuned on changed since
    copy = tmp_path / "copy.gguf"
    shutil.copy(base["gguf"], copy)
    patch = load_patch(base["patch"])
    meta = {**patch.metadata, "zolite.model": str(copy)}
    save_patch(tmp_path / "p.safetensors", patch.tensors, {k: v for k, v in meta.items()
                                                           if k not in ("zolite.format", "zolite.version")})
    with open(copy, "r+b") as f:   # one byte of a tensor the patch does not touch
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    assert_user_error(run_cli("export", "--patch", tmp_path / "p.safetensors", "--format", "gguf", "--out",
                              tmp_path / "d.gguf"), "has changed since", "export from the file it was tuned on")
    for name in ("a.gguf", "b.gguf", "c.gguf", "d.gguf"):
        assert not (tmp_path / name).exists()
    assert _leftovers(tmp_path) == []


def test_old_patch_without_source_hash_exports_with_a_note(bases, tmp_path):
    base = bases["qwen2"]
    old = hand_patch(str(base["gguf"]), 2, tmp_path / "old.safetensors")
    result = run_cli("export", "--patch", old, "--format", "gguf", "--out", tmp_path / "o.gguf")
    assert result.exit_code == 0, result.output
    assert "verified: reloads through transformers" in result.output and "older zolite" in result.output
    assert (tmp_path / "o.gguf").is_file() and _leftovers(tmp_path) == []
