"""--params: only some of the tuned layer's tensors are perturbed and updated; the patch holds those, replays and
resumes exactly (test_tune's resume test), and a part that names no tensor is a one-line error."""
from __future__ import annotations

import pytest
import torch

import zolite
from conftest import run_cli
from zolite.apply import apply_patch
from zolite.patch import load_patch
from zolite.trajectory import trajectory_path
from zolite.zo import TunedLayers

SUBSET = "v_proj,down_proj"


def test_only_the_named_tensors_are_tuned(tiny_model, small_data, tmp_path):
    report = zolite.tune(tiny_model, "sst2", run_dir=tmp_path / "run", data=small_data, layer="1", steps=4,
                         eval_every=2, batch_size=4, lr=1e-2, params=SUBSET, keep="last", progress=False)
    dense = load_patch(report["patch"])
    assert sorted(dense.tensors) == ["model.layers.1.mlp.down_proj.weight", "model.layers.1.self_attn.v_proj.weight"]
    base = zolite.load_model(tiny_model, device="cpu").model.state_dict()
    for name, value in dense.tensors.items():
        assert not torch.equal(value, base[name].half()), name          # the step moved both
    # the seed trajectory draws z for the same two tensors: replayed, it rebuilds the dense patch
    a, b = zolite.load_model(tiny_model, device="cpu"), zolite.load_model(tiny_model, device="cpu")
    apply_patch(a.model, dense)
    apply_patch(b.model, load_patch(trajectory_path(report["patch"])))
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(p, q), n


def test_tuned_layers_keep_the_order_of_the_full_layer(tiny_model):
    model = zolite.load_model(tiny_model, device="cpu").model
    full, part = TunedLayers(model, [1]), TunedLayers(model, [1], params="down_proj, v_proj")
    assert part.names == [n for n in full.names if "down_proj" in n or "v_proj" in n]
    assert part.numel() < full.numel()


def test_a_part_that_names_no_tensor_is_one_line(tiny_model, small_data, tmp_path):
    result = run_cli("tune", "--model", tiny_model, "--data", small_data, "--layer", "1", "--params", "v_proj,qkv",
                     "--steps", "2", "--eval-every", "0", "--batch-size", "2", "--quiet", "--run-dir", tmp_path / "r")
    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert message.startswith("error: ") and len(message.splitlines()) == 1 and "Traceback" not in message
    assert "'qkv' is in no tensor name" in message and "self_attn.v_proj.weight" in message
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("params", ["", " , "])
def test_an_empty_selection_means_the_whole_layer(tiny_model, params):
    model = zolite.load_model(tiny_model, device="cpu").model
    assert TunedLayers(model, [1], params=params).names == TunedLayers(model, [1]).names


@pytest.mark.parametrize("params", ["bias", "proj.weight", "norm,bias", "v_proj"])
def test_a_linear_with_a_bias_left_out_keeps_it_in_the_doubled_forward(tiny_qwen2, params):
    """Qwen2's q/k/v have biases: with only a Linear's bias (or only its weight) tuned, the one doubled forward uses
    the base's other tensor for both halves, as the per-half path does."""
    from test_step_fast import _batch, assert_fused_equals_per_half

    loaded = zolite.load_model(tiny_qwen2, device="cpu")
    assert_fused_equals_per_half(loaded.model, TunedLayers(loaded.model, [1], params=params), _batch(loaded))


def test_a_qwen2_run_on_norms_and_biases_alone(tiny_qwen2, small_data, tmp_path):
    report = zolite.tune(tiny_qwen2, "sst2", run_dir=tmp_path / "run", data=small_data, layer="1", steps=2,
                         eval_every=0, batch_size=4, lr=1e-2, params="norm,bias", progress=False)
    assert sorted(load_patch(report["patch"]).tensors) == [
        "model.layers.1.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight",
        "model.layers.1.self_attn.k_proj.bias", "model.layers.1.self_attn.q_proj.bias",
        "model.layers.1.self_attn.v_proj.bias"]


def test_a_resume_may_space_the_parts_differently(tiny_model, small_data, tmp_path):
    common = dict(data=small_data, layer="1", steps=2, eval_every=0, batch_size=2, lr=1e-2, progress=False)
    zolite.tune(tiny_model, "sst2", run_dir=tmp_path / "r", params="v_proj,down_proj", **common)
    config = zolite.tune(tiny_model, "sst2", resume=tmp_path / "r", params=" v_proj , down_proj", progress=False)
    assert config["config"]["params"] == "v_proj,down_proj"


def test_a_bad_part_fails_before_the_weights_load(tiny_model, small_data, tmp_path, monkeypatch):
    import zolite.tune_setup as tune_setup

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(tune_setup, "load_model", no_loading)
    with pytest.raises(zolite.ZoliteError, match="'qkv' is in no tensor name"):
        zolite.tune(tiny_model, "sst2", run_dir=tmp_path / "r", data=small_data, layer="1", steps=1, params="qkv",
                    progress=False)
