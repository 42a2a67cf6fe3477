"""The step size from the model: the curvature probe, the guard, and both inside a tune run."""
from __future__ import annotations

import importlib
import json
import math
import random

import pytest
import torch

from zolite.stepsize import (KAPPA, PROBE_EPS, PROBES, LossGuard, effective_updates, guard_reference, probe_lr,
                             probe_seed, schedule_factor)


def quadratic_pair_losses(h: torch.Tensor, b: torch.Tensor, noise: float = 0.0):
    """l(w) = 1/2 w'Hw + b'w at w = 0 + sign eps z (z seeded like zolite's), plus optional loss noise."""
    rng = random.Random(0)

    def pair_losses(examples, seed, eps):
        z = torch.randn(h.numel(), generator=torch.Generator().manual_seed(seed % (1 << 62)), dtype=torch.float64)
        out = []
        for sign in (1, -1):
            w = sign * eps * z
            out.append(float(0.5 * (h * w * w).sum() + b @ w) + noise * rng.gauss(0, 1))
        return out[0], out[1]
    return pair_losses


def test_the_probe_measures_the_trace_of_the_hessian():
    torch.manual_seed(0)
    h = torch.rand(500, dtype=torch.float64) * 4            # tr H = ~1000
    b = torch.randn(500, dtype=torch.float64)
    probe = probe_lr(quadratic_pair_losses(h, b), [([], [])] * PROBES, run_seed=0, eps=1e-3)
    assert probe.eps == PROBE_EPS
    assert probe.curvature == pytest.approx(h.sum().item(), rel=0.1)   # E[z'Hz] = tr H, over 24 draws
    assert probe.lr == pytest.approx(KAPPA / probe.curvature) and probe.note == ""
    assert probe.signal == pytest.approx((b * b).sum().item(), rel=0.5)   # both "batches" share b here


def test_a_noisy_curvature_gives_a_smaller_step_never_a_larger_one():
    h = torch.full((50,), 0.01, dtype=torch.float64)            # tr H = 0.5: drowned by the loss noise below
    b = torch.zeros(50, dtype=torch.float64)
    probe = probe_lr(quadratic_pair_losses(h, b, noise=1e-3), [([], [])] * PROBES, run_seed=0, eps=1e-3)
    assert probe.curvature_se > probe.curvature / 3
    assert probe.used_curvature >= 3 * probe.curvature_se and probe.lr <= KAPPA / (3 * probe.curvature_se)
    assert "not clearly above its noise" in probe.note


def test_the_guards_reference_is_the_runs_loss_not_the_unperturbed_one():
    """Each step's loss is the mean of l+ and l-, which sits eps^2 c / 2 above the unperturbed l0 (0.07 on Qwen2.5's
    RTE at eps 1e-2). Against l0, a run that has not moved looks worse than the base in every block; against the
    run's own loss at the base, it does not."""
    torch.manual_seed(0)
    h = torch.rand(500, dtype=torch.float64) * 8              # tr H = ~2000: eps^2 c / 2 = 0.1 at eps 1e-2
    pair_losses = quadratic_pair_losses(h, torch.zeros(500, dtype=torch.float64))
    for eps in (1e-2, 1e-3):                                  # the probe's own eps, and a smaller run eps
        probe = probe_lr(pair_losses, [([], [])] * PROBES, run_seed=0, eps=eps)
        at_run_eps = [sum(pair_losses([], probe_seed(0, k), eps)) / 2 for k in range(PROBES)]
        assert probe.reference == pytest.approx(at_run_eps, rel=1e-9)

    probe = probe_lr(pair_losses, [([], [])] * PROBES, run_seed=0, eps=1e-2)
    rng = random.Random(2)
    standing_still = [sum(pair_losses([], 10_000 + t, 1e-2)) / 2 + 0.05 * rng.gauss(0, 1) for t in range(1000)]
    guard = LossGuard(window=25, reference=probe.reference, returns=True)
    assert not any(guard.check(standing_still[:n], quiet=True) in ("halve", "return") for n in range(1, 1001))
    unperturbed = LossGuard(window=25, reference=[0.0] * PROBES, returns=True)   # l0: what it was compared to before
    assert any(unperturbed.check(standing_still[:n], quiet=True) == "return" for n in range(1, 1001))
    # a run checkpointed with the l0 reference ("base_losses") keeps it when resumed: its decisions were made with it
    assert guard_reference({"base_losses": [0.5]}) == [0.5]
    assert guard_reference({"guard_reference": [0.6], "base_losses": [0.5]}) == [0.6]


def test_the_guard_halves_the_step_when_the_loss_turns_up_and_not_on_noise():
    rng = random.Random(1)
    flat = [1.0 + 0.1 * rng.gauss(0, 1) for _ in range(2000)]
    guard = LossGuard(window=25)
    assert not any(guard.check(flat[:n], quiet=True) for n in range(1, 2001)) and guard.factor == 1.0

    down_then_up = [1.0 - 0.0005 * t + 0.05 * rng.gauss(0, 1) for t in range(400)]
    down_then_up += [0.8 + 0.002 * t + 0.05 * rng.gauss(0, 1) for t in range(400)]
    guard = LossGuard(window=25)
    trips = [n for n in range(1, 801) if guard.check(down_then_up[:n], quiet=True)]
    assert trips and 400 < trips[0] <= 600 and guard.factor == 0.5 ** len(trips)
    again = LossGuard(window=25)
    again.replay(down_then_up)   # a resumed run rebuilds the same state from its losses
    assert again.backoffs == guard.backoffs and again.factor == guard.factor


def test_the_guard_goes_back_to_the_weights_of_the_lowest_block():
    """With returns (plain MeZO): the weights the lowest block so far started from are kept; with a halving, back
    to them."""
    rng = random.Random(2)
    down_then_up = [1.0 - 0.0005 * t + 0.02 * rng.gauss(0, 1) for t in range(400)]
    down_then_up += [0.8 + 0.002 * t + 0.02 * rng.gauss(0, 1) for t in range(400)]
    guard = LossGuard(window=25, reference=[1.0 + 0.02 * rng.gauss(0, 1) for _ in range(8)], returns=True)
    said = {n: guard.check(down_then_up[:n], quiet=True) for n in range(1, 801)}
    said = {n: a for n, a in said.items() if a}
    first = min(n for n, a in said.items() if a == "return")
    assert said[100] == said[200] == said[300] == said[400] == "snapshot"   # each block lower than the last
    assert guard.returned[0] == [first, 300] and guard.backoffs[0][0] == first   # back to the lowest block's start
    assert all(a == "return" for n, a in said.items() if n > 400)   # the loss only climbs after step 400
    again = LossGuard(window=25, reference=guard.reference, returns=True)
    again.replay(down_then_up)
    assert (again.snapshots, again.returned, again.backoffs) == (guard.snapshots, guard.returned, guard.backoffs)
    assert [again.action_at(n) for n in range(801)] == [said.get(n) for n in range(801)]


def test_the_updates_a_return_undid_are_left_out():
    assert effective_updates(10, []) == list(range(10))
    assert effective_updates(10, [[6, 4]]) == [0, 1, 2, 3, 6, 7, 8, 9]          # 4 and 5 were undone at step 6
    assert effective_updates(10, [[6, 4], [9, 6]]) == [0, 1, 2, 3, 9]            # step 6's weights were step 4's
    assert effective_updates(5, [[6, 4]]) == [0, 1, 2, 3, 4]                     # before the return: all of them
    assert effective_updates(3, [[2, 0]]) == [2]


def _tune(model, small_data, tmp_path, name, **options):
    import zolite

    return zolite.tune(model, "sst2", run_dir=tmp_path / name, data=small_data, layer="1", batch_size=4,
                       progress=False, **options)


def test_tune_probes_its_lr_and_says_so(tiny_model, small_data, tmp_path):
    report = _tune(tiny_model, small_data, tmp_path, "auto", steps=4, eval_every=2)
    lr = report["lr"]
    assert lr["source"] == "probe" and lr["lr"] == pytest.approx(KAPPA / lr["probe"]["used_curvature"], rel=1e-3)
    assert report["config"]["lr"] == lr["lr"]                      # the patch's hparams hold the number used
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["lr"] == "auto"   # the run asked for auto
    assert report["forward_passes"] == 2 * 4 and lr["forwards"] == lr["probe"]["forwards"] == 6 * PROBES
    given = _tune(tiny_model, small_data, tmp_path, "given", steps=2, eval_every=0, lr=1e-3)
    assert given["lr"] == {"lr": 1e-3, "source": "given", "probe": None, "schedule": "constant", "backoffs": [],
                           "returned": [], "forwards": 16}


@pytest.fixture
def short_guard(monkeypatch):
    """Guard windows of 5 steps (blocks of 20), so a test run of 80 steps is checked three times."""
    monkeypatch.setattr(importlib.import_module("zolite.stepsize"), "guard_window", lambda steps: 5)


@pytest.fixture
def bowl_loss(monkeypatch):
    """The tuned layer's real weights and z, under a loss whose answer is known: l(W) = 1 - exp(-||W - T||^2 / s),
    T = the base weights plus a fixed offset (l = 0.4 at the base). Bounded, so a step too large drives it towards
    1 instead of to inf; a forward-free, noise-free stand-in for the model's loss (a tiny random model's loss barely
    answers its weights)."""
    optim = importlib.import_module("zolite.optim")
    targets = {}

    def losses(model, tuned, examples, batch_of, seed, eps, objective, micro_batch=None, world=None, graphs=None):
        if not targets:
            gen = torch.Generator().manual_seed(0)
            for i, name in enumerate(tuned.names):
                targets[name] = tuned.master(i).double() + 0.1 * torch.randn(tuned.params[i].shape, generator=gen,
                                                                              dtype=torch.float64)
            targets["_scale"] = sum(float((tuned.master(i).double() - targets[n]).pow(2).sum())
                                    for i, n in enumerate(tuned.names)) / -math.log(0.6)
        out = []
        for sign in (1, -1):
            d2 = 0.0
            for i, name in enumerate(tuned.names):
                z, scale = tuned.z(seed, i)
                w = tuned.master(i).double() + sign * eps * scale * z.double()
                d2 += float((w - targets[name]).pow(2).sum())
            out.append(1 - math.exp(-d2 / targets["_scale"]))
        return out[0], out[1]
    monkeypatch.setattr(optim, "micro_batched_losses", losses)


@pytest.mark.parametrize("given, indices, profile_lr_kept", [
    ({}, [1], True),                                     # the weights it was chosen for
    ({"layer": "1"}, [1], True),                         # the same layer, named
    ({"layer": "all"}, [0, 1], False),                   # every layer wants a smaller step
    ({"layer": "0"}, [0], False),
    ({"params": "norm"}, [1], False),                    # a part of the layer
    ({"eps_scale": "activation"}, [1], False),           # z scaled otherwise
    ({"layer": "all", "lr": 1e-4}, [0, 1], None),        # an lr given is taken as given
    ({"layer": "all", "optimizer": "adam"}, [0, 1], True),   # Adam's step has no probe: the profile's lr, as before
])
def test_a_profiles_lr_is_kept_for_the_weights_it_was_chosen_for(given, indices, profile_lr_kept, capsys):
    from types import SimpleNamespace

    from zolite.profile import Profile
    from zolite.tasks import get_task
    from zolite.tune_setup import TuneConfig, fill_defaults

    profile = Profile(name="p", description="", source="hub:x/y", arch="llama", num_layers=2, dominant_layer=1,
                      defaults={"lr": 3e-4})
    loaded = SimpleNamespace(profile=profile, dtype=torch.float32, device=torch.device("cpu"), mode="fp16")
    config = fill_defaults(TuneConfig(**given), loaded, indices, 2, get_task("sst2"))
    expected = {True: 3e-4, False: "auto", None: given.get("lr")}[profile_lr_kept]
    assert config.lr == expected
    said = capsys.readouterr().err
    assert ("profile p's lr 0.0003 was chosen for layer 1's weights" in said) == (profile_lr_kept is False)


def test_a_deliberately_large_lr_is_caught_and_the_run_does_not_diverge(tiny_model, small_data, tmp_path,
                                                                        short_guard, bowl_loss):
    probed = _tune(tiny_model, small_data, tmp_path, "probed", steps=1, eval_every=0)["lr"]["lr"]
    report = _tune(tiny_model, small_data, tmp_path, "large", steps=80, eval_every=40, lr=1000 * probed)
    backoffs = report["lr"]["backoffs"]
    assert backoffs and backoffs[0] == [40, 0.5], "the guard did not halve the step at its first check"
    assert report["diverged_at_step"] is None and all(math.isfinite(x) for x in report["loss_curve"])
    unguarded = _tune(tiny_model, small_data, tmp_path, "unguarded", steps=80, eval_every=40, lr=1000 * probed,
                      guard=False)
    assert unguarded["lr"]["backoffs"] is None and unguarded["loss_curve"][:40] == report["loss_curve"][:40]


def test_a_guarded_run_resumes_bit_for_bit(tiny_model, small_data, tmp_path, monkeypatch, short_guard, bowl_loss):
    """Cut off after its first halving, a run resumes to the same patch as the uninterrupted run."""
    from safetensors.torch import load_file

    import zolite

    tune_module = importlib.import_module("zolite.tune")
    options = dict(steps=80, eval_every=40, lr=0.5)
    full = _tune(tiny_model, small_data, tmp_path, "full", **options)
    assert full["lr"]["backoffs"] and full["lr"]["returned"]   # it halved and went back to kept weights
    first = full["lr"]["backoffs"][0][0]
    real_save = tune_module._save

    def save_then_stop(run_dir, tuned, stepper, best, state, trained_on):
        real_save(run_dir, tuned, stepper, best, state, trained_on)
        if state["step"] > first:
            raise KeyboardInterrupt
    monkeypatch.setattr(tune_module, "SEED_CHECKPOINT_S", 0)   # a seed checkpoint after every step
    monkeypatch.setattr(tune_module, "_save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        _tune(tiny_model, small_data, tmp_path, "cut", **options)
    monkeypatch.setattr(tune_module, "_save", real_save)
    resumed = zolite.tune(None, None, resume=tmp_path / "cut", progress=False)
    assert resumed["lr"]["backoffs"] == full["lr"]["backoffs"] and resumed["lr"]["returned"] == full["lr"]["returned"]
    a, b = load_file(full["patch"]), load_file(resumed["patch"])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_that_went_back_replays_from_its_trajectory(tiny_model, small_data, tmp_path, short_guard, bowl_loss):
    """The weights after a return are the kept ones: the seed trajectory leaves the undone updates out and still
    rebuilds the dense patch bit for bit (replay checks the fingerprint)."""
    import zolite
    from zolite.apply import replay
    from zolite.trajectory import trajectory_path

    report = _tune(tiny_model, small_data, tmp_path, "back", steps=80, eval_every=0, lr=0.5)
    returned = report["lr"]["returned"]
    assert returned and report["kept_step"] == 80
    seeds = zolite.load_patch(trajectory_path(report["patch"]))
    undone = returned[0][0] - returned[0][1]
    assert int(seeds.metadata["zolite.trajectory_steps"]) <= 80 - undone
    dense = zolite.load_patch(report["patch"])
    replayed = replay(zolite.load_model(tiny_model).model, seeds)
    assert all(torch.equal(replayed.tensors[k], dense.tensors[k]) for k in dense.tensors)


def test_an_older_run_whose_guard_only_halved_resumes_that_way(tiny_model, small_data, tmp_path, monkeypatch,
                                                                short_guard, bowl_loss):
    """A checkpoint of a zolite from before the guard went back (no "guard_returns" in its state) whose guard had
    halved goes on halving only, bit for bit."""
    from safetensors.torch import load_file

    import zolite

    tune_module = importlib.import_module("zolite.tune")
    real_save = tune_module._save

    def save_as_before(run_dir, tuned, stepper, best, state, trained_on):
        real_save(run_dir, tuned, stepper, best, {k: v for k, v in state.items() if k != "guard_returns"}, trained_on)
    monkeypatch.setattr(tune_module, "guard_returns", lambda run: False)   # the older zolite
    monkeypatch.setattr(tune_module, "_save", save_as_before)
    options = dict(steps=80, eval_every=40, lr=0.5)
    old = _tune(tiny_model, small_data, tmp_path, "old", **options)
    assert old["lr"]["backoffs"] and old["lr"]["returned"] is None
    first = old["lr"]["backoffs"][0][0]

    def save_then_stop(*args):
        save_as_before(*args)
        if args[4]["step"] > first:
            raise KeyboardInterrupt
    monkeypatch.setattr(tune_module, "SEED_CHECKPOINT_S", 0)
    monkeypatch.setattr(tune_module, "_save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        _tune(tiny_model, small_data, tmp_path, "cut", **options)
    monkeypatch.setattr(tune_module, "_save", real_save)
    monkeypatch.setattr(tune_module, "guard_returns", lambda run: run.stepper.plain())   # this zolite again
    resumed = zolite.tune(None, None, resume=tmp_path / "cut", progress=False)
    assert resumed["lr"]["backoffs"] == old["lr"]["backoffs"] and resumed["lr"]["returned"] is None
    a, b = load_file(old["patch"]), load_file(resumed["patch"])
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def scheduled_loss(monkeypatch, bowl_loss):
    """The bowl loss plus an offset per block of 20 steps (keyed on the step's z seed), so the guard (short_guard:
    blocks of 20) takes copies and goes back at known steps, twice to the same weights."""
    optim = importlib.import_module("zolite.optim")
    inner = optim.micro_batched_losses
    step_of = {optim.z_seed(0, t, 0): t for t in range(200)}
    offsets = [-0.01, -0.02, 0.05, -0.03, 0.05, 0.05, -0.04, 0.06]

    def losses(model, tuned, examples, batch_of, seed, eps, objective, micro_batch=None, world=None, graphs=None):
        plus, minus = inner(model, tuned, examples, batch_of, seed, eps, objective, micro_batch, world, graphs)
        t = step_of.get(seed)
        offset = 0.0 if t is None else offsets[t // 20]
        return plus + offset, minus + offset
    monkeypatch.setattr(optim, "micro_batched_losses", losses)


def test_chained_returns_resume_and_replay_bit_for_bit(tiny_model, small_data, tmp_path, monkeypatch, short_guard,
                                                      scheduled_loss):
    """Returns after returns, the best val step inside an undone stretch, cut-offs between a copy and a return and
    at a return: each resumes to the uninterrupted run's patch and trajectory."""
    import zolite
    from zolite.apply import replay
    from zolite.trajectory import trajectory_path

    tune_module = importlib.import_module("zolite.tune")
    real_check_val = tune_module.check_val

    def check_val(run, state, best, profiler):   # val peaks at step 50 (later undone) and 90
        run.val_score = lambda: {50: 0.9, 90: 0.95}.get(state["step"], 0.5)
        return real_check_val(run, state, best, profiler)
    monkeypatch.setattr(tune_module, "check_val", check_val)
    options = dict(steps=160, eval_every=10, lr=0.01, keep="best")
    full = _tune(tiny_model, small_data, tmp_path, "full", **options)
    returned = full["lr"]["returned"]
    assert len(returned) >= 3 and len({k for _, k in returned}) < len(returned), returned   # back to one copy twice
    assert full["kept_step"] == 90 and any(k < 50 < n for n, k in returned)   # val's best was later undone once
    dense, seeds = zolite.load_patch(full["patch"]), zolite.load_patch(trajectory_path(full["patch"]))
    replayed = replay(zolite.load_model(tiny_model).model, seeds)
    assert all(torch.equal(replayed.tensors[k], dense.tensors[k]) for k in dense.tensors)

    real_save = tune_module._save
    first_return = returned[0][0]
    for cut in (first_return - 1, first_return, returned[1][0] + 1):
        def save_then_stop(run_dir, tuned, stepper, best, state, trained_on, cut=cut):
            real_save(run_dir, tuned, stepper, best, state, trained_on)
            if state["step"] == cut:
                raise KeyboardInterrupt
        monkeypatch.setattr(tune_module, "SEED_CHECKPOINT_S", 0)
        monkeypatch.setattr(tune_module, "_save", save_then_stop)
        with pytest.raises(KeyboardInterrupt):
            _tune(tiny_model, small_data, tmp_path, f"cut{cut}", **options)
        monkeypatch.setattr(tune_module, "_save", real_save)
        resumed = zolite.tune(None, None, resume=tmp_path / f"cut{cut}", progress=False)
        assert resumed["lr"] == full["lr"] and resumed["kept_step"] == full["kept_step"], cut
        assert (trajectory_path(resumed["patch"]).read_bytes() == trajectory_path(full["patch"]).read_bytes()
                and zolite.load_patch(resumed["patch"]).tensors.keys() == dense.tensors.keys())
        again = zolite.load_patch(resumed["patch"])
        assert all(torch.equal(again.tensors[k], dense.tensors[k]) for k in dense.tensors), cut


def test_the_schedules_decay_from_the_lr_towards_zero():
    assert [schedule_factor("constant", t, 4) for t in range(4)] == [1.0] * 4
    assert [schedule_factor("linear", t, 4) for t in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert [schedule_factor("cosine", t, 4) for t in range(4)] == pytest.approx([1.0, 0.8536, 0.5, 0.1464], abs=1e-4)


def test_a_scheduled_run_records_the_decayed_steps(tiny_model, small_data, tmp_path, monkeypatch):
    """Each update's recorded slope is the step's (l+ - l-) / 2eps times the schedule's factor: the seed trajectory
    (which replays the run) holds the decayed steps, and the report says which schedule ran."""
    import zolite
    from zolite.optim import Stepper
    from zolite.trajectory import trajectory_path

    seen, pair_losses = [], Stepper.pair_losses

    def recording(self, examples, seed, eps=None):
        plus, minus = pair_losses(self, examples, seed, eps)
        seen.append((plus - minus) / (2 * self.eps))
        return plus, minus
    monkeypatch.setattr(Stepper, "pair_losses", recording)
    report = _tune(tiny_model, small_data, tmp_path, "linear", steps=4, eval_every=0, lr=1e-2, guard=False,
                   lr_schedule="linear")
    grads = zolite.load_patch(trajectory_path(report["patch"])).tensors["trajectory.grads"].tolist()
    assert report["lr"]["schedule"] == "linear" and len(seen) == 4
    assert grads == [g * f for g, f in zip(seen, [1.0, 0.75, 0.5, 0.25])]


def test_tune_says_which_schedule_ran(tiny_model, small_data, tmp_path):
    from conftest import run_cli

    result = run_cli("tune", "--model", tiny_model, "--data", small_data, "--layer", "1", "--steps", "2",
                     "--eval-every", "0", "--batch-size", "2", "--lr", "2e-3", "--lr-schedule", "cosine", "--quiet",
                     "--run-dir", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "lr: 0.002 (as given, cosine decay to 0)" in result.output
