"""Task data: find it, read JSONL(.gz) as a stream, and sample MeZO's disjoint train/val/test splits.

Only the sampled rows are ever held in memory: the file is read twice as a stream (count, then pick).
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import os
import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterator

from .errors import ZoliteError

PROTOCOL = {"train": 1000, "val": 500, "test": 1000}  # MeZO (Malladi et al. 2023), Sec. 4


@dataclass
class Splits:
    train: list[dict]
    val: list[dict]
    test: list[dict]
    source: str                    # where the rows came from
    total_rows: int                # rows in the file
    counts: dict = field(default_factory=dict)


def open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def iter_rows(path: str | os.PathLike) -> Iterator[dict]:
    """Yield each JSON object of a .jsonl or .jsonl.gz file, with its 1-based line number as row['_line'].

    A .json(.gz) file in SQuAD's or DROP's layout yields its articles / passages, numbered from 1 (not streamed).
    """
    path = Path(path)
    if path.name.endswith((".json", ".json.gz")):
        yield from _json_articles(path)
        return
    try:
        with open_text(path) as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ZoliteError(f"{path}, line {line_no}: not valid JSON ({e.msg}); fix or remove that line") from None
                if not isinstance(row, dict):
                    raise ZoliteError(f"{path}, line {line_no}: expected a JSON object, got {type(row).__name__}")
                row["_line"] = line_no
                yield row
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ZoliteError(f"cannot read {path}: {e}") from None


def _json_articles(path: Path) -> Iterator[dict]:
    try:
        with open_text(path) as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise ZoliteError(f"{path}, line {e.lineno}: not valid JSON ({e.msg})") from None
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ZoliteError(f"cannot read {path}: {e}") from None
    if isinstance(doc, dict) and isinstance(doc.get("data"), list):              # SQuAD: {"data": [articles]}
        articles = doc["data"]
    elif isinstance(doc, dict) and doc and all(isinstance(v, dict) and "qa_pairs" in v for v in doc.values()):
        articles = [{"passage_id": k, **v} for k, v in doc.items()]             # DROP: {id: {passage, qa_pairs}}
    else:
        raise ZoliteError(f"{path}: expected SQuAD's layout {{\"data\": [articles]}} or DROP's "
                          "{passage_id: {passage, qa_pairs}}; or pass a .jsonl file")
    for i, article in enumerate(articles, 1):
        yield {**article, "_line": i}


def split_sizes(n: int, protocol: dict = PROTOCOL) -> dict:
    """MeZO's 1000/500/1000 when the file has enough rows; otherwise the file is split 2:1:2 (train:val:test)."""
    if n >= sum(protocol.values()):
        return dict(protocol)
    train, val = (2 * n) // 5, n // 5
    return {"train": train, "val": val, "test": n - train - val}


def sample_splits(path: str | os.PathLike, *, seed: int = 0, protocol: dict = PROTOCOL,
                  validate=None, expand=None) -> Splits:
    """Sample disjoint test, val and train rows (in that order) from `path` with a fixed seed.

    `expand` turns one line into the examples it holds (MultiRC: one per answer; SQuAD: one per question). A line's
    examples share its passage, so lines, not examples, are dealt to the splits (test first, then val, train): no
    passage is in two splits. A file of one example per line is sampled row by row.
    """
    counts = []   # examples per line; every row is checked up front, not only the sampled ones
    for line in iter_rows(path):
        examples = _expanded(line, expand, path)
        for row in examples:
            if validate is not None:
                validate(row, path)
        counts.append(len(examples))
    n = sum(counts)
    if n == 0:
        raise ZoliteError(f"{path} holds no rows; pass a file with one JSON object per line")
    sizes = split_sizes(n, protocol)
    place = _deal_rows(n, sizes, seed) if all(c == 1 for c in counts) else _deal_lines(counts, sizes, seed)
    parts = {p: [None] * sizes[p] for p in sizes}
    for i, line in enumerate(iter_rows(path)):
        if i in place:
            part, first, take = place[i]
            parts[part][first:first + take] = _expanded(line, expand, path)[:take]
    # (lines dealt whole can leave the last split short of its size when the file barely has enough examples)
    parts = {p: [row for row in rows if row is not None] for p, rows in parts.items()}
    sizes = {p: len(rows) for p, rows in parts.items()}
    return Splits(parts["train"], parts["val"], parts["test"], str(path), n, sizes)


def _expanded(line: dict, expand, path) -> list[dict]:
    if expand is None:
        return [line]
    try:
        return list(expand(line))
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise ZoliteError(f"{path} line {line.get('_line')}: a nested field is missing or malformed "
                          f"({type(e).__name__}: {e}); fix that line or remove it") from None


def _deal_rows(n: int, sizes: dict, seed: int) -> dict:
    """{row: (split, position, 1)}: a random sample of the n rows, the first ones to test, then val, then train."""
    picked = random.Random(seed).sample(range(n), sum(sizes.values()))
    place, start = {}, 0
    for part in ("test", "val", "train"):
        for rank, i in enumerate(picked[start:start + sizes[part]]):
            place[i] = (part, rank, 1)
        start += sizes[part]
    return place


def _deal_lines(counts: list[int], sizes: dict, seed: int) -> dict:
    """{line: (split, position, examples taken)}: lines in a random order fill test, then val, then train; a line
    that overfills a split gives it only the examples it needs (the rest are unused, never in another split)."""
    place, filled = {}, dict.fromkeys(sizes, 0)
    parts = iter(("test", "val", "train"))
    part = next(parts)
    for line in random.Random(seed).sample(range(len(counts)), len(counts)):
        while filled[part] == sizes[part]:
            part = next(parts, None)
            if part is None:
                return place
        take = min(counts[line], sizes[part] - filled[part])
        if take:
            place[line] = (part, filled[part], take)
            filled[part] += take
    return place


def bundled_file(task: str) -> Path | None:
    f = resources.files("zolite") / "data" / f"{task}.jsonl.gz"
    return Path(str(f)) if f.is_file() else None


def find_data(task: str, data_dir: str | None = None, hf_dataset: tuple | None = None) -> Path:
    """The JSONL file for `task`: --data DIR first, then the HF datasets cache/hub, then the bundled sample."""
    if data_dir is not None:
        root = Path(data_dir)
        candidates = [root / task / f"train.{ext}" for ext in ("jsonl.gz", "jsonl", "json.gz", "json")]
        candidates += [root / f"{task}.{ext}" for ext in ("jsonl.gz", "jsonl")]
        if root.is_file():
            candidates.insert(0, root)
        for c in candidates:
            if c.is_file():
                return c
        raise ZoliteError(f"no {task} data under {data_dir}: expected {candidates[0]} or {root / (task + '.jsonl')}")
    if hf_dataset is not None and importlib.util.find_spec("datasets") is not None:
        path = _from_hf_datasets(task, hf_dataset)
        if path is not None:
            return path
    bundled = bundled_file(task)
    if bundled is None:
        raise ZoliteError(f"no data for task {task}: pass --data DIR holding {task}/train.jsonl(.gz), "
                          "or install the `datasets` package and go online")
    return bundled


def _from_hf_datasets(task: str, hf_dataset: tuple) -> Path | None:
    """Export the HF train split once to a JSONL file in zolite's cache; None when it cannot be had."""
    from .loading import cache_dir

    out = cache_dir() / "data" / f"{task}-{'-'.join(hf_dataset)}.jsonl"
    if out.is_file():
        return out
    try:
        import datasets

        ds = datasets.load_dataset(*hf_dataset, split="train")
    except Exception:  # offline and not cached, or the hub refused: fall back to the bundled sample
        return None
    from .io import atomic_path

    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in ds:
            f.write(json.dumps(row) + "\n")
    return out


def batches_for_step(n_rows: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Row indices of step `step`'s batch: epochs of seeded permutations, laid end to end.

    A function of the step alone, so a resumed run sees the same batches without saving a data cursor.
    """
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n_rows)
        out.extend(_epoch_order(n_rows, seed, epoch)[offset:offset + batch_size - len(out)])
    return out


@functools.lru_cache(maxsize=4)
def _epoch_order(n_rows: int, seed: int, epoch: int) -> tuple[int, ...]:
    """An epoch's seeded permutation of the rows, shuffled once per epoch rather than once per step."""
    order = list(range(n_rows))
    random.Random(f"{seed}-epoch-{epoch}").shuffle(order)
    return tuple(order)
