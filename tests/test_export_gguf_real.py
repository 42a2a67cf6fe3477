"""GGUF export of real models. Slow tier (`pytest -m slow`): SmolLM2-135M's Q4_1 file. `-m llamacpp`: a completion
through llama.cpp (llama-cpp-python), skipped when it is not installed. `-m qwen`: Qwen2.5-Coder-1.5B (a 1.1 GB
Q4_K_M file, never in CI): set ZOLITE_QWEN_GGUF to its path."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import gguf
import pytest

import zolite
from conftest import need_smollm2
from zolite.export_gguf import llama_cpp_check

pytestmark = pytest.mark.slow


def _tuned(model: str, layer: int, data: str, run: Path, lr: float) -> Path:
    zolite.tune(model, "sst2", data=data, run_dir=run, layer=str(layer), steps=2, eval_every=0, batch_size=2, lr=lr,
                progress=False)
    return run / "patch.safetensors"


@pytest.fixture(scope="module")
def smollm2_patch(small_data, tmp_path_factory):
    need_smollm2()
    return _tuned("smollm2-135m", 11, small_data, tmp_path_factory.mktemp("smol") / "run", 3e-4)


def _check_real_export(patch: Path, out: Path, quant: str, tolerance: float) -> dict:
    """`tolerance`: the largest logit difference from the patched model. The file itself must read back as zolite
    encoded it (as_stored, within float noise); what the encoding loses is the type's own (Q8_0 on SmolLM2's layer 11
    alone, unpatched: 0.44-0.65 max |logit diff| at a logit scale of 41, top-1 unchanged)."""
    summary = zolite.export(None, patch, out, format="gguf", quant=quant)
    src, new = gguf.GGUFReader(summary["source"]), gguf.GGUFReader(out)
    layer = f"blk.{summary['layers'][0]}."
    assert [t.name for t in new.tensors] == [t.name for t in src.tensors]
    by_name = {t.name: t for t in new.tensors}
    for t in src.tensors:
        if not t.name.startswith(layer):
            assert by_name[t.name].tensor_type == t.tensor_type and (by_name[t.name].data == t.data).all(), t.name
    v = summary["verify"]
    assert v["untouched_identical"] == len(src.tensors) - summary["encoded"] and summary["notes"] == []
    assert v["max_logit_diff_as_stored"] < 0.1, v
    assert v["max_logit_diff"] < tolerance and v["top1_agreement"] >= 0.95, v
    return summary


def test_smollm2_export_keeps_the_q4_1_file(smollm2_patch, tmp_path):
    f16 = _check_real_export(smollm2_patch, tmp_path / "f16.gguf", "f16", 0.1)
    q8 = _check_real_export(smollm2_patch, tmp_path / "q8.gguf", "q8_0", 1.0)
    # layer 11's 7 matrices (3.5 M weights) go from Q4_1 (0.625 bytes a weight) to F16 (2) or Q8_0 (1.0625)
    assert f16["encoded"] == 9 and f16["bytes"] - f16["source_bytes"] == pytest.approx(3_538_944 * 1.375, rel=0.01)
    assert q8["bytes"] < f16["bytes"]


@pytest.mark.llamacpp
def test_llama_cpp_runs_the_smollm2_export(smollm2_patch, tmp_path):
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama.cpp's Python binding is not installed (pip install llama-cpp-python: a source build)")
    zolite.export(None, smollm2_patch, tmp_path / "f16.gguf", format="gguf")
    check = llama_cpp_check(tmp_path / "f16.gguf", "smollm2-135m", smollm2_patch,
                            "Question: What is the capital of France?\nAnswer:")
    assert check["top1_agreement"] >= 0.8 and check["completion"].strip(), check


@pytest.mark.llamacpp
def test_llama_cpp_library_runs_the_smollm2_exports(smollm2_patch, tmp_path):
    """The same through llama.cpp's prebuilt CPU library (bench/llama_cpp_check.py says how to get it): set
    ZOLITE_LLAMA_CPP_LIB to its path. The export must differ from transformers by no more than the untouched source
    does (llama.cpp's own arithmetic), with margin."""
    lib_path = os.environ.get("ZOLITE_LLAMA_CPP_LIB")
    if not lib_path or not Path(lib_path).is_file():
        pytest.skip("set ZOLITE_LLAMA_CPP_LIB to llama.cpp's CPU module (see bench/llama_cpp_check.py) to run this")
    import sys
    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    from llama_cpp_check import LlamaCpp, compare, load_lib, transformers_side
    from zolite.loading import gguf_source

    lib, ffi = load_lib(Path(lib_path))
    rows = {}
    for name, gguf, patch in (("source", gguf_source("smollm2-135m"), None),
                              ("export", tmp_path / "f16.gguf", smollm2_patch)):
        if patch is not None:
            zolite.export(None, patch, gguf, format="gguf")
        tokenizer, expected = transformers_side("smollm2-135m", patch, 8)
        llm = LlamaCpp(lib, ffi, gguf)
        rows[name] = compare(llm, tokenizer, expected, 8)
        llm.close()
    assert rows["export"]["max_logit_diff"] < 1.5 * rows["source"]["max_logit_diff"] + 0.5, rows
    assert rows["export"]["top1_agreement"] >= 0.85 and all(c["llama_cpp"] for c in rows["export"]["completions"])


@pytest.mark.qwen
def test_qwen2_export_keeps_the_q4_k_m_file(small_data, tmp_path):
    path = os.environ.get("ZOLITE_QWEN_GGUF")
    if not path or not Path(path).is_file():
        pytest.skip("set ZOLITE_QWEN_GGUF to Qwen2.5-Coder-1.5B-Instruct's Q4_K_M .gguf (1.1 GB) to run this")
    patch = _tuned(path, 1, small_data, tmp_path / "run", 1e-5)
    summary = _check_real_export(patch, tmp_path / "qwen.gguf", "f16", 0.5)
    assert summary["encoded"] == 12   # 7 matrices, 3 biases, 2 norms
