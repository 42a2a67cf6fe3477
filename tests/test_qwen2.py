"""Qwen2's code paths (the real 1.5B model's architecture) on a tiny random Qwen2 built in code: q/k/v biases,
grouped-query attention, tied embeddings; tuned, patched, replayed, scanned."""
from __future__ import annotations

import torch

import zolite
from zolite.apply import apply_patch
from zolite.patch import load_patch
from zolite.trajectory import trajectory_path


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


def test_a_sliding_window_shorter_than_the_prompts_is_refused_in_one_line(tmp_path, small_data):
    """Past a sliding window transformers builds a mask for the batch it is given, which the layers after the
    doubling one (B +eps rows and B -eps rows) cannot take: tune says so up front, with the fix; within the window
    the same model tunes."""
    import json

    from transformers import AutoConfig

    from conftest import build_tiny_qwen2, run_cli
    from test_errors import assert_user_error

    model = build_tiny_qwen2(tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    config.update(use_sliding_window=True, sliding_window=48, max_window_layers=0,
                  layer_types=["sliding_attention"] * config["num_hidden_layers"])
    (model / "config.json").write_text(json.dumps(config))
    assert AutoConfig.from_pretrained(model).layer_types[0] == "sliding_attention"
    common = ["tune", "--model", model, "--task", "sst2", "--data", small_data, "--layer", "1", "--steps", "2",
              "--batch-size", "4", "--eval-every", "0", "--lr", "1e-3", "--quiet"]
    result = run_cli(*common, "--run-dir", tmp_path / "long")
    assert_user_error(result, "past the model's sliding attention window (48 tokens)", "--max-length 48")
    result = run_cli(*common, "--run-dir", tmp_path / "short", "--max-length", "48")
    assert result.exit_code == 0, result.output
