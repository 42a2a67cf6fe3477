"""Task data: streaming reads, MeZO's disjoint seeded splits, the shrink rule, templates on real rows."""
from __future__ import annotations

import gzip
import json
import os

import psutil
import pytest

from conftest import SHARED_DATA
from zolite.data import batches_for_step, bundled_file, find_data, iter_rows, sample_splits, split_sizes
from zolite.errors import ZoliteError
from zolite.tasks import get_task


def test_split_sizes_follow_mezo_and_shrink_two_one_two():
    assert split_sizes(67349) == {"train": 1000, "val": 500, "test": 1000}
    assert split_sizes(2500) == {"train": 1000, "val": 500, "test": 1000}
    assert split_sizes(2270) == {"train": 908, "val": 454, "test": 908}
    assert split_sizes(7) == {"train": 2, "val": 1, "test": 4}


def test_splits_are_disjoint_seeded_and_stable():
    a = sample_splits(bundled_file("sst2"), seed=0)
    b = sample_splits(bundled_file("sst2"), seed=0)
    c = sample_splits(bundled_file("sst2"), seed=1)
    lines = lambda rows: [r["_line"] for r in rows]
    assert (len(a.train), len(a.val), len(a.test)) == (1000, 500, 1000)
    assert not set(lines(a.train)) & set(lines(a.test)) and not set(lines(a.val)) & set(lines(a.test))
    assert not set(lines(a.train)) & set(lines(a.val))
    assert lines(a.test) == lines(b.test) and lines(a.train) == lines(b.train)
    assert lines(a.test) != lines(c.test)


def test_a_lines_examples_stay_in_one_split(tmp_path):
    """Lines holding several examples (a passage with its questions) are dealt whole: no passage is in two splits;
    a nested field missing is one line naming the file line."""
    path = tmp_path / "passages.jsonl"
    path.write_text("".join(json.dumps({"passage": f"p{i}", "questions": [f"q{i}.{j}" for j in range(1 + i % 4)]}) + "\n"
                            for i in range(200)))
    expand = lambda line: [{"passage": line["passage"], "question": q, "_line": line["_line"]} for q in line["questions"]]  # noqa: E731
    splits = sample_splits(path, seed=3, expand=expand)
    passages = [{r["passage"] for r in rows} for rows in (splits.train, splits.val, splits.test)]
    assert not (passages[0] & passages[1] or passages[0] & passages[2] or passages[1] & passages[2])
    assert splits.counts == {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)}
    assert 0 < len(splits.test) <= split_sizes(500)["test"] and None not in splits.train
    assert sample_splits(path, seed=3, expand=expand).test == splits.test   # seeded
    with open(path, "a") as f:
        f.write('{"passage": "no questions"}\n')
    with pytest.raises(ZoliteError, match="line 201: a nested field is missing or malformed"):
        sample_splits(path, expand=expand)


def test_bundled_boolq_is_the_shared_file_and_shrinks(tmp_path):
    s = sample_splits(bundled_file("boolq"), seed=0)
    assert s.total_rows == 2270 and s.counts == {"train": 908, "val": 454, "test": 908}


def test_plain_and_gzipped_jsonl_read_alike(tmp_path):
    rows = [{"sentence": f"s{i}", "label": i % 2} for i in range(5)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "a.jsonl").write_text(text)
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(text)
    assert list(iter_rows(tmp_path / "a.jsonl")) == list(iter_rows(tmp_path / "b.jsonl.gz"))


def test_malformed_line_is_named(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"sentence": "ok", "label": 1}\n{"sentence": oops}\n')
    with pytest.raises(ZoliteError, match=r"line 2: not valid JSON"):
        list(iter_rows(f))
    f.write_text('{"sentence": "ok", "label": 1}\n{"text": "no sentence", "label": 0}\n' * 3)
    with pytest.raises(ZoliteError, match=r"line \d+: missing field\(s\) sentence"):
        sample_splits(f, validate=get_task("sst2").validate)
    f.write_text('{"sentence": "ok", "label": 7}\n' * 5)
    with pytest.raises(ZoliteError, match=r"line \d+: cannot build a sst2 example"):
        sample_splits(f, validate=get_task("sst2").validate)


def test_find_data_order_and_errors(tmp_path):
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "train.jsonl").write_text('{"sentence": "a", "label": 1}\n')
    assert find_data("sst2", str(tmp_path)) == tmp_path / "sst2" / "train.jsonl"
    assert find_data("sst2") == bundled_file("sst2")
    with pytest.raises(ZoliteError, match="no boolq data under"):
        find_data("boolq", str(tmp_path))


def test_a_big_file_is_streamed(tmp_path):
    """Sampling 2,500 rows from a ~100 MB JSONL must not load the file into memory."""
    path = tmp_path / "big.jsonl"
    filler = "x" * 900
    with open(path, "w") as f:
        for i in range(110_000):
            f.write(json.dumps({"sentence": f"row {i} {filler}", "label": i % 2}) + "\n")
    assert path.stat().st_size > 100e6
    proc = psutil.Process(os.getpid())
    before = proc.memory_info().rss
    splits = sample_splits(path, seed=0)
    grown = proc.memory_info().rss - before
    assert len(splits.train) == 1000
    # 2,500 sampled rows of ~1 KB plus Python overhead: a few MB, far from the file's 100 MB
    assert grown < 25e6, f"RSS grew by {grown / 1e6:.0f} MB"


def test_batches_cover_each_epoch_once_and_depend_only_on_step():
    n, b = 10, 4
    seen = [i for step in range(5) for i in batches_for_step(n, b, step, seed=3)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert batches_for_step(n, b, 3, seed=3) == batches_for_step(n, b, 3, seed=3)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not beside the checkout")
def test_templates_render_real_rows():
    sst2 = get_task("sst2").example(next(iter_rows(SHARED_DATA / "sst2" / "train.jsonl.gz")))
    assert sst2.prompt == "hide new secretions from the parental units It was"
    assert sst2.candidates == (" terrible", " great") and sst2.label == 0
    row = next(iter_rows(SHARED_DATA / "boolq" / "train.jsonl.gz"))
    boolq = get_task("boolq").example(row)
    question = row["question"][0].upper() + row["question"][1:] + "?"
    assert boolq.prompt == f"{row['passage']} {question}\n"
    assert boolq.candidates == ("No", "Yes") and boolq.label == int(row["label"])
