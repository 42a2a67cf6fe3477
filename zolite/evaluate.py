"""Evaluate a task on rows: score every candidate, predict the best, report accuracy."""
from __future__ import annotations

import inspect
import math

import torch

from .errors import ZoliteError, check_at_least
from .scoring import EncodedExample, candidate_scores, collate, encode_example, last_hidden, pad_token_id
from .tasks import Task


def encode_rows(tokenizer, task: Task, rows: list[dict], max_length: int) -> list[EncodedExample]:
    return [encode_example(tokenizer, task.example(row), max_length) for row in rows]


@torch.inference_mode()
def score_encoded(model, tokenizer, encoded: list[EncodedExample], batch_size: int = 32) -> torch.Tensor:
    """Candidate scores [N, C] (mean log-prob per candidate, -inf where an example has fewer).

    Examples whose candidates need SHARE_PREFIX_FROM or more distinct sequences (ReCoRD's entities, long custom
    candidates) run their prompts once and score every candidate from the prompts' KV cache; the others are
    batched as whole sequences, identical ones shared (single-token candidates cost one sequence per example).
    Both paths batch examples of similar length.
    """
    device = next(model.parameters()).device
    n_cand = max(len(e.answers) for e in encoded)
    out = torch.full((len(encoded), n_cand), float("-inf"))
    by_length = sorted(range(len(encoded)), key=lambda i: max(map(len, encoded[i].sequences)))
    shared = [i for i in by_length if len(set(encoded[i].sequences)) >= SHARE_PREFIX_FROM]
    batched = [i for i in by_length if len(set(encoded[i].sequences)) < SHARE_PREFIX_FROM]
    for start in range(0, len(shared), batch_size):
        chunk = shared[start:start + batch_size]
        scores = prefix_shared_scores(model, [encoded[i] for i in chunk], device)
        out[chunk, :scores.shape[1]] = scores
    pad = pad_token_id(tokenizer)
    for start in range(0, len(batched), batch_size):
        chunk = batched[start:start + batch_size]
        batch = collate([encoded[i] for i in chunk], pad).to(device)
        scores = candidate_scores(model, batch, last_hidden(model, batch.input_ids))[0].cpu()
        out[chunk, :scores.shape[1]] = scores
    return out


SHARE_PREFIX_FROM = 3


def prefix_shared_scores(model, group: list[EncodedExample], device) -> torch.Tensor:
    """Mean log-prob of each candidate [E, C] (-inf where an example has fewer): one forward of the E prompts
    (right-padded, kept as a KV cache), then one forward of every candidate's tokens after its own prompt (the
    cache repeated C times; an attention mask hides the prompts' padding, positions continue each prompt)."""
    head = model.get_output_embeddings()
    n_cand = max(len(e.answers) for e in group)
    lengths = torch.tensor([len(e.context) for e in group], device=device)
    ids = torch.zeros(len(group), int(lengths.max()), dtype=torch.long, device=device)
    for r, e in enumerate(group):
        ids[r, :len(e.context)] = torch.tensor(e.context, device=device)
    mask = (torch.arange(ids.shape[1], device=device)[None, :] < lengths[:, None]).long()
    prompt = model.base_model(input_ids=ids, attention_mask=mask, use_cache=True)
    last = prompt.last_hidden_state[torch.arange(len(group), device=device), lengths - 1]
    first = torch.log_softmax(head(last).float(), dim=-1)                               # predicts answer[0]
    sums = torch.zeros(len(group), n_cand, device=device)
    counts = torch.zeros(len(group), n_cand, device=device)
    for r, e in enumerate(group):
        for c, a in enumerate(e.answers):
            sums[r, c] = first[r, a[0]]
            counts[r, c] = len(a)
    longest = max(len(a) for e in group for a in e.answers)
    if longest > 1:
        rest = torch.zeros(len(group) * n_cand, longest - 1, dtype=torch.long, device=device)
        for r, e in enumerate(group):
            for c, a in enumerate(e.answers):
                rest[r * n_cand + c, :len(a) - 1] = torch.tensor(a[:-1], device=device)
        cache = prompt.past_key_values
        cache.batch_repeat_interleave(n_cand)
        full_mask = torch.cat([mask.repeat_interleave(n_cand, 0), torch.ones_like(rest)], dim=1)
        positions = lengths.repeat_interleave(n_cand)[:, None] + torch.arange(longest - 1, device=device)[None, :]
        hidden = model.base_model(input_ids=rest, attention_mask=full_mask, position_ids=positions,
                                  use_cache=True, **{cache_argument(model): cache}).last_hidden_state
        logp = torch.log_softmax(head(hidden).float(), dim=-1)                            # [E*C, L-1, V]
        for r, e in enumerate(group):
            for c, a in enumerate(e.answers):
                if len(a) > 1:
                    row = r * n_cand + c
                    sums[r, c] += logp[row, torch.arange(len(a) - 1), torch.tensor(a[1:], device=device)].sum()
    scores = sums / counts.clamp(min=1)
    return scores.masked_fill(counts == 0, float("-inf")).cpu()


def cache_argument(model) -> str:
    """transformers renamed the forward's KV-cache argument `past_key_values` to `cache` (5.2x); take what it has."""
    params = inspect.signature(model.base_model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def predictions(model, tokenizer, encoded: list[EncodedExample], batch_size: int = 32) -> list[int]:
    """The best-scoring candidate of each example."""
    return score_encoded(model, tokenizer, encoded, batch_size).argmax(-1).tolist() if encoded else []


def accuracy_report(scores, accepted: list[tuple[int, ...]], per_class: bool = True) -> dict:
    """Accuracy (the best candidate is an accepted one) with a 95% Wilson interval and per-class counts. scores:
    candidate scores [N, C], or the predicted candidate of each row (a distributed run gathers those)."""
    pred = scores.argmax(-1).tolist() if isinstance(scores, torch.Tensor) else list(scores)
    n = len(accepted)
    hits = [p in ok for p, ok in zip(pred, accepted)]
    correct = sum(hits)
    acc = correct / n if n else float("nan")
    z = 1.96
    centre = (acc + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(acc * (1 - acc) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    report = {"metric": "accuracy", "score": acc, "accuracy": acc, "ci95": [centre - half, centre + half], "n": n,
              "correct": correct}
    if per_class:
        counts = {}
        for p, ok, hit in zip(pred, accepted, hits):
            c = counts.setdefault(str(ok[0]), {"n": 0, "correct": 0, "predicted": 0})
            c["n"] += 1
            c["correct"] += hit
        for p in pred:
            counts.setdefault(str(p), {"n": 0, "correct": 0, "predicted": 0})["predicted"] += 1
        report["per_class"] = dict(sorted(counts.items()))
    return report


def generation_report(task: Task, predictions: list[str], golds: list[list]) -> dict:
    """Mean F1 and EM over the rows (the task's official rules, best over each row's golds), F1 with a
    normal-approximation 95% CI."""
    scores = [task.answer_scores(p, g) for p, g in zip(predictions, golds)]
    ems, f1s = [s[0] for s in scores], [s[1] for s in scores]
    n = len(f1s)
    mean = sum(f1s) / n
    half = 1.96 * math.sqrt(sum((x - mean) ** 2 for x in f1s) / max(1, n - 1) / n)
    return {"metric": "f1", "score": mean, "f1": mean, "em": sum(ems) / n, "ci95": [mean - half, mean + half], "n": n,
            "examples": [{"prediction": p, "gold": g} for p, g in list(zip(predictions, golds))[:5]]}


def evaluate_rows(model, tokenizer, task: Task, rows: list[dict], *, max_length: int = 512,
                  batch_size: int = 32, world=None) -> dict:
    """The task's metric on `rows`: accuracy over candidates, or F1/EM of greedy answers for generation tasks.
    world (a distributed run's): each rank scores its slice of the rows, their predictions are gathered."""
    from .distributed import World

    world = world or World()
    mine = world.shard(rows)
    if task.generative:
        from .generation import generate_answers

        answers = generate_answers(model, tokenizer, [task.example(r).prompt for r in mine],
                                   max_new_tokens=task.max_answer_tokens, max_length=max_length,
                                   batch_size=batch_size) if mine else []
        return generation_report(task, world.gather(answers), [task.golds(r) for r in rows])
    predicted = world.gather(predictions(model, tokenizer, encode_rows(tokenizer, task, mine, max_length), batch_size))
    return accuracy_report(predicted, [task.example(r).correct() for r in rows], task.per_class)


def evaluate(model: str = "smollm2-135m", task: str = "sst2", *, patch=None, split: str = "test",
             data: str | None = None, data_seed: int | None = None, limit: int | None = None, max_length: int = 512,
             batch_size: int = 32, device=None, dtype=None, mode=None, **task_options) -> dict:
    """Zero-shot accuracy on a split of the task, and the patched model's on the same rows when a patch is given.
    mode: as in load_model; a patch's layers are kept unquantized so it can be applied. data_seed: the split's seed;
    None: the patch's (its val / test rows are then rows it was not trained on), else 0."""
    from .data import sample_splits
    from .loading import load_model
    from .apply import apply_patch
    from .patch import load_patch
    from .tasks import get_task, task_data

    task_ = get_task(task, **task_options)
    for option, value, low in (("--limit", limit, 1), ("--batch-size", batch_size, 1), ("--max-length", max_length, 2)):
        check_at_least(option, value, low)
    if split not in ("train", "val", "test"):
        raise ZoliteError(f"unknown split '{split}'; choose train, val or test")
    patch_ = load_patch(patch) if patch is not None else None   # a bad patch fails before the model loads
    trained_seed = patch_.hparams.get("data_seed", 0) if patch_ else None
    if data_seed is None:
        data_seed = trained_seed or 0
    elif trained_seed is not None and data_seed != trained_seed and split != "train":
        raise ZoliteError(f"{patch} was tuned on the train split of --data-seed {trained_seed}: with --data-seed "
                          f"{data_seed} its {split} rows include rows it was trained on; drop --data-seed")
    loaded = load_model(model, device=device, dtype=dtype, mode=mode, keep_layers=patch_.layers if patch_ else (),
                        keep_params=patch_.unquantized_params if patch_ else None)
    splits = sample_splits(task_data(task_, data), seed=data_seed, validate=task_.validate,
                           expand=task_.expand)
    rows = getattr(splits, split)[:limit]
    if not rows:
        raise ZoliteError(f"the {split} split of {splits.source} is empty; pass a larger data file")
    result = {"model": model, "task": task, "split": split, "data_seed": data_seed, "rows": len(rows), "source": splits.source,
              "counts": splits.counts, "zero_shot": evaluate_rows(loaded.model, loaded.tokenizer, task_, rows,
                                                                 max_length=max_length, batch_size=batch_size)}
    if patch_ is not None:
        apply_patch(loaded.model, patch_)
        result["patch"] = str(patch)
        result["patched"] = evaluate_rows(loaded.model, loaded.tokenizer, task_, rows,
                                          max_length=max_length, batch_size=batch_size)
    return result
