"""The ZO step: exact perturbation, no drift, no lost updates, one forward for l+ and l-."""
from __future__ import annotations

import torch

import zolite
from zolite.data import bundled_file, iter_rows
from zolite.evaluate import encode_rows
from zolite.scoring import candidate_scores, collate, last_hidden, losses, pad_token_id
from zolite.tasks import get_task
from zolite.zo import TunedLayers, sample_z, spsa_losses


def _batch(loaded, task="sst2", n=6):
    rows = [r for r, _ in zip(iter_rows(bundled_file(task)), range(n))]
    return collate(encode_rows(loaded.tokenizer, get_task(task), rows, 512), pad_token_id(loaded.tokenizer)).to(loaded.device)


def _loss_with_weights(loaded, tuned, batch, seed, eps, sign):
    """The loss with W + sign*eps*z written into the model explicitly (the slow, obvious way)."""
    saved = [p.detach().clone() for p in tuned.params]
    with torch.no_grad():
        for i, p in enumerate(tuned.params):
            p.copy_(tuned.masters[i] + sign * eps * sample_z(seed, i, tuned.masters[i]))
        loss = losses(candidate_scores(loaded.model, batch, last_hidden(loaded.model, batch.input_ids)), batch)
        for p, s in zip(tuned.params, saved):
            p.copy_(s)
    return loss.item()


def test_doubled_forward_equals_explicit_perturbation(tiny_model):
    loaded = zolite.load_model(tiny_model)
    for layers, task in (([1], "sst2"), ([0, 1, 2, 3], "boolq"), ([2, 3], "sst2")):
        batch = _batch(loaded, task)
        tuned = TunedLayers(loaded.model, layers)
        plus, minus = spsa_losses(loaded.model, tuned, batch, seed=7, eps=1e-2, objective="ce")
        assert abs(plus - _loss_with_weights(loaded, tuned, batch, 7, 1e-2, +1)) < 1e-5
        assert abs(minus - _loss_with_weights(loaded, tuned, batch, 7, 1e-2, -1)) < 1e-5
        assert plus != minus


def test_right_padding_without_mask_scores_like_one_at_a_time(tiny_model):
    loaded = zolite.load_model(tiny_model)
    rows = [r for r, _ in zip(iter_rows(bundled_file("boolq")), range(4))]
    encoded = encode_rows(loaded.tokenizer, get_task("boolq"), rows, 512)
    pad = pad_token_id(loaded.tokenizer)
    together = candidate_scores(loaded.model, (b := collate(encoded, pad).to(loaded.device)), last_hidden(loaded.model, b.input_ids))[0]
    for i, e in enumerate(encoded):
        alone = candidate_scores(loaded.model, (b := collate([e], pad).to(loaded.device)), last_hidden(loaded.model, b.input_ids))[0]
        torch.testing.assert_close(together[i], alone[0], rtol=1e-5, atol=1e-5)


def test_perturbation_never_drifts_the_weights(tiny_model):
    for dtype in ("float16", "bfloat16"):
        loaded = zolite.load_model(tiny_model, dtype=dtype)
        batch = _batch(loaded)
        tuned = TunedLayers(loaded.model, [1, 2])
        before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
        for step in range(50):
            plus, minus = spsa_losses(loaded.model, tuned, batch, seed=step, eps=1e-1, objective="ce")
            tuned.sgd_update(step, (plus - minus) / 0.2, lr=0.0)
        after = loaded.model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), dtype
        assert all(isinstance(p, torch.nn.Parameter) for p in loaded.model.parameters())


def test_many_tiny_updates_accumulate_in_fp16(tiny_model):
    """Each step is below half an fp16 ulp of the weights; the fp32 master keeps them all."""
    loaded = zolite.load_model(tiny_model, dtype="float16")
    tuned = TunedLayers(loaded.model, [1])
    i = next(k for k, p in enumerate(tuned.params) if p.dim() == 2)
    w0 = tuned.params[i].detach().double().clone()
    lr, g, steps = 1e-6, 1.0, 300
    expected = w0.clone()
    naive = tuned.params[i].detach().clone()      # what a plain fp16 W -= lr*g*z would do
    for step in range(steps):
        tuned.sgd_update(step, g, lr)
        z = sample_z(step, i, tuned.masters[i])
        expected -= lr * g * z.double()
        naive -= (lr * g * z).half()
    delta_true = (expected - w0).flatten()
    delta_ours = (tuned.params[i].detach().double() - w0).flatten()
    delta_naive = (naive.double() - w0).flatten()
    cos = torch.nn.functional.cosine_similarity
    assert cos(delta_ours, delta_true, dim=0) > 0.97
    assert cos(delta_naive, delta_true, dim=0) < 0.9   # the failure this guards against is real
    torch.testing.assert_close(tuned.masters[i].double(), expected, rtol=0, atol=1e-6)


def test_z_is_regenerated_identically_and_differs_by_tensor():
    w = torch.zeros(64, 32)
    assert torch.equal(sample_z(5, 0, w), sample_z(5, 0, w))
    assert not torch.equal(sample_z(5, 0, w), sample_z(5, 1, w))
    assert not torch.equal(sample_z(5, 0, w), sample_z(6, 0, w))


def test_half_precision_state_resumes_bit_for_bit(tiny_model):
    """Weights + residuals saved as they are and loaded into a fresh model continue exactly."""
    runs = []
    for _ in range(2):
        loaded = zolite.load_model(tiny_model, dtype="float16")
        runs.append(TunedLayers(loaded.model, [1]))
    first, second = runs
    for step in range(20):
        first.sgd_update(step, 1.0, 1e-5, weight_decay=0.1)
    assert any(r.abs().sum() > 0 for r in first.residuals)
    second.load({k: v.clone() for k, v in first.exact_state().items()})
    for tuned in runs:
        tuned.sgd_update(20, -0.5, 1e-5, weight_decay=0.1)
    for a, b in zip(first.exact_state().values(), second.exact_state().values()):
        assert torch.equal(a, b)
    # the fp32 view round-trips too: loading state() gives the same fp32 values back
    values = first.state()
    second.load(values)
    for name, v in second.state().items():
        torch.testing.assert_close(v, values[name], rtol=0, atol=1e-7)


def test_chunked_half_precision_update_gives_the_whole_tensor_bits(tiny_model, monkeypatch):
    """sgd_update builds a half-precision tensor's fp32 value a chunk at a time: the same bits as all at once."""
    import zolite.zo as zo

    monkeypatch.setattr(zo, "UPDATE_CHUNK", 300)   # several chunks per matrix, a ragged last one
    runs = [TunedLayers(zolite.load_model(tiny_model, dtype="float16").model, [1]) for _ in range(2)]
    chunked, whole = runs
    for step in range(5):
        chunked.sgd_update(step, 0.7, 1e-3, weight_decay=0.1)
        for i, (p, r) in enumerate(zip(whole.params, whole.residuals)):   # the update written over whole tensors
            value = whole.master(i)
            if p.dim() >= 2:
                value.mul_(1 - 1e-3 * 0.1)
            value.add_(zo.sample_z(step, i, p), alpha=-1e-3 * 0.7)
            whole.set_value(i, value)
    assert max(p.numel() for p in chunked.params) > 3 * 300
    for a, b in zip(chunked.exact_state().values(), whole.exact_state().values()):
        assert torch.equal(a, b)
    assert any(r.abs().sum() > 0 for r in chunked.residuals)


def test_update_of_a_non_contiguous_half_tensor():
    """A transposed (non-contiguous) half-precision parameter takes the whole-tensor path: same result as a copy."""
    import zolite.zo as zo

    base = torch.randn(40, 30).to(torch.float16)
    results = []
    for weight in (torch.nn.Parameter(base.t().contiguous()), torch.nn.Parameter(base.clone().t())):
        tuned = TunedLayers.__new__(TunedLayers)
        tuned.params, tuned.residuals, tuned.scales = [weight], [torch.zeros_like(weight)], [1.0]
        tuned.z_buffers, tuned.together = None, False
        assert tuned.residuals[0].is_contiguous() == weight.is_contiguous()
        for step in range(3):
            tuned.sgd_update(step, 0.5, 1e-3, weight_decay=0.1)
        results.append((weight.detach().clone(), tuned.residuals[0].clone()))
    assert not torch.equal(results[0][0], base.t())
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
