"""--eps-scale sparse (Sparse MeZO): z only on each tensor's smallest-magnitude quarter of base weights. The mask is
derived from the base again wherever a run is resumed or a trajectory replayed (test_tune's resume test covers the
resume), so checkpoints and trajectories stay seeds only."""
from __future__ import annotations

import torch

import zolite
from test_step_fast import _batch, assert_fused_equals_per_half
from zolite.apply import apply_patch
from zolite.patch import load_patch
from zolite.trajectory import trajectory_path
from zolite.zo import SPARSE_FRACTION, TunedLayers, small_weights


def test_the_mask_holds_the_smallest_quarter():
    w = torch.randn(64, 48)
    mask = small_weights(w)
    assert mask.shape == w.shape and mask.dtype == torch.bool
    assert mask.sum().item() == round(SPARSE_FRACTION * w.numel())   # no ties in random floats
    assert w.abs()[mask].max() < w.abs()[~mask].min()


def test_only_the_masked_weights_are_perturbed_and_updated(tiny_model):
    loaded = zolite.load_model(tiny_model, device="cpu")
    tuned = TunedLayers(loaded.model, [1], eps_scale="sparse")
    before = [p.detach().clone() for p in tuned.params]
    masks = [small_weights(p) for p in before]
    with torch.no_grad():
        for i in range(len(tuned.params)):
            z, scale = tuned.z(7, i)
            assert scale == 1.0 and torch.all(z[~masks[i]] == 0) and torch.all(z[masks[i]] != 0)
        tuned.sgd_update(7, projected_grad=3.0, lr=1e-2)
    for p, b, m in zip(tuned.params, before, masks):
        assert torch.equal(p[~m], b[~m]) and not torch.equal(p[m], b[m])
    assert tuned.scale_tensors() == {}   # derived from the base, never stored


def test_the_doubled_forward_sees_the_same_masked_z(tiny_model):
    loaded = zolite.load_model(tiny_model, device="cpu")
    assert_fused_equals_per_half(loaded.model, TunedLayers(loaded.model, [1], eps_scale="sparse"), _batch(loaded))


def test_a_sparse_run_replays_from_its_trajectory(tiny_model, small_data, tmp_path):
    report = zolite.tune(tiny_model, "sst2", run_dir=tmp_path / "run", data=small_data, layer="1", steps=4,
                         eval_every=2, batch_size=4, lr=1e-2, eps_scale="sparse", keep="last", progress=False)
    dense, seeds = load_patch(report["patch"]), load_patch(trajectory_path(report["patch"]))
    assert not any(k.startswith("trajectory.scale/") for k in seeds.tensors)
    base = zolite.load_model(tiny_model, device="cpu").model.state_dict()
    for name, value in dense.tensors.items():   # the weights outside the mask are the base's
        mask = small_weights(base[name])
        assert torch.equal(value[~mask], base[name][~mask].half()), name
    a, b = zolite.load_model(tiny_model, device="cpu"), zolite.load_model(tiny_model, device="cpu")
    apply_patch(a.model, dense)
    apply_patch(b.model, seeds)
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(p, q), n


def test_weight_decay_with_sparse_is_refused(tiny_model, small_data, tmp_path):
    from conftest import run_cli
    from test_errors import assert_user_error

    assert_user_error(run_cli("tune", "--model", tiny_model, "--task", "sst2", "--layer", "1", "--data", small_data,
                              "--eps-scale", "sparse", "--weight-decay", "0.1", "--steps", "1",
                              "--run-dir", tmp_path / "run"), "--weight-decay", "--eps-scale sparse")
