"""ReCoRD zero-shot on the 64 real rows there are (FewGLUE samples of the official train split), and the cost of
scoring its ~15-30 entity candidates with the prompt shared (one prompt forward, candidates from its KV cache) vs
batched (every candidate re-reads the passage). Same rows, same model, side by side.

    python bench/record_zero_shot.py --data ../shared/data --out OUT
"""
from __future__ import annotations

import argparse
import importlib
import json
import statistics
import time
from pathlib import Path

import torch

import zolite
from zolite.data import iter_rows
from zolite.tasks import get_task

evaluate = importlib.import_module("zolite.evaluate")   # the module (zolite.evaluate is also a function)


def timed(fn, repeats=3):
    times, out = [], None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="folder holding record/train.jsonl.gz")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    task = get_task("record")
    path = Path(args.data) / "record" / "train.jsonl.gz"
    rows = [r for line in iter_rows(path) for r in task.expand(line)]
    loaded = zolite.load_model(args.model)
    encoded = evaluate.encode_rows(loaded.tokenizer, task, rows, 1024)
    score = lambda: evaluate.score_encoded(loaded.model, loaded.tokenizer, encoded, args.batch_size)
    score()  # warm-up
    shared_s, shared = timed(score)
    evaluate.SHARE_PREFIX_FROM = 10 ** 9          # every example through the batched path
    batched_s, batched = timed(score)
    accepted = [e.accepted for e in encoded]
    report = evaluate.accuracy_report(shared, accepted, per_class=False)
    n_cands = [len(e.answers) for e in encoded]
    result = {"model": args.model, "rows": len(rows), "source": str(path), "device": str(loaded.device),
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
              "torch": torch.__version__, "accuracy": report["accuracy"], "ci95": report["ci95"],
              "accuracy_batched": evaluate.accuracy_report(batched, accepted, per_class=False)["accuracy"],
              "max_abs_score_diff": float((shared - batched)[torch.isfinite(batched)].abs().max()),
              "candidates_mean": statistics.mean(n_cands), "candidates_max": max(n_cands),
              "random_guess_expected": statistics.mean(len(a) / c for a, c in zip(accepted, n_cands)),
              "seconds_shared": round(shared_s, 3), "seconds_batched": round(batched_s, 3),
              "speedup": round(batched_s / shared_s, 2)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "record_zero_shot.json").write_text(json.dumps(result, indent=1) + "\n")
    md = (f"# ReCoRD zero-shot, {args.model} ({result['gpu'] or 'CPU'})\n\n"
          f"Command: `python bench/record_zero_shot.py --data DATA --out OUT`\n\n"
          f"All {len(rows)} real ReCoRD rows here (no held-out split exists: these are every row, not a test set), "
          f"{result['candidates_mean']:.1f} candidate entities on average (max {result['candidates_max']}).\n\n"
          f"| accuracy | 95% CI | random guess (expected) | shared-prompt scoring s | batched scoring s | speedup | max score diff |\n"
          f"|---|---|---|---|---|---|---|\n"
          f"| {result['accuracy']:.4f} | {result['ci95'][0]:.3f}-{result['ci95'][1]:.3f} | "
          f"{result['random_guess_expected']:.4f} | {shared_s:.3f} | {batched_s:.3f} | {result['speedup']}x | "
          f"{result['max_abs_score_diff']:.2e} |\n")
    (args.out / "record_zero_shot.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
