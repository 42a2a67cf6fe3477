"""Custom tasks: a JSONL file + template + candidates (or answer field), or a TOML task file."""
from __future__ import annotations

import json

import pytest

from conftest import run_cli
from test_errors import assert_user_error
from zolite.data import bundled_file, iter_rows


@pytest.fixture
def reviews(tmp_path):
    path = tmp_path / "reviews.jsonl"
    with open(path, "w") as f:
        for r, _ in zip(iter_rows(bundled_file("sst2")), range(60)):
            f.write(json.dumps({"text": r["sentence"], "label": ["negative", "positive"][r["label"]]}) + "\n")
    return path


CUSTOM = ["--template", "Review: {text} Sentiment:", "--candidates", "negative,positive"]


def test_custom_classification_task_tunes_applies_and_evaluates(tiny_model, reviews, tmp_path):
    run = tmp_path / "run"
    r = run_cli("tune", "--model", tiny_model, "--task", reviews, *CUSTOM, "--layer", "1", "--steps", "2",
                "--eval-every", "1", "--batch-size", "4", "--run-dir", run, "--json", "--quiet")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1])["metric"] == "accuracy"
    report = json.loads((run / "report.json").read_text())
    assert report["data"]["counts"] == {"train": 24, "val": 12, "test": 24}
    rows = tmp_path / "new.jsonl"
    rows.write_text('{"text": "wonderful"}\n{"text": "awful"}\n')
    applied = run_cli("apply", run / "patch.safetensors", "--model", tiny_model, "--input", rows)
    assert applied.exit_code == 0, applied.output
    assert all(json.loads(line)["prediction"] in ("negative", "positive") for line in applied.output.splitlines())
    r = run_cli("eval", "--model", tiny_model, "--task", reviews, *CUSTOM, "--patch", run / "patch.safetensors", "--json")
    assert r.exit_code == 0 and json.loads(r.output)["patched"]["n"] == 24, r.output
    # the patch carries the template and candidates: applying it needs neither the training file nor --model
    reviews.rename(tmp_path / "moved.jsonl")
    again = run_cli("apply", run / "patch.safetensors", "--input", rows)
    assert again.exit_code == 0 and again.output == applied.output, again.output


def test_a_toml_task_patch_applies_with_its_own_template(tiny_model, reviews, tmp_path):
    """The patch stores the TOML task's template and candidates: applying it needs neither the TOML file nor its
    data, and a TOML edited since does not change what the patch predicts."""
    toml = tmp_path / "reviews.toml"
    toml.write_text('data = "reviews.jsonl"\ntemplate = "Review: {text} Sentiment:"\ncandidates = "negative,positive"\n')
    run = tmp_path / "run"
    r = run_cli("tune", "--model", tiny_model, "--task", toml, "--layer", "1", "--steps", "2", "--eval-every", "1",
                "--batch-size", "4", "--run-dir", run, "--quiet")
    assert r.exit_code == 0, r.output
    rows = tmp_path / "new.jsonl"
    rows.write_text('{"text": "wonderful"}\n{"text": "awful"}\n')
    applied = run_cli("apply", run / "patch.safetensors", "--input", rows)
    assert applied.exit_code == 0, applied.output
    toml.write_text('data = "reviews.jsonl"\ntemplate = "{text} was:"\ncandidates = "bad,good"\n')
    assert run_cli("apply", run / "patch.safetensors", "--input", rows).output == applied.output
    toml.unlink()
    reviews.unlink()
    again = run_cli("apply", run / "patch.safetensors", "--input", rows)
    assert again.exit_code == 0 and again.output == applied.output, again.output
    assert all(json.loads(line)["prediction"] in ("negative", "positive") for line in again.output.splitlines())


def test_toml_task_file_with_an_answer_field(tiny_model, tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"q": f"What is {i} plus {i}?", "a": str(2 * i)}) + "\n" for i in range(20)))
    toml = tmp_path / "qa.toml"
    toml.write_text('data = "qa.jsonl"\ntemplate = "Question: {q}\\nAnswer:"\nanswer_field = "a"\n')
    r = run_cli("eval", "--model", tiny_model, "--task", toml, "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.output)
    assert result["zero_shot"]["metric"] == "f1" and result["rows"] == 8


def test_custom_task_errors_name_the_problem(tiny_model, reviews, tmp_path):
    tune = ["tune", "--model", tiny_model, "--layer", "1", "--steps", "1", "--quiet"]
    assert_user_error(run_cli(*tune, "--task", reviews, "--run-dir", tmp_path / "a"), "needs --template")
    assert_user_error(run_cli(*tune, "--task", reviews, "--template", "no slots", "--candidates", "a,b",
                              "--run-dir", tmp_path / "b"), "no {field} slot")
    assert_user_error(run_cli(*tune, "--task", reviews, "--template", "{text}", "--run-dir", tmp_path / "c"),
                      "either candidates")
    for template in ("Review: {} Sentiment:", "{0}", "{text[0]}"):   # positional or indexed slots
        assert_user_error(run_cli(*tune, "--task", reviews, "--template", template, "--candidates", "a,b",
                                  "--run-dir", tmp_path / "c2"), "is not a field name")
    assert_user_error(run_cli(*tune, "--task", reviews, "--template", "{title}:", "--candidates", "negative,positive",
                              "--run-dir", tmp_path / "d"), "line 1", "missing field(s) title")
    assert_user_error(run_cli(*tune, "--task", reviews, "--template", "{text}", "--candidates", "bad,good",
                              "--run-dir", tmp_path / "e"), "line 1", "not one of the candidates")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert_user_error(run_cli(*tune, "--task", empty, *CUSTOM, "--run-dir", tmp_path / "f"), "holds no rows")
    assert_user_error(run_cli(*tune, "--task", tmp_path / "nope.jsonl", *CUSTOM, "--run-dir", tmp_path / "g"),
                      "does not exist")
    assert_user_error(run_cli(*tune, "--task", "sst2", *CUSTOM, "--run-dir", tmp_path / "h"), "has its own template")
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("data = [")
    assert_user_error(run_cli(*tune, "--task", bad_toml, "--run-dir", tmp_path / "i"), "not valid TOML")
