"""The fast step's pieces (issue 23): the doubled-batch forward of small layers (z drawn once per module, W + eps z
and W - eps z side by side) equals the per-half path and the explicit perturbation; the perturbed weights have the
per-half path's bits; z and the update are unchanged (old seed checkpoints and trajectories replay); scoring by
length buckets gives the unbucketed scores."""
from __future__ import annotations

import sys

import pytest
import torch

import zolite
import zolite.zo as zo
from zolite.data import bundled_file, iter_rows
from zolite.evaluate import encode_rows, score_encoded
from zolite.scoring import candidate_scores, collate, last_hidden, pad_token_id
from zolite.tasks import get_task
from zolite.zo import RESIDUAL_SCALE, TunedLayers, sample_z, spsa_losses, step_seed


def _batch(loaded, task="sst2", n=6):
    rows = [r for r, _ in zip(iter_rows(bundled_file(task)), range(n))]
    return collate(encode_rows(loaded.tokenizer, get_task(task), rows, 512), pad_token_id(loaded.tokenizer))


def _per_half_weight(tuned, seed, i, eps, sign):
    """What the per-half path (and zolite before the fused path) gives a module: (z * sign eps s + W) + r / 2^12."""
    p, r = tuned.params[i], tuned.residuals[i]
    z, scale = tuned.z(seed, i)
    w = z.mul_(sign * eps * scale).add_(p)
    if r is not None:
        w.add_(r, alpha=1 / RESIDUAL_SCALE)
    return w.to(p.dtype)


def test_z_stream_is_pinned():
    """z of (seed, tensor) as every earlier zolite drew it on the CPU (a new generator per tensor): recorded seeds
    replay to the same weights. The generator is now made once and reseeded; the numbers must not move."""
    seed = step_seed(0, 3)
    z = sample_z(seed, 2, torch.zeros(5, 7))
    assert z.flatten()[:4].tolist() == [-0.9703479409217834, -0.5013401508331299, -1.6207287311553955,
                                        0.8657219409942627]
    for shape, index in (((3,), 0), ((40, 30), 5), ((7, 1), 1)):   # interleaved draws of odd and even sizes
        fresh = torch.randn(shape, generator=torch.Generator().manual_seed(zo.tensor_seed(seed, index)))
        sample_z(seed + 1, index, torch.zeros(1))
        assert torch.equal(sample_z(seed, index, torch.zeros(shape)), fresh)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_fused_perturbation_has_the_per_half_bits(tiny_model, dtype):
    """W + eps z and W - eps z as the fused path builds them (z once, chunked for half precision) equal the per-half
    path's bit for bit, residuals and scale tensors included, and W +- eps z to float precision."""
    tuned = TunedLayers(zolite.load_model(tiny_model, dtype=dtype).model, [1, 2])
    for step in range(3):   # residuals that are not zero
        tuned.sgd_update(step, 0.8, 1e-3, weight_decay=0.1)
    scales = {n: torch.rand(p.shape[-1]) + 0.5 for n, p in zip(tuned.names, tuned.params) if p.dim() == 2}
    tuned.set_scales(dict(list(scales.items())[:2]))
    eps, seed = 1e-2, 11
    for i, p in enumerate(tuned.params):
        offset = tuned._offset(seed, i, eps)
        for sign in (1, -1):
            fused = tuned._perturbed_weight(i, offset, sign)
            assert fused.dtype == p.dtype and torch.equal(fused, _per_half_weight(tuned, seed, i, eps, sign))
            z, scale = tuned.z(seed, i)
            exact = tuned.master(i).double() + sign * eps * scale * z.double()
            rtol = {"float32": 1e-6, "float16": 1e-3, "bfloat16": 8e-3}[dtype]   # one rounding to the dtype
            torch.testing.assert_close(fused.double(), exact, rtol=rtol, atol=1e-6)


def test_fused_perturbation_in_chunks(tiny_model, monkeypatch):
    """A half-precision tensor's perturbed weight is built a chunk at a time: the same bits as in one piece."""
    tuned = TunedLayers(zolite.load_model(tiny_model, dtype="float16").model, [1])
    tuned.sgd_update(0, 1.0, 1e-3)
    whole = [tuned._perturbed_weight(i, tuned._offset(5, i, 1e-2), -1) for i in range(len(tuned.params))]
    monkeypatch.setattr(zo, "UPDATE_CHUNK", 300)
    for i, w in enumerate(whole):
        assert torch.equal(tuned._perturbed_weight(i, tuned._offset(5, i, 1e-2), -1), w)


@pytest.mark.parametrize("model", ["tiny_model", "tiny_qwen2"])
def test_fused_forward_equals_the_per_half_forward(model, request):
    """l+ and l- from one doubled forward (batched matmuls, q/k/v biases for Qwen2) equal the per-half path's."""
    loaded = zolite.load_model(request.getfixturevalue(model))
    for layers, task in (([1], "sst2"), ([0, 1, 2], "boolq"), ([2], "boolq")):
        assert_fused_equals_per_half(loaded.model, TunedLayers(loaded.model, layers), _batch(loaded, task))


def assert_fused_equals_per_half(model, tuned, batch):
    """One z's l+ and l- from the doubled forward equal the per-half path's (up to the matmuls' rounding)."""
    assert tuned.fused
    fused = spsa_losses(model, tuned, batch, seed=3, eps=1e-2, objective="ce")
    tuned.fused = False
    per_half = spsa_losses(model, tuned, batch, seed=3, eps=1e-2, objective="ce")
    tuned.fused = True
    assert fused[0] != fused[1]
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(per_half), rtol=1e-5, atol=1e-5)


def test_fused_forward_is_deterministic_and_leaves_the_model_as_it_was(tiny_model):
    """The default (fused) path: the same losses bit for bit when repeated; afterwards the model's forwards, its
    modules' forward methods and its parameters are the base's."""
    loaded = zolite.load_model(tiny_model, dtype="float16")
    batch = _batch(loaded, "boolq")
    tuned = TunedLayers(loaded.model, [1, 3])
    assert tuned.fused
    with torch.inference_mode():
        before = candidate_scores(loaded.model, batch, last_hidden(loaded.model, batch.input_ids))
    first = spsa_losses(loaded.model, tuned, batch, seed=9, eps=1e-2, objective="ce")
    assert spsa_losses(loaded.model, tuned, batch, seed=9, eps=1e-2, objective="ce") == first
    assert all("forward" not in m.__dict__ for m in loaded.model.modules())
    assert all(m._parameters[a] is p for (m, a), p in zip(tuned.owner, tuned.params))
    with torch.inference_mode():
        after = candidate_scores(loaded.model, batch, last_hidden(loaded.model, batch.input_ids))
    assert torch.equal(before, after)


def test_large_layers_take_the_per_half_path(tiny_model, monkeypatch):
    """Tensors of FUSED_MAX_NUMEL elements and up run per half (one perturbed weight alive at a time), as before."""
    monkeypatch.setattr(zo, "FUSED_MAX_NUMEL", 1000)
    loaded = zolite.load_model(tiny_model)
    tuned = TunedLayers(loaded.model, [1])
    assert not tuned.fused
    plus, minus = spsa_losses(loaded.model, tuned, _batch(loaded), seed=2, eps=1e-2, objective="ce")
    assert plus != minus


def test_update_is_unchanged(tiny_model):
    """sgd_update's bits: W <- W - lr (g z + wd W) in fp32 on weight + residual, written out here with z drawn from a
    new generator per tensor as zolite always drew it."""
    for dtype in ("float32", "float16"):
        tuned = TunedLayers(zolite.load_model(tiny_model, dtype=dtype).model, [2])
        expected = [tuned.master(i).clone() for i in range(len(tuned.params))]
        for step, g in enumerate((0.7, -1.3, 2.1)):
            seed = step_seed(4, step)
            tuned.sgd_update(seed, g, 1e-3, weight_decay=0.1)
            for i, p in enumerate(tuned.params):
                z = torch.randn(p.shape, generator=torch.Generator().manual_seed(zo.tensor_seed(seed, i)))
                if p.dim() >= 2:
                    expected[i].mul_(1 - 1e-3 * 0.1)
                expected[i].add_(z, alpha=-1e-3 * g)
                if tuned.residuals[i] is not None:   # the value rounded into weight + residual
                    w = expected[i].to(p.dtype)
                    expected[i] = w.float().add_((expected[i] - w.float()).mul_(RESIDUAL_SCALE).to(p.dtype),
                                                 alpha=1 / RESIDUAL_SCALE)
        for i in range(len(tuned.params)):
            assert torch.equal(tuned.master(i), expected[i]), (dtype, tuned.names[i])


@pytest.mark.parametrize("params", ["bias,norm", "norm"])
def test_vectors_together_have_the_one_by_one_bits(tiny_qwen2, params, monkeypatch):
    """Half-precision vectors perturbed and updated as one concatenation (TunedLayers.together): l+ and l- and,
    after three steps, every weight and residual bit for bit as one vector at a time, scale tensors included; z drawn
    once a step instead of twice."""
    draws = []
    sample_z = zo.sample_z
    monkeypatch.setattr(zo, "sample_z", lambda *a, **k: draws.append(1) or sample_z(*a, **k))
    runs = []
    for together in (True, False):
        loaded = zolite.load_model(tiny_qwen2, dtype="float16")
        tuned = TunedLayers(loaded.model, [0, 1, 2], params=params)
        assert tuned.together and tuned.fused
        gen = torch.Generator().manual_seed(0)
        tuned.set_scales({n: torch.rand(p.shape[-1], generator=gen) + 0.5
                          for n, p in zip(tuned.names, tuned.params) if "norm" in n})
        tuned.together = together
        batch = _batch(loaded, "boolq")
        losses, draws[:] = [], []
        for step, g in enumerate((0.7, -1.3, 2.1)):
            seed = step_seed(4, step)
            losses.append(spsa_losses(loaded.model, tuned, batch, seed, 1e-2, "ce"))
            tuned.sgd_update(seed, g, 1e-3)
        assert len(draws) == (1 if together else 2) * 3 * len(tuned.params)
        tuned.sgd_update(step_seed(4, 3), 0.5, 1e-3)   # a replayed step: z drawn outside the forward's inference mode
        runs.append((losses, tuned.exact_state()))
    (together_losses, together_state), (one_by_one_losses, one_by_one_state) = runs
    assert together_losses == one_by_one_losses
    assert all(torch.equal(together_state[k], one_by_one_state[k]) for k in one_by_one_state)
    assert any(k.endswith("#residual") and together_state[k].any() for k in together_state)


def test_a_failure_building_the_pairs_leaves_the_model_as_it_was(tiny_qwen2, monkeypatch):
    """The pairs are built before any forward is wrapped: an error there (out of memory, say) leaves no layer
    doubling its batch."""
    loaded = zolite.load_model(tiny_qwen2, dtype="float16")
    tuned = TunedLayers(loaded.model, [0, 1], params="bias,norm")

    def fail(*_):
        raise RuntimeError("out of memory")
    monkeypatch.setattr(tuned, "_pairs_together", fail)
    with pytest.raises(RuntimeError):
        spsa_losses(loaded.model, tuned, _batch(loaded), seed=1, eps=1e-2, objective="ce")
    assert all("forward" not in m.__dict__ for m in loaded.model.modules())


def test_matrices_fp32_and_relative_scales_are_not_together(tiny_qwen2):
    """Together takes vectors with residuals (half precision) and one scalar scale for every vector's z."""
    half = zolite.load_model(tiny_qwen2, dtype="float16").model
    assert not TunedLayers(half, [0]).together   # a whole layer's matrices: one by one
    assert not TunedLayers(zolite.load_model(tiny_qwen2).model, [0], params="bias,norm").together
    tuned = TunedLayers(half, [0], params="bias,norm", eps_scale="relative")
    assert tuned.together and tuned._common_scale() is None   # each vector's own RMS: one by one


def _reference_collate(encoded, pad_id):
    """collate as zolite wrote it before issue 23 (row by row), the layout the faster one must keep."""
    n_cand = max(len(e.answers) for e in encoded)
    seq_index, rows, positions, targets, owners = {}, [], [], [], []
    for ei, e in enumerate(encoded):
        for ci, (seq, ans) in enumerate(zip(e.sequences, e.answers)):
            s = seq_index.setdefault(seq, len(seq_index))
            for k, tok in enumerate(ans):
                rows.append(s)
                positions.append(len(seq) - len(ans) + k)
                targets.append(tok)
                owners.append(ei * n_cand + ci)
    input_ids = torch.full((len(seq_index), max(len(s) for s in seq_index)), pad_id, dtype=torch.long)
    for seq, s in seq_index.items():
        input_ids[s, :len(seq)] = torch.tensor(seq)
    accepted = torch.zeros(len(encoded), n_cand, dtype=torch.bool)
    for ei, e in enumerate(encoded):
        accepted[ei, list(e.accepted)] = True
    return input_ids, torch.tensor(rows), torch.tensor(positions), torch.tensor(targets), torch.tensor(owners), accepted


def test_collate_and_batch_order_are_unchanged(tiny_model):
    """The step's host-side pieces made faster keep their output: collate's tensors, and each step's rows."""
    import random

    from zolite.data import batches_for_step

    from zolite.scoring import EncodedExample

    loaded = zolite.load_model(tiny_model)
    uneven = [EncodedExample(sequences=((5, 6, 7, 8), (5, 6, 9, 10, 11), (5, 6, 12)),
                             answers=((7, 8), (9, 10, 11), (12,)), label=1, accepted=(1, 2), context=(5, 6)),
              EncodedExample(sequences=((3, 4), (3, 5)), answers=((4,), (5,)), label=0, accepted=(0,), context=(3,))]
    for task, n in (("sst2", 16), ("boolq", 16), (None, 0)):
        encoded = uneven if task is None else encode_rows(
            loaded.tokenizer, get_task(task), [r for r, _ in zip(iter_rows(bundled_file(task)), range(n))], 512)
        batch = collate(encoded, 7)
        for got, want in zip((batch.input_ids, batch.rows, batch.positions, batch.targets, batch.owners,
                              batch.accepted), _reference_collate(encoded, 7)):
            assert got.dtype == want.dtype and torch.equal(got, want), task
    for n_rows, size, seed in ((40, 16, 0), (7, 16, -3), (1000, 16, 5)):
        for step in range(12):
            want, start = [], step * size
            while len(want) < size:
                epoch, offset = divmod(start + len(want), n_rows)
                order = list(range(n_rows))
                random.Random(f"{seed}-epoch-{epoch}").shuffle(order)
                want.extend(order[offset:offset + size - len(want)])
            assert batches_for_step(n_rows, size, step, seed) == want


def test_scoring_in_length_buckets_equals_unbucketed(tiny_model):
    """Val scoring sorts rows by length and pads each batch to its own longest row: the scores (and so accuracy)
    equal scoring every row alone and scoring all rows in one batch padded to the longest."""
    loaded = zolite.load_model(tiny_model)
    rows = [r for r, _ in zip(iter_rows(bundled_file("boolq")), range(10))]
    encoded = encode_rows(loaded.tokenizer, get_task("boolq"), rows, 512)
    assert len({len(e.sequences[0]) for e in encoded}) > 5
    bucketed = score_encoded(loaded.model, loaded.tokenizer, encoded, batch_size=3)
    one_batch = score_encoded(loaded.model, loaded.tokenizer, encoded, batch_size=len(encoded))
    alone = torch.cat([score_encoded(loaded.model, loaded.tokenizer, [e], batch_size=1) for e in encoded])
    torch.testing.assert_close(bucketed, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bucketed, one_batch, rtol=1e-5, atol=1e-5)
    assert torch.equal(bucketed.argmax(-1), alone.argmax(-1))


def test_tf32_holds_for_the_run_only(tiny_model, tmp_path, monkeypatch):
    """--tf32 sets fp32 matmuls to TF32 ("high") for a GPU run's set-up, steps and scoring, and restores the
    process's setting after; on the CPU it changes nothing (the same patch bits)."""
    from zolite.tune_setup import fp32_matmuls

    before = torch.get_float32_matmul_precision()
    with fp32_matmuls(True):
        assert torch.get_float32_matmul_precision() == "high"
        with fp32_matmuls(False):
            assert torch.get_float32_matmul_precision() == "highest"
        assert torch.get_float32_matmul_precision() == "high"
    assert torch.get_float32_matmul_precision() == before
    tune_module = sys.modules["zolite.tune"]
    seen, real_load = [], tune_module.load_for_tuning

    def spy(*args, **kwargs):
        seen.append(torch.get_float32_matmul_precision())
        return real_load(*args, **kwargs)
    monkeypatch.setattr(tune_module, "load_for_tuning", spy)
    common = dict(steps=3, eval_every=0, lr=1e-3, batch_size=4, layer="1", force=True, progress=False)
    plain = zolite.tune(str(tiny_model), "sst2", run_dir=tmp_path / "a", **common)
    fast = zolite.tune(str(tiny_model), "sst2", run_dir=tmp_path / "b", tf32=True, **common)
    assert torch.get_float32_matmul_precision() == before and seen == [before, before]   # CPU: untouched
    from safetensors.torch import load_file
    a, b = load_file(plain["patch"]), load_file(fast["patch"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    import json
    assert json.loads((tmp_path / "b" / "config.json").read_text())["tf32"] is True


@pytest.mark.parametrize("device, given, expected", [("cuda", None, True), ("cpu", None, False),
                                                     ("cuda", False, False), ("cpu", True, True)])
def test_a_profile_turns_graphs_and_tf32_on_for_the_gpu(device, given, expected):
    """Profile defaults `cuda_graphs` / `tf32` (SmolLM2's: measured there) apply on a GPU with unquantized weights
    only; the user's choice wins."""
    from types import SimpleNamespace

    from zolite.profile import get_profile
    from zolite.tasks import get_task
    from zolite.tune_setup import TuneConfig, fill_defaults

    profile = get_profile("smollm2-135m")
    assert profile.defaults["cuda_graphs"] is True and profile.defaults["tf32"] is True
    loaded = SimpleNamespace(profile=profile, mode="fp16", dtype=torch.float32, device=torch.device(device))
    config = fill_defaults(TuneConfig(cuda_graphs=given, tf32=given), loaded, [11], 30, get_task("sst2"))
    assert (config.cuda_graphs, config.tf32) == (expected, expected)
    other = SimpleNamespace(profile=None, mode="fp16", dtype=torch.float16, device=torch.device(device))
    assert fill_defaults(TuneConfig(), other, [1], 28, get_task("sst2")).cuda_graphs is False   # no profile: off
    quantized = SimpleNamespace(profile=profile, mode="nf4", dtype=torch.float32, device=torch.device(device))
    config = fill_defaults(TuneConfig(cuda_graphs=given, tf32=given), quantized, [11], 30, get_task("sst2"))
    assert config.cuda_graphs == config.tf32 == bool(given)   # not measured under bitsandbytes: off unless asked
