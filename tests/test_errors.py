"""Bad input: one line on stderr, exit code 2, no traceback, nothing overwritten."""
from __future__ import annotations

import pytest

import zolite
from conftest import run_cli
from zolite.errors import ZoliteError

QUICK = ["--steps", "2", "--eval-every", "0", "--batch-size", "2", "--quiet"]


def assert_user_error(result, *needles):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    message = result.output.strip()
    assert message.startswith("error: ") and len(message.splitlines()) == 1, message
    for needle in needles:
        assert needle in message, message


@pytest.fixture(scope="module")
def patch_file(tiny_model, small_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("p") / "run"
    zolite.tune(tiny_model, "sst2", data=small_data, run_dir=run, layer="1", steps=2, eval_every=0, batch_size=2,
                progress=False)
    return run / "patch.safetensors"


def test_unknown_model_task_and_layer(tiny_model, small_data, tmp_path):
    assert_user_error(run_cli("tune", "--model", "llama9-1t", "--run-dir", tmp_path / "a"), "unknown model", "smollm2-135m")
    assert_user_error(run_cli("tune", "--model", tiny_model, "--task", "mnli", "--run-dir", tmp_path / "b"),
                      "unknown task 'mnli'", "sst2")
    assert_user_error(run_cli("tune", "--model", tiny_model, "--layer", "4", "--data", small_data, "--run-dir",
                              tmp_path / "c", *QUICK), "layer 4 is out of range", "0 to 3")
    assert_user_error(run_cli("tune", "--model", tiny_model, "--layer", "x", "--data", small_data, "--run-dir",
                              tmp_path / "d", *QUICK), "not a layer index")
    assert_user_error(run_cli("tune", "--model", tiny_model, "--data", small_data, "--run-dir", tmp_path / "e", *QUICK),
                      "no layer of this model shows massive activations", "--layer N (0-based)")


@pytest.mark.parametrize("option, value, needle", [
    ("--steps", "-3", "--steps must be at least 0"), ("--batch-size", "0", "--batch-size must be at least 1"),
    ("--eps", "0", "--eps must be above 0"), ("--lr", "-1", "--lr must be at least 0"),
    ("--eval-every", "-1", "--eval-every must be at least 0"), ("--max-length", "1", "--max-length must be at least 2"),
    ("--lr", "nan", "--lr must be at least 0"), ("--eps", "inf", "--eps must be above 0"),
    ("--momentum", "1.5", "--momentum must be in [0, 1)"), ("--device", "foo", "unknown device 'foo'"),
    ("--device", "cuda:99", "--device cuda:99"),
])
def test_bad_numbers_fail_before_loading(option, value, needle, tmp_path):
    # the model does not exist: the option is refused before anything is loaded
    assert_user_error(run_cli("tune", "--model", tmp_path / "no-model", option, value, "--run-dir", tmp_path / "r"), needle)
    assert not (tmp_path / "r").exists()


def test_a_schedule_is_refused_where_the_optimizer_sizes_its_own_steps(tmp_path):
    assert_user_error(run_cli("tune", "--model", tmp_path / "no-model", "--optimizer", "adam", "--lr-schedule", "linear",
                              "--run-dir", tmp_path / "r"), "--lr-schedule linear decays the steps of ZO-SGD",
                      "drop --lr-schedule")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args, needle", [
    (("eval", "--batch-size", "0"), "--batch-size must be at least 1, got 0"),
    (("eval", "--limit", "-1"), "--limit must be at least 1, got -1"),   # was python's [:-1]: all rows but one
    (("eval", "--limit", "0"), "--limit must be at least 1, got 0"),     # was "the split is empty"
    (("apply", "p.safetensors", "--prompt", "hi", "--max-new-tokens", "0"), "--max-new-tokens must be at least 1"),
    (("profile", "--device", "cpu", "--snapshot"), "--snapshot records torch's CUDA memory"),
])
def test_bad_numbers_of_the_other_commands_fail_before_loading(args, needle, tmp_path):
    assert_user_error(run_cli(*args, "--model", tmp_path / "no-model"), needle)


def test_a_python_option_spelled_as_on_the_command_line_gets_its_python_name():
    with pytest.raises(TypeError, match=r"layers \(use layer=\), test \(use eval_test=\)"):
        zolite.tune("m", "sst2", test=True, layers="3")


def test_an_output_folder_that_is_a_file_is_refused(tiny_model, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    assert_user_error(run_cli("tune", "--model", tiny_model, "--run-dir", afile, *QUICK), "is a file", "--run-dir")
    assert_user_error(run_cli("profile", "--model", tiny_model, "--out", afile), "is a file", "--out")
    assert afile.read_text() == "mine"


def test_generation_rows_are_not_classified_and_a_folder_is_not_a_patch_path(tmp_path):
    from zolite.io import refuse_clobber
    from zolite.predict import task_row
    from zolite.tasks import get_task

    with pytest.raises(ZoliteError, match="squad is a generation task.*zolite serve"):
        task_row(get_task("squad"), {"context": "c", "question": "q", "answers": ["a"]}, "rows.jsonl")
    with pytest.raises(ZoliteError, match="is a folder; give a file path"):
        refuse_clobber(tmp_path, force=True)


def test_a_corrupt_gguf_is_one_line(tmp_path):
    pytest.importorskip("gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"garbage, not a GGUF file")
    result = run_cli("scan", "--model", bad, "--out", tmp_path / "s")   # (after the "converting ..." notice)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.splitlines()[-1].startswith("error: ") and "could not be read as a GGUF model" in result.output


def test_a_local_model_is_named_by_its_absolute_path(tiny_model, monkeypatch):
    from pathlib import Path

    from zolite.tune import _model_reference

    monkeypatch.chdir(Path(tiny_model).parent)
    assert _model_reference(Path(tiny_model).name) == str(Path(tiny_model).resolve())
    assert _model_reference("smollm2-135m") == "smollm2-135m"


def test_missing_and_malformed_data(tiny_model, tmp_path):
    assert_user_error(run_cli("tune", "--model", tiny_model, "--layer", "1", "--data", tmp_path, "--run-dir",
                              tmp_path / "r1", *QUICK), "no sst2 data under")
    bad = tmp_path / "sst2.jsonl"
    bad.write_text('{"sentence": "fine", "label": 1}\n{"sentence": "broken", "label": 1\n')
    assert_user_error(run_cli("tune", "--model", tiny_model, "--layer", "1", "--data", tmp_path, "--run-dir",
                              tmp_path / "r2", *QUICK), "line 2", "not valid JSON")
    bad.write_text("")
    assert_user_error(run_cli("tune", "--model", tiny_model, "--layer", "1", "--data", tmp_path, "--run-dir",
                              tmp_path / "r3", *QUICK), "holds no rows")


def test_existing_outputs_are_not_overwritten(tiny_model, small_data, patch_file, tmp_path):
    before = patch_file.read_bytes()
    assert_user_error(run_cli("tune", "--model", tiny_model, "--layer", "1", "--data", small_data,
                              "--out", patch_file, "--run-dir", tmp_path / "new", *QUICK), "already exists", "--force")
    assert patch_file.read_bytes() == before
    assert_user_error(run_cli("tune", "--model", tiny_model, "--layer", "1", "--data", small_data,
                              "--run-dir", patch_file.parent, *QUICK), "already exists", "--resume")
    assert patch_file.read_bytes() == before


def test_resume_must_match_the_run(tiny_model, small_data, patch_file, tmp_path):
    assert_user_error(run_cli("tune", "--resume", patch_file.parent, "--lr", "0.5"), "started with lr=", "not 0.5")
    assert_user_error(run_cli("tune", "--resume", patch_file.parent, "--task", "boolq"), "task='sst2'")
    assert_user_error(run_cli("tune", "--resume", tmp_path), "not a zolite run folder")
    mine = tmp_path / "mine.safetensors"   # a file of the user's, given as --out of a resumed run: kept
    mine.write_bytes(b"precious")
    assert_user_error(run_cli("tune", "--resume", patch_file.parent, "--out", mine), "already exists", "--force")
    assert mine.read_bytes() == b"precious"


def test_patch_for_another_base_or_model_is_refused(other_tiny_model, patch_file, tmp_path):
    assert_user_error(run_cli("apply", patch_file, "--model", other_tiny_model, "--prompt", "hi"), "another base")
    from conftest import build_tiny_model

    wider = build_tiny_model(tmp_path / "wide", hidden=48)
    assert_user_error(run_cli("apply", patch_file, "--model", wider, "--prompt", "hi"), "shape")
    shallow = build_tiny_model(tmp_path / "shallow", layers=1)
    assert_user_error(run_cli("apply", patch_file, "--model", shallow, "--prompt", "hi"), "does not have")


def test_the_right_base_in_bfloat16_is_told_to_load_in_another_dtype(tiny_model, patch_file):
    assert_user_error(run_cli("apply", patch_file, "--model", tiny_model, "--dtype", "bfloat16", "--prompt", "hi"),
                      "as loaded in bfloat16", "--dtype float32 or float16")


def test_corrupt_or_foreign_patch_files(tiny_model, patch_file, tmp_path):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(patch_file.read_bytes()[:-1000])
    assert_user_error(run_cli("apply", truncated, "--model", tiny_model, "--prompt", "hi"), "not a readable safetensors patch")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    assert_user_error(run_cli("apply", garbage, "--model", tiny_model, "--prompt", "hi"), "not a readable")
    from safetensors.torch import save_file
    import torch

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, foreign)
    assert_user_error(run_cli("apply", foreign, "--model", tiny_model, "--prompt", "hi"), "not a zolite patch")
    assert_user_error(run_cli("apply", tmp_path / "nope.safetensors", "--model", tiny_model, "--prompt", "hi"),
                      "does not exist")
    assert_user_error(run_cli("apply", patch_file, "--model", tiny_model), "exactly one of")


def test_model_paths(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_user_error(run_cli("eval", "--model", tmp_path / "empty"), "without config.json")
    (tmp_path / "weights.bin").write_bytes(b"x")
    assert_user_error(run_cli("eval", "--model", tmp_path / "weights.bin"), "not a .gguf")
    assert_user_error(run_cli("eval", "--model", "nobody/no-such-model-xyz"), "not in the Hugging Face cache")


def test_gpu_out_of_memory_is_one_line_with_the_fix(tiny_model, small_data, tmp_path, monkeypatch):
    """The GPU running out of memory mid-run (simulated: there is no GPU here) ends in one line naming the fixes."""
    import sys

    import torch

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (GPU 0; 7.6 GiB total)")

    monkeypatch.setattr(sys.modules["zolite.tune"], "load_for_tuning", oom)
    assert_user_error(run_cli("tune", "--model", tiny_model, "--data", small_data, "--layer", "1", "--run-dir",
                              tmp_path / "run", *QUICK), "the GPU ran out of memory", "Tried to allocate 1.00 GiB",
                      "--micro-batch", "--gpu-memory")


def _broken_copy(tiny_model, tmp_path, name: str, edit) -> str:
    """A copy of the tiny model's folder with one file edited."""
    import shutil
    from pathlib import Path

    folder = tmp_path / name
    shutil.copytree(tiny_model, folder)
    edit(Path(folder))
    return str(folder)


def _damage_header(folder):
    weights = folder / "model.safetensors"
    blob = weights.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    weights.write_bytes(blob[:8] + b"{" * n + blob[8 + n:])


def _drop_model_type(folder):
    import json

    config = json.loads((folder / "config.json").read_text())
    del config["model_type"]
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("edit, needles", [
    (lambda f: (f / "config.json").write_text('{"model_type": "llama",'), ("config.json is not valid JSON", "line 1")),
    (lambda f: (f / "config.json").write_text("[1, 2]"), ("config.json names no model_type",)),
    (_drop_model_type, ("config.json names no model_type",)),
    (lambda f: (f / "tokenizer.json").write_text('{"version": "1.0", "truncation"'), ("tokenizer.json is not valid JSON",)),
    (lambda f: (f / "tokenizer.json").write_text("{}"), ("tokenizer.json is not a tokenizer",)),
    (lambda f: (f / "tokenizer_config.json").write_text('{"a": '), ("tokenizer_config.json is not valid JSON",)),
    (_damage_header, ("model.safetensors is not a readable safetensors file", "header")),
    (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:5000]),
     ("model.safetensors is not a readable safetensors file",)),
], ids=["config-not-json", "config-a-list", "config-no-model-type", "tokenizer-not-json", "tokenizer-not-a-tokenizer",
        "tokenizer-config-not-json", "safetensors-header", "safetensors-cut-off"])
def test_a_malformed_model_folder_is_one_line(edit, needles, tiny_model, small_data, tmp_path):
    """config.json, the tokenizer's files and the safetensors headers are checked before transformers reads them
    (a config.json that was not JSON gave tune a 64-line traceback)."""
    model = _broken_copy(tiny_model, tmp_path, "model", edit)
    assert_user_error(run_cli("tune", "--model", model, "--layer", "1", "--data", small_data, "--run-dir",
                              tmp_path / "run", *QUICK), *needles, "download or convert the model again")
    assert not (tmp_path / "run").exists()


def test_every_command_checks_a_model_folder(tiny_model, patch_file, tmp_path):
    model = _broken_copy(tiny_model, tmp_path, "model", lambda f: (f / "config.json").write_text("{"))
    for args in (("eval", "--model", model), ("scan", "--model", model, "--out", tmp_path / "s"),
                 ("profile", "--model", model, "--out", tmp_path / "p"),
                 ("apply", patch_file, "--model", model, "--prompt", "hi"),
                 ("export", "--model", model, "--patch", patch_file, "--out", tmp_path / "e")):
        assert_user_error(run_cli(*args), "config.json is not valid JSON")


def test_a_malformed_run_folder_is_one_line(patch_file, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(patch_file.parent, run)
    (run / "config.json").write_text('{"model": ')
    assert_user_error(run_cli("tune", "--resume", run), "config.json is not valid JSON", "start a new run")
    (run / "config.json").write_text('{"model": "m", "no_such_option": 1}')
    assert_user_error(run_cli("tune", "--resume", run), "not the config of a tune run", "start a new run")


def test_an_output_under_a_file_is_refused(tiny_model, patch_file, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    assert_user_error(run_cli("tune", "--model", tiny_model, "--run-dir", afile / "run", *QUICK),
                      f"{afile} is a file, not a folder", "--run-dir")
    assert_user_error(run_cli("tune", "--model", tiny_model, "--out", afile / "p.safetensors", "--run-dir",
                              tmp_path / "r", *QUICK), f"{afile} is a file, not a folder")
    assert_user_error(run_cli("scan", "--model", tiny_model, "--out", afile / "scan"), "is a file, not a folder", "--out")
    assert_user_error(run_cli("export", "--patch", patch_file, "--model", tiny_model, "--out", afile / "x" / "y"),
                      "is a file, not a folder", "--out")
    assert afile.read_text() == "mine"
