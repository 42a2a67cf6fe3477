"""Activation-scaled perturbations: the scales, and a run that uses them resumes and replays exactly."""
from __future__ import annotations

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
    assert set(scales) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    dense, seeds = load_patch(report["patch"]), load_patch(trajectory_path(report["patch"]))
    assert any(k.startswith("trajectory.scale/") for k in seeds.tensors)
    a, b = zolite.load_model(tiny_model, device="cpu"), zolite.load_model(tiny_model, device="cpu")
    apply_patch(a.model, dense)
    apply_patch(b.model, seeds)                              # replayed with the measured scales: the same layer
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(p, q), n
