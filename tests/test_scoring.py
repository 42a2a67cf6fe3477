"""Candidate scoring: the shared-prefix path equals the batched one; the non-differentiable objectives."""
from __future__ import annotations

import pytest
import torch

import zolite
from conftest import SHARED_DATA
from zolite.data import bundled_file, iter_rows
from zolite.evaluate import encode_rows, prefix_shared_scores, score_encoded
from zolite.scoring import candidate_scores, collate, encode_example, last_hidden, losses, pad_token_id
from zolite.tasks import Example, get_task
from zolite.zo import TunedLayers, sample_z, spsa_losses


def _batched_scores(loaded, encoded):
    batch = collate(encoded, pad_token_id(loaded.tokenizer))
    with torch.inference_mode():
        return candidate_scores(loaded.model, batch, last_hidden(loaded.model, batch.input_ids))[0]


def test_shared_prefix_equals_batched_scoring(tiny_model):
    loaded = zolite.load_model(tiny_model)
    prompt = "the film is a charming and often affecting journey . overall it was"
    cands = (" great fun", " a total bore of a film", " fine", " not good at all , sadly")
    encoded = [encode_example(loaded.tokenizer, Example(prompt, cands, 2), 512),
               encode_example(loaded.tokenizer, Example("short", cands[:3], 0), 512)]
    with torch.inference_mode():
        shared = prefix_shared_scores(loaded.model, encoded[:1], loaded.device)
    torch.testing.assert_close(shared, _batched_scores(loaded, encoded[:1]), atol=1e-5, rtol=1e-5)
    scores = score_encoded(loaded.model, loaded.tokenizer, encoded)   # both rows, one group: prompts of 2 lengths
    torch.testing.assert_close(scores, _batched_scores(loaded, encoded), atol=1e-5, rtol=1e-5)
    assert scores[1, 3] == float("-inf")


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not beside the checkout")
def test_record_rows_score_the_same_shared_or_batched(tiny_model):
    loaded = zolite.load_model(tiny_model)
    task = get_task("record")
    rows = [r for line in iter_rows(SHARED_DATA / "record" / "train.jsonl.gz") for r in task.expand(line)][:3]
    encoded = encode_rows(loaded.tokenizer, task, rows, 1024)
    shared = score_encoded(loaded.model, loaded.tokenizer, encoded)
    torch.testing.assert_close(shared, _batched_scores(loaded, encoded), atol=1e-4, rtol=1e-4)


def test_accuracy_objective_is_minus_batch_accuracy(tiny_model):
    loaded = zolite.load_model(tiny_model)
    rows = [r for r, _ in zip(iter_rows(bundled_file("sst2")), range(8))]
    batch = collate(encode_rows(loaded.tokenizer, get_task("sst2"), rows, 512), pad_token_id(loaded.tokenizer))
    with torch.inference_mode():
        scores = candidate_scores(loaded.model, batch, last_hidden(loaded.model, batch.input_ids))
    expected = -(scores[0].argmax(-1) == batch.labels).float().mean()
    assert losses(scores, batch, "accuracy").item() == pytest.approx(expected.item())
    tuned = TunedLayers(loaded.model, [1])
    plus, minus = spsa_losses(loaded.model, tuned, batch, seed=3, eps=1.0, objective="accuracy")
    assert all(-1 <= x <= 0 and (x * 8) == round(x * 8) for x in (plus, minus))   # multiples of 1/8


def test_shifted_weights_equal_explicit_perturbation_in_generation(tiny_model):
    """generation_losses runs model.generate inside tuned.shifted(): every decode step must see W + sign eps z."""
    from zolite.generation import generate_answers

    loaded = zolite.load_model(tiny_model)
    tuned = TunedLayers(loaded.model, [2])
    prompts = ["a charming film", "the plot is thin and"]
    eps, seed = 0.5, 11
    with tuned.shifted(seed, eps, -1):
        hooked = generate_answers(loaded.model, loaded.tokenizer, prompts, max_new_tokens=8)
    saved = [p.detach().clone() for p in tuned.params]
    with torch.no_grad():
        for i, p in enumerate(tuned.params):
            p.copy_(tuned.masters[i] - eps * sample_z(seed, i, tuned.masters[i]))
    explicit = generate_answers(loaded.model, loaded.tokenizer, prompts, max_new_tokens=8)
    with torch.no_grad():
        for p, s in zip(tuned.params, saved):
            p.copy_(s)
    base = generate_answers(loaded.model, loaded.tokenizer, prompts, max_new_tokens=8)
    assert hooked == explicit and hooked != base     # the perturbation changes the answers, the same way
    assert all(torch.equal(p, s) for p, s in zip(tuned.params, saved))
