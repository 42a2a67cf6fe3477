"""Evaluate a task on rows: score every candidate, predict the best, report accuracy."""
from __future__ import annotations

import math

import torch

from .errors import ZoliteError
from .scoring import EncodedExample, candidate_scores, collate, encode_example, last_hidden, pad_token_id
from .tasks import Task


def encode_rows(tokenizer, task: Task, rows: list[dict], max_length: int) -> list[EncodedExample]:
    return [encode_example(tokenizer, task.example(row), max_length) for row in rows]


@torch.inference_mode()
def score_encoded(model, tokenizer, encoded: list[EncodedExample], batch_size: int = 32) -> torch.Tensor:
    """Candidate scores [N, C] (mean log-prob per candidate), batching examples of similar length."""
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: max(len(s) for s in encoded[i].sequences))
    pad = pad_token_id(tokenizer)
    out = [None] * len(encoded)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = collate([encoded[i] for i in chunk], pad).to(device)
        scores = candidate_scores(model, batch, last_hidden(model, batch.input_ids))[0].cpu()
        for i, s in zip(chunk, scores):
            out[i] = s
    return torch.stack(out)


def accuracy_report(scores: torch.Tensor, labels: list[int]) -> dict:
    """Accuracy with a 95% Wilson interval and per-class counts."""
    pred = scores.argmax(-1).tolist()
    n = len(labels)
    correct = sum(p == y for p, y in zip(pred, labels))
    acc = correct / n if n else float("nan")
    z = 1.96
    centre = (acc + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(acc * (1 - acc) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    per_class = {}
    for p, y in zip(pred, labels):
        c = per_class.setdefault(str(y), {"n": 0, "correct": 0, "predicted": 0})
        c["n"] += 1
        c["correct"] += p == y
    for p in pred:
        per_class.setdefault(str(p), {"n": 0, "correct": 0, "predicted": 0})["predicted"] += 1
    return {"metric": "accuracy", "score": acc, "accuracy": acc, "ci95": [centre - half, centre + half], "n": n,
            "correct": correct, "per_class": dict(sorted(per_class.items()))}


def generation_report(predictions: list[str], golds: list[list[str]]) -> dict:
    """Mean F1 and EM over the rows (best over each row's gold answers), F1 with a normal-approximation 95% CI."""
    from .metrics import best_over_golds, exact_match, f1

    f1s = [best_over_golds(f1, p, g) for p, g in zip(predictions, golds)]
    ems = [best_over_golds(exact_match, p, g) for p, g in zip(predictions, golds)]
    n = len(f1s)
    mean = sum(f1s) / n
    half = 1.96 * math.sqrt(sum((x - mean) ** 2 for x in f1s) / max(1, n - 1) / n)
    return {"metric": "f1", "score": mean, "f1": mean, "em": sum(ems) / n, "ci95": [mean - half, mean + half], "n": n,
            "examples": [{"prediction": p, "gold": g} for p, g in list(zip(predictions, golds))[:5]]}


def evaluate_rows(model, tokenizer, task: Task, rows: list[dict], *, max_length: int = 512,
                  batch_size: int = 32) -> dict:
    """The task's metric on `rows`: accuracy over candidates, or F1/EM of greedy answers for generation tasks."""
    if task.generative:
        from .predict import generate_answers

        predictions = generate_answers(model, tokenizer, [task.example(r).prompt for r in rows],
                                       max_new_tokens=task.max_answer_tokens, max_length=max_length,
                                       batch_size=batch_size)
        return generation_report(predictions, [task.golds(r) for r in rows])
    encoded = encode_rows(tokenizer, task, rows, max_length)
    scores = score_encoded(model, tokenizer, encoded, batch_size)
    return accuracy_report(scores, [e.label for e in encoded])


def evaluate(model: str = "smollm2-135m", task: str = "sst2", *, patch=None, split: str = "test",
             data: str | None = None, data_seed: int = 0, limit: int | None = None, max_length: int = 512,
             batch_size: int = 32, device=None, dtype=None, **task_options) -> dict:
    """Zero-shot accuracy on a split of the task, and the patched model's on the same rows when a patch is given."""
    from .data import sample_splits
    from .loading import load_model
    from .patch import apply_patch, load_patch
    from .tasks import get_task, task_data

    task_ = get_task(task, **task_options)
    if split not in ("train", "val", "test"):
        raise ZoliteError(f"unknown split '{split}'; choose train, val or test")
    patch_ = load_patch(patch) if patch is not None else None   # a bad patch fails before the model loads
    loaded = load_model(model, device=device, dtype=dtype)
    splits = sample_splits(task_data(task_, data), seed=data_seed, validate=task_.validate,
                           expand=task_.expand)
    rows = getattr(splits, split)[:limit]
    if not rows:
        raise ZoliteError(f"the {split} split of {splits.source} is empty; pass a larger data file")
    result = {"model": model, "task": task, "split": split, "rows": len(rows), "source": splits.source,
              "counts": splits.counts, "zero_shot": evaluate_rows(loaded.model, loaded.tokenizer, task_, rows,
                                                                 max_length=max_length, batch_size=batch_size)}
    if patch_ is not None:
        apply_patch(loaded.model, patch_)
        result["patch"] = str(patch)
        result["patched"] = evaluate_rows(loaded.model, loaded.tokenizer, task_, rows,
                                          max_length=max_length, batch_size=batch_size)
    return result
