"""What a shift of the answer scores alone can reach on a two-answer task: is beating always-the-majority a matter
of calibration, or does it take discrimination the model lacks?

Scores val and test zero-shot (mean log-prob of each candidate, as zolite's metric), then reports, on test:
zero-shot accuracy, always answering the majority class, the best shift b (predict candidate 1 where
s1 - s0 + b > 0) chosen on val and applied to test, the best shift chosen on test itself (the ceiling of any
shift), and the AUC of s1 - s0 (0.5: the margin does not tell the classes apart at all). A ZO run on a few weights
(norms, biases) can learn a shift cheaply; it beats always-"yes" only where the margin carries signal.

    python bench/calibration_ceiling.py --model smollm2-135m --task boolq --data ../shared/data --out OUT
"""
from __future__ import annotations

import argparse
import importlib
import json
import time
from pathlib import Path

import torch

import zolite
from zolite.data import sample_splits
from zolite.errors import ZoliteError
from zolite.tasks import get_task, task_data

evaluate = importlib.import_module("zolite.evaluate")   # the module (zolite.evaluate is also a function)


def accuracy_at(margin: torch.Tensor, gold: torch.Tensor, shift: float) -> float:
    return ((margin + shift > 0).long() == gold).float().mean().item()


def best_shift(margin: torch.Tensor, gold: torch.Tensor) -> float:
    """The shift with the highest accuracy: thresholds between consecutive sorted margins (and beyond both ends)."""
    cuts = torch.sort(margin).values
    candidates = torch.cat([cuts[:1] - 1, (cuts[1:] + cuts[:-1]) / 2, cuts[-1:] + 1])
    return max((-c.item() for c in candidates), key=lambda b: accuracy_at(margin, gold, b))


def auc(margin: torch.Tensor, gold: torch.Tensor) -> float:
    """P(margin of a class-1 row > margin of a class-0 row), ties counted half."""
    pos, neg = margin[gold == 1], margin[gold == 0]
    greater = (pos[:, None] > neg[None, :]).float().mean()
    ties = (pos[:, None] == neg[None, :]).float().mean()
    return (greater + ties / 2).item()


def two_answer_arguments(doc: str, out_help: str, batch_size: int) -> argparse.Namespace:
    """The options of a bench that scores a two-answer task's splits zero-shot (this one, probe_features.py)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="boolq")
    ap.add_argument("--data", required=True, help="folder holding TASK/train.jsonl.gz")
    ap.add_argument("--out", required=True, help=out_help)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=batch_size)
    ap.add_argument("--limit", type=int, default=None, help="only the first N rows of each split (a smoke run)")
    return ap.parse_args()


def two_answer_setup(args) -> tuple:
    """The task (two answers, else exit on one line), zolite's splits (seed 0), the loaded model, and the facts a
    result file starts with."""
    task = get_task(args.task)
    if len(task.candidates) != 2:
        raise SystemExit(f"{args.task} has {len(task.candidates)} candidates; this bench is for two-answer tasks")
    splits = sample_splits(task_data(task, args.data), seed=0, validate=task.validate, expand=task.expand)
    loaded = zolite.load_model(args.model)
    facts = {"model": args.model, "task": args.task, "candidates": list(task.candidates), "split_seed": 0,
             "device": str(loaded.device), "dtype": str(loaded.dtype), "torch": torch.__version__}
    return task, splits, loaded, facts


def main():
    args = two_answer_arguments(__doc__, "folder for result.json", batch_size=16)
    task, splits, loaded, result = two_answer_setup(args)
    margins = {}
    for split in ("val", "test"):
        rows = getattr(splits, split)[:args.limit]
        t0 = time.perf_counter()
        encoded = evaluate.encode_rows(loaded.tokenizer, task, rows, args.max_length)
        scores = evaluate.score_encoded(loaded.model, loaded.tokenizer, encoded, args.batch_size)
        gold = torch.tensor([task.example(r).correct()[0] for r in rows])
        margins[split] = (scores[:, 1] - scores[:, 0], gold)
        result[f"{split}_rows"] = len(rows)
        result[f"{split}_seconds"] = round(time.perf_counter() - t0, 1)
    (m_val, g_val), (m_test, g_test) = margins["val"], margins["test"]
    shift_val, shift_test = best_shift(m_val, g_val), best_shift(m_test, g_test)
    majority = int(g_val.float().mean() >= 0.5)   # the val split's majority class, as a user would pick it
    result.update({
        "test_share_of_candidate_1": g_test.float().mean().item(),
        "test_zero_shot": accuracy_at(m_test, g_test, 0.0),
        "test_always_majority": (g_test == majority).float().mean().item(),
        "majority_candidate": task.candidates[majority],
        "val_share_of_candidate_1": g_val.float().mean().item(),
        "val_zero_shot": accuracy_at(m_val, g_val, 0.0),
        "shift_chosen_on_val": shift_val,
        "val_at_that_shift": accuracy_at(m_val, g_val, shift_val),
        "test_at_val_shift": accuracy_at(m_test, g_test, shift_val),
        "shift_best_on_test": shift_test,
        "test_at_best_shift_ceiling": accuracy_at(m_test, g_test, shift_test),
        "test_auc": auc(m_test, g_test),
        "val_auc": auc(m_val, g_val),
    })
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    try:
        main()
    except ZoliteError as e:   # a wrong task, model or data folder: one line, as the CLI prints it
        raise SystemExit(f"calibration_ceiling.py: {e}")
