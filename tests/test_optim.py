"""Estimators and optimisers: unbiased on a quadratic with a known gradient, one forward per residual-feedback step,
exact resume of optimiser state, and the backprop baseline's gradient against autograd."""
from __future__ import annotations

import sys

import pytest
import torch

import zolite
from zolite.errors import ZoliteError
from zolite.optim import Stepper, fo_gradients
from zolite.zo import TunedLayers


class Quadratic(torch.nn.Module):
    """f(W) = 0.5 ||W - A||^2 through a decoder 'layer' (a Linear), so the perturbation hooks are the real ones."""

    def __init__(self, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList([torch.nn.Linear(3, 4, bias=False)])
        with torch.no_grad():
            self.model.layers[0].weight.copy_(torch.randn(4, 3, generator=gen))
        self.target = torch.randn(4, 3, generator=gen)
        self.requires_grad_(False)
        self.forwards = 0

    def loss(self):
        self.forwards += 1
        out = self.model.layers[0](torch.eye(3))      # = W^T
        return 0.5 * ((out - self.target.T) ** 2).sum()

    def gradient(self):
        return self.model.layers[0].weight - self.target


class QuadraticStepper(Stepper):
    """The real estimator/optimiser logic, with the loss of the quadratic instead of the task's."""

    def pair_losses(self, examples, seed):
        out = []
        for sign in (1, -1):
            with self.tuned.shifted(seed, self.eps, sign):
                out.append(self.model.loss().item())
        return out[0], out[1]

    def perturbed_loss(self, examples, seed):
        with self.tuned.shifted(seed, self.eps, +1):
            return self.model.loss().item()

    def loss_and_grads(self, examples):
        return fo_gradients(self.model, self.tuned, self.model.loss)


def _mean_direction(estimator, steps=4000, **options):
    """The average update direction over many steps at a fixed point (lr 0: W stays put; the direction is read
    back from the optimiser's input)."""
    model = Quadratic()
    tuned = TunedLayers(model, [0])
    stepper = QuadraticStepper(model, tuned, estimator=estimator, eps=1e-3, lr=0.0, **options)
    stepper.plain = lambda: False   # MeZO's fused update bypasses the optimiser; the direction is the same
    seen = []
    step_of_optimizer = stepper.optimizer.step
    stepper.optimizer.step = lambda direction: (seen.append(direction(0).clone()), step_of_optimizer(lambda i: torch.zeros(4, 3)))
    for step in range(steps):
        stepper.step(step, [])
    return torch.stack(seen).mean(0), model, stepper


@pytest.mark.parametrize("estimator,options", [("spsa", {"n_z": 1}), ("spsa", {"n_z": 5}), ("residual", {})])
def test_estimators_are_unbiased_on_a_quadratic(estimator, options):
    mean, model, _ = _mean_direction(estimator, **options)
    true = model.gradient()
    cos = torch.nn.functional.cosine_similarity(mean.flatten(), true.flatten(), dim=0)
    assert cos > 0.97, cos
    assert (mean.norm() / true.norm()).item() == pytest.approx(1.0, abs=0.15)


def test_fused_mezo_update_equals_the_optimizer_path():
    runs = []
    for fused in (True, False):
        model = Quadratic()
        stepper = QuadraticStepper(model, TunedLayers(model, [0]), estimator="spsa", lr=0.01, weight_decay=0.1)
        if not fused:
            stepper.plain = lambda: False
        for step in range(3):   # few steps: an ulp of difference grows through (l+ - l-) / 2eps
            stepper.step(step, [])
        runs.append(model.model.layers[0].weight)
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-5, atol=1e-6)


def test_residual_feedback_uses_one_forward_per_step():
    model = Quadratic()
    stepper = QuadraticStepper(model, TunedLayers(model, [0]), estimator="residual", lr=1e-2)
    for step in range(10):
        stepper.step(step, [])
    assert model.forwards == 10 and stepper.forwards == 10
    spsa_model = Quadratic()
    spsa = QuadraticStepper(spsa_model, TunedLayers(spsa_model, [0]), estimator="spsa", n_z=5, lr=1e-2)
    spsa.step(0, [])
    assert spsa.forwards == 10   # MeZO's count: two per z


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam", "sign"])
def test_optimizers_descend_and_resume_exactly(name):
    lr = {"sgd": 0.02, "momentum": 0.005, "adam": 0.02, "sign": 0.002}[name]
    model = Quadratic()
    stepper = QuadraticStepper(model, TunedLayers(model, [0]), estimator="spsa", n_z=2, name=name, lr=lr,
                               weight_decay=0.01, layerwise=(name == "sgd"))
    start = model.loss().item()
    for step in range(30):
        stepper.step(step, [])
    assert model.loss().item() < start
    tensors, scalars = stepper.state()
    copy = Quadratic()
    resumed = QuadraticStepper(copy, TunedLayers(copy, [0]), estimator="spsa", n_z=2, name=name, lr=lr,
                               weight_decay=0.01, layerwise=(name == "sgd"))
    resumed.tuned.load({k: v.clone() for k, v in stepper.tuned.exact_state().items()})
    resumed.load({k: v.clone() for k, v in tensors.items()}, dict(scalars))
    for step in range(30, 40):
        stepper.step(step, [])
        resumed.step(step, [])
    assert torch.equal(model.model.layers[0].weight, copy.model.layers[0].weight)


def test_fo_gradient_matches_autograd(tiny_model):
    from test_zo import _batch
    from zolite.scoring import candidate_scores, last_hidden, losses

    loaded = zolite.load_model(tiny_model)
    batch = _batch(loaded)
    tuned = TunedLayers(loaded.model, [1, 2])
    loss_fn = lambda: losses(candidate_scores(loaded.model, batch, last_hidden(loaded.model, batch.input_ids)), batch)[0]  # noqa: E731
    loss, grads = fo_gradients(loaded.model, tuned, loss_fn)
    # the plain way: every parameter trainable, backward, then read the tuned ones
    loaded.model.requires_grad_(True)
    full = loss_fn()
    full.backward()
    assert loss == pytest.approx(full.item())
    for p, g in zip(tuned.params, grads):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)
    loaded.model.requires_grad_(False)
    assert not any(p.requires_grad for p in loaded.model.parameters())


def test_tune_with_each_estimator(tiny_model, small_data, tmp_path):
    for estimator, extra in (("residual", {}), ("fo", {"optimizer": "adam"}), ("spsa", {"n_z": 3, "optimizer": "momentum"})):
        report = zolite.tune(tiny_model, "sst2", data=small_data, run_dir=tmp_path / estimator, layer="1", steps=4,
                             eval_every=0, batch_size=4, estimator=estimator, lr=1e-3, progress=False, **extra)
        assert report["forward_passes"] == {"residual": 4, "fo": 4, "spsa": 24}[estimator]
        assert len(report["loss_curve"]) == 4


def test_bad_estimator_options(tiny_model, small_data, tmp_path):
    with pytest.raises(ZoliteError, match="--n-z must be at least 1"):
        zolite.tune(tiny_model, "sst2", data=small_data, run_dir=tmp_path / "a", layer="1", n_z=0)
    with pytest.raises(ZoliteError, match="needs a differentiable objective"):
        zolite.tune(tiny_model, "sst2", data=small_data, run_dir=tmp_path / "c", layer="1", estimator="fo",
                    objective="accuracy")
    with pytest.raises(ZoliteError, match="unknown optimizer 'lion'"):
        zolite.tune(tiny_model, "sst2", data=small_data, run_dir=tmp_path / "b", layer="1", optimizer="lion")


def test_divergence_is_reported_and_the_patch_stays_finite(tiny_model, small_data, tmp_path):
    report = zolite.tune(tiny_model, "sst2", data=small_data, run_dir=tmp_path / "run", layer="1", steps=20,
                         eval_every=0, batch_size=4, lr=1e30, eps=1.0, progress=False)
    assert report["diverged_at_step"] is not None and report["steps"] == report["diverged_at_step"] < 20
    assert report["kept_step"] == 0
    patch = zolite.load_patch(report["patch"])
    base = dict(zolite.load_model(tiny_model).model.named_parameters())
    assert all(torch.equal(t, base[n].half()) for n, t in patch.tensors.items())   # the weights it started from


def test_a_diverged_keep_last_run_falls_back_to_the_best_val_step(tiny_model, small_data, tmp_path, monkeypatch):
    """--keep last tracks the best val weights too: when the loss turns nan at step 5, the patch is step 2's (the
    best val score), not the base's."""
    val_scores = iter([0.1, 0.5, 0.3])   # the val checks at steps 0, 2, 4
    monkeypatch.setattr(sys.modules["zolite.tune"], "accuracy_report", lambda *args, **kwargs: {"score": next(val_scores)})
    step = Stepper.step
    monkeypatch.setattr(Stepper, "step", lambda self, i, rows: float("nan") if i == 4 else step(self, i, rows))
    report = zolite.tune(tiny_model, "sst2", data=small_data, run_dir=tmp_path / "run", layer="1", steps=8,
                         eval_every=2, batch_size=4, lr=1e-2, keep="last", progress=False)
    assert report["diverged_at_step"] == 5 and report["val_curve"] == [[0, 0.1], [2, 0.5], [4, 0.3]]
    assert report["kept_step"] == 2


def test_relative_eps_perturbs_by_the_weights_scale():
    """eps relative: tensor i moves by eps * RMS(W_i) * z, and the estimate is the gradient preconditioned by RMS^2."""
    model = Quadratic()
    tuned = TunedLayers(model, [0], eps_scale="relative")
    rms = model.model.layers[0].weight.pow(2).mean().sqrt().item()
    assert tuned.scales == [pytest.approx(rms)]
    stepper = QuadraticStepper(model, tuned, estimator="spsa", eps=1e-3, lr=0.0)
    stepper.plain = lambda: False
    seen = []
    stepper.optimizer.step = lambda direction: seen.append(direction(0).clone())
    for step in range(4000):
        stepper.step(step, [])
    mean, true = torch.stack(seen).mean(0), rms ** 2 * model.gradient()
    assert torch.nn.functional.cosine_similarity(mean.flatten(), true.flatten(), dim=0) > 0.97
    assert (mean.norm() / true.norm()).item() == pytest.approx(1.0, abs=0.15)


def test_relative_eps_run_replays_from_its_trajectory(tiny_model, small_data, tmp_path):
    from zolite.apply import replay
    from zolite.trajectory import trajectory_path

    report = zolite.tune(tiny_model, "sst2", data=small_data, run_dir=tmp_path / "run", layer="2", steps=5,
                         eval_every=0, batch_size=4, lr=10.0, eps=0.05, eps_scale="relative", progress=False)
    dense = zolite.load_patch(report["patch"])
    replayed = replay(zolite.load_model(tiny_model).model, zolite.load_patch(trajectory_path(report["patch"])))
    assert all(torch.equal(replayed.tensors[k], dense.tensors[k]) for k in dense.tensors)
