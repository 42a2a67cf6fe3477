"""Qwen2's code paths (the real 1.5B model's architecture) on a tiny random Qwen2 built in code: q/k/v biases,
grouped-query attention, tied embeddings; tuned, patched, replayed, scanned."""
from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

import zolite
from zolite.apply import apply_patch
from zolite.patch import load_patch
from zolite.trajectory import trajectory_path

from conftest import build_tiny_qwen2


def _logits(model, tokenizer, text="the film was a gripping ride"):
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        return model(input_ids=ids).logits.float()


def test_a_qwen2_layer_tunes_with_its_biases_and_the_patch_round_trips(tiny_qwen2, small_data, tmp_path):
    report = zolite.tune(tiny_qwen2, "sst2", run_dir=tmp_path / "run", data=small_data, layer="1", steps=6,
                         eval_every=3, batch_size=4, keep="last", progress=False)
    assert report["model"]["arch"] == "qwen2" and report["lr"]["source"] == "probe"
    patch = load_patch(report["patch"])
    names = set(patch.tensors)
    for proj in ("q_proj", "k_proj", "v_proj"):   # the biases are tuned and carried (Llama has none)
        assert f"model.layers.1.self_attn.{proj}.bias" in names
    k = patch.tensors["model.layers.1.self_attn.k_proj.weight"]
    assert k.shape == (2 * 8, 32)                 # grouped-query attention: 2 key-value heads of 8

    loaded = zolite.load_model(tiny_qwen2, device="cpu")
    base = _logits(loaded.model, loaded.tokenizer)
    tied = loaded.model.lm_head.weight.data_ptr() == loaded.model.model.embed_tokens.weight.data_ptr()
    apply_patch(loaded.model, patch)
    patched = _logits(loaded.model, loaded.tokenizer)
    assert tied and loaded.model.lm_head.weight.data_ptr() == loaded.model.model.embed_tokens.weight.data_ptr()
    bias = loaded.model.model.layers[1].self_attn.q_proj.bias
    assert torch.equal(bias.detach().half(), patch.tensors["model.layers.1.self_attn.q_proj.bias"].half())
    assert not torch.equal(base, patched)         # six steps moved the layer

    again = zolite.load_model(tiny_qwen2, device="cpu")   # the seed trajectory replays to the same layer
    apply_patch(again.model, load_patch(trajectory_path(report["patch"])))
    assert torch.equal(_logits(again.model, again.tokenizer), patched)


def test_the_scan_reads_a_qwen2(tiny_qwen2, tmp_path):
    from zolite.scan import scan

    result = scan(tiny_qwen2, out=tmp_path / "scan", seeds=1, prompts=4)
    assert len(result["layers"]) == 3 and all(row["max_abs"] > 0 for row in result["layers"])


def _tiny_mistral(out, window: int):
    """A tiny random Mistral (one sliding window for every layer, no layer types), the tiny Llama's tokenizer."""
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    from conftest import build_tiny_model, tiny_shape

    tokenizer = AutoTokenizer.from_pretrained(build_tiny_model(out.parent / "tok", layers=1))
    torch.manual_seed(0)
    MistralForCausalLM(MistralConfig(**tiny_shape(len(tokenizer), 32, 3), sliding_window=window)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize("types", ["sliding", "mixed", "mistral"])
def test_a_sliding_window_shorter_than_the_batch_is_kept_by_the_doubled_forward(types, tmp_path):
    """Past a sliding window transformers builds an explicit mask for the batch it is given, which the layers after the
    doubling one (B +eps rows and B -eps rows) could not take (a batch-size RuntimeError). The doubled forward then
    gives the model masks of batch 1 (windowed, or by layer type where full and sliding layers mix; Mistral has one
    window and no layer types): l+ and l- are
    the losses with W +- eps z written into the model, eagerly, per half (layers 0-1, after any sliding layer) and
    through the graphs' stand-in recorder."""
    import json

    from test_graphs import RerunRecorder
    from test_zo import _batch, _loss_with_weights
    from zolite.graphs import ForwardGraphs
    from zolite.zo import TunedLayers, spsa_losses

    if types == "mistral":
        model = _tiny_mistral(tmp_path / "model", window=8)
    else:
        model = build_tiny_qwen2(tmp_path / "model")
        config = json.loads((model / "config.json").read_text())
        n = config["num_hidden_layers"]
        config.update(use_sliding_window=True, sliding_window=8, max_window_layers=0 if types == "sliding" else 1,
                      layer_types=["sliding_attention"] * n if types == "sliding" else
                      ["full_attention"] + ["sliding_attention"] * (n - 1))
        (model / "config.json").write_text(json.dumps(config))
    loaded = zolite.load_model(str(model))
    assert loaded.model.config.sliding_window == 8
    batch = _batch(loaded, "boolq", n=3)
    assert batch.input_ids.shape[1] > 8   # past the window
    for layers in ([1], [0, 1]):
        tuned = TunedLayers(loaded.model, layers)
        explicit = [_loss_with_weights(loaded, tuned, batch, 5, 1e-2, sign) for sign in (1, -1)]
        eager = spsa_losses(loaded.model, tuned, batch, 5, 1e-2, "ce")
        graphed = spsa_losses(loaded.model, tuned, batch, 5, 1e-2, "ce",
                              graphs=ForwardGraphs(loaded.model, tuned, recorder=RerunRecorder(tuned)))
        assert eager == pytest.approx(explicit, abs=1e-5) and graphed == pytest.approx(explicit, abs=1e-5)
        with zo_per_half(tuned):
            assert spsa_losses(loaded.model, tuned, batch, 5, 1e-2, "ce") == pytest.approx(explicit, abs=1e-5)


@contextmanager
def zo_per_half(tuned):
    """The per-half path (a 7B's large layers) on a small layer: one forward per sign from the first tuned layer."""
    fused, tuned.fused = tuned.fused, False
    try:
        yield
    finally:
        tuned.fused = fused
