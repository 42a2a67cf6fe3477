"""Activation-scaled perturbations: the scales, and a run that uses them resumes and replays exactly."""
from __future__ import annotations

import sys

import pytest
import torch

import zolite
from zolite.apply import apply_patch
from zolite.patch import load_patch
from zolite.precondition import activation_scales
from zolite.trajectory import trajectory_path


def test_scales_shrink_loud_channels_and_keep_rms_one():
    energy = torch.tensor([1.0, 1.0, 1.0, 1e6])            # one massive channel
    s = activation_scales({"w": energy})["w"]
    assert s.shape == (1, 4) and s.pow(2).mean().sqrt().item() == pytest.approx(1.0)
    assert s[0, 3] < 0.01 * s[0, 0]                         # its column barely moves
    assert (s[0, :3] == s[0, 0]).all()
    quiet = activation_scales({"w": torch.tensor([0.0, 1.0, 1.0, 1.0])})["w"]
    assert quiet[0, 0] / quiet[0, 1] == pytest.approx(2 ** 0.5)   # a silent channel: at most 1.4x a median one


def test_an_activation_scaled_run_replays_from_its_trajectory(tiny_model, small_data, tmp_path):
    report = zolite.tune(tiny_model, "sst2", run_dir=tmp_path / "run", data=small_data, layer="1", steps=4,
                         eval_every=2, batch_size=4, eps_scale="activation", keep="last", progress=False)
    scales = report["activation_scales"]
    assert set(scales) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                           "input_layernorm", "post_attention_layernorm"}   # the norms' weights too
    dense, seeds = load_patch(report["patch"]), load_patch(trajectory_path(report["patch"]))
    assert any(k.startswith("trajectory.scale/") for k in seeds.tensors)
    a, b = zolite.load_model(tiny_model, device="cpu"), zolite.load_model(tiny_model, device="cpu")
    apply_patch(a.model, dense)
    apply_patch(b.model, seeds)                              # replayed with the measured scales: the same layer
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(p, q), n


def test_a_norm_weight_is_scaled_by_its_normalized_inputs_energy(tiny_model):
    """RMSNorm's g_j multiplies r_j = x_j / rms(x): its scale comes from mean r_j^2 over the real tokens, shaped like
    the weight; a matrix's from its raw input, shaped [1, in]."""
    from zolite.precondition import input_energies
    from zolite.zo import TunedLayers

    loaded = zolite.load_model(tiny_model, device="cpu")
    tuned = TunedLayers(loaded.model, [1], eps_scale="activation", params="input_layernorm,q_proj")
    sequences = [[1, 5, 9, 13, 17], [1, 7, 3]]
    energies = input_energies(loaded.model, tuned, sequences, batch_size=2, device="cpu")
    norm = loaded.model.model.layers[1].input_layernorm
    seen = {}
    handle = norm.register_forward_pre_hook(lambda m, args: seen.setdefault("x", []).append(args[0][0]))
    with torch.inference_mode():
        for seq in sequences:                                  # one at a time: no padding to leave out
            loaded.model.model(input_ids=torch.tensor([seq]))
    handle.remove()
    x = torch.cat(seen["x"]).float()
    r = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    name = "model.layers.1.input_layernorm.weight"
    assert torch.allclose(energies[name], r.pow(2).mean(0), rtol=1e-4)
    vectors = frozenset({name})
    scales = activation_scales(energies, vectors)
    assert scales[name].shape == norm.weight.shape
    assert scales["model.layers.1.self_attn.q_proj.weight"].shape == (1, norm.weight.shape[0])
    assert scales[name].pow(2).mean().sqrt().item() == pytest.approx(1.0)


def test_biases_keep_scale_one_beside_scaled_norms(tiny_qwen2):
    """--params bias,layernorm (the Qwen BoolQ recipe's tensors): the norms get scales, q/k/v's biases none."""
    from zolite.precondition import input_energies
    from zolite.zo import TunedLayers

    loaded = zolite.load_model(tiny_qwen2, device="cpu")
    tuned = TunedLayers(loaded.model, [0, 1], eps_scale="activation", params="bias,layernorm")
    assert any(n.endswith(".bias") for n in tuned.names)
    energies = input_energies(loaded.model, tuned, [[1, 5, 9, 13]], batch_size=1, device="cpu")
    assert set(energies) == {n for n in tuned.names if n.endswith("layernorm.weight")}
    assert len(energies) == 4                                  # two norms in each of the two layers


def test_a_run_on_norms_resumes_with_the_scales_it_started_with(tiny_model, small_data, tmp_path, monkeypatch):
    """Cut off after its step-2 checkpoint and resumed, an activation-scaled run on every layer's norms ends bit for
    bit like the uninterrupted one (the resume reads its scales back, it does not measure them again); its norms
    were scaled (the report lists them)."""
    from test_tune import Interrupted, _cut_off_after, sha

    common = dict(data=small_data, layer="all", params="norm", steps=4, eval_every=2, batch_size=4, lr=1e-2,
                  eps_scale="activation", keep="last", progress=False)
    full = zolite.tune(tiny_model, "sst2", run_dir=tmp_path / "full", **common)
    assert set(full["activation_scales"]) == {"input_layernorm", "post_attention_layernorm"}
    with monkeypatch.context() as m:
        _cut_off_after(m, 2)
        with pytest.raises(Interrupted):
            zolite.tune(tiny_model, "sst2", run_dir=tmp_path / "cut", **common)

    def measured_again(*args):
        raise AssertionError("a resumed run measured its scales again")
    monkeypatch.setattr(sys.modules["zolite.tune"], "measure_scales", measured_again)
    resumed = zolite.tune(tiny_model, "sst2", resume=tmp_path / "cut", progress=False)
    assert sha(resumed["patch"]) == sha(full["patch"]) and resumed["loss_curve"] == full["loss_curve"]


def test_layernorm_weights_weigh_the_centred_normalized_input():
    """GPT-2 / OPT's LayerNorm: its weight multiplies (x - mean) / std; a 1-D weight of no known norm gets no scale."""
    from zolite.precondition import _channels_weighed

    norm, x = torch.nn.LayerNorm(8), torch.randn(5, 8) * 3 + 1
    r = _channels_weighed(norm, norm.weight)(x)
    expected = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + norm.eps)
    assert torch.allclose(r, expected, atol=1e-5)
    assert _channels_weighed(torch.nn.Embedding(4, 8), torch.zeros(8)) is None
