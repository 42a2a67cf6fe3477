"""A profile's per-task recipes ([tasks.TASK]): what `zolite tune --task TASK` starts from on that model."""
from __future__ import annotations

import json

import pytest

import zolite
from conftest import run_cli
from zolite.errors import ZoliteError
from zolite.profile import Profile, find_profile, profile_names
from zolite.tasks import TASKS
from zolite.tune_setup import TuneConfig, check_options, recipe_text, task_recipe

RECIPE = {"layer": "1", "lr": 2e-3, "guard": False}


def fake_profile(tasks: dict, dominant_layer: int | None = None) -> Profile:
    return Profile(name="tiny", description="", source="hub:x/y", arch="llama", num_layers=2, tasks=tasks,
                   dominant_layer=dominant_layer)


@pytest.fixture
def tiny_recipe(monkeypatch):
    """The tiny model's folder gets a profile with an SST-2 recipe (loading still sees a folder without one)."""
    monkeypatch.setattr("zolite.tune_setup.find_profile", lambda name: fake_profile({"sst2": RECIPE}))


@pytest.mark.parametrize("name", profile_names())
def test_every_shipped_recipe_is_a_run_tune_accepts(name):
    profile = find_profile(name)
    for task, recipe in profile.tasks.items():
        assert task in TASKS, f"{name}: recipe for unknown task {task}"
        assert task_recipe(name, task) == recipe
        check_options(TuneConfig(model=name, task=task, **recipe))   # raises on a bad value


def test_qwen_ships_its_measured_recipes():
    """The options that scored best per task on Qwen2.5-Coder-1.5B (docs/evidence.md), as the CLI would take them."""
    recipes = {t: recipe_text(task_recipe("qwen2.5-coder-1.5b", t)) for t in ("sst2", "boolq", "rte", "copa")}
    assert recipes == {"sst2": "--layer 27", "boolq": "--layer all --params bias,layernorm --eps-scale activation --lr 0.003",
                       "rte": "--eps 0.001 --no-guard", "copa": ""}
    assert task_recipe("smollm2-135m", "sst2") == {}
    out = run_cli("models").output
    assert "recipe for boolq: --layer all --params bias,layernorm --eps-scale activation --lr 0.003" in out


def test_tune_starts_from_the_recipe_and_says_so(tiny_recipe, tiny_model, small_data, tmp_path):
    result = run_cli("tune", "--model", tiny_model, "--data", small_data, "--steps", "2", "--eval-every", "0",
                     "--batch-size", "2", "--quiet", "--run-dir", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "recipe: " in result.output and "--layer 1 --lr 0.002 --no-guard" in result.output
    assert "lr: 0.002 (the recipe's)" in result.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["recipe"] == RECIPE and report["layers"] == "1"
    assert report["layer_source"] == f"profile {tiny_model}'s recipe for sst2"
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["recipe"], config["lr"], config["guard"]) == (True, 2e-3, False)


def test_options_given_win_over_the_recipe_and_no_recipe_leaves_it_out(tiny_recipe, tiny_model, small_data, tmp_path):
    quick = dict(data=small_data, steps=1, eval_every=0, batch_size=2, progress=False)
    report = zolite.tune(tiny_model, "sst2", run_dir=tmp_path / "given", lr=5e-3, **quick)
    assert report["lr"]["lr"] == 5e-3 and report["lr"]["source"] == "given"
    assert report["config"]["guard"] is False and report["layers"] == "1"   # the rest of the recipe still applies
    assert report["recipe"] == {"layer": "1", "guard": False}               # and the report says which part
    report = zolite.tune(tiny_model, "sst2", run_dir=tmp_path / "plain", recipe=False, layer="0", lr=5e-3, **quick)
    assert report["recipe"] is None and report["config"]["recipe"] is False and report["config"]["guard"] is True
    # a task without a recipe runs on the defaults
    report = zolite.tune(tiny_model, "boolq", run_dir=tmp_path / "boolq", layer="0", lr=5e-3, **quick)
    assert report["recipe"] is None and report["config"]["recipe"] is False


def test_a_recipes_lr_is_kept_only_for_the_recipes_weights(tiny_recipe, tiny_model, small_data, tmp_path):
    """The recipe's lr was chosen for its layer: another --layer gets the probed step, and tune says so."""
    result = run_cli("tune", "--model", tiny_model, "--data", small_data, "--layer", "0", "--steps", "1",
                     "--eval-every", "0", "--batch-size", "2", "--run-dir", tmp_path / "other")
    assert result.exit_code == 0, result.output
    assert f"{tiny_model}'s recipe for sst2 chose lr 0.002 for --layer 1; other weights get the probed step" \
        in result.output
    report = json.loads((tmp_path / "other" / "report.json").read_text())
    assert report["recipe"] == {"guard": False} and report["lr"]["source"] == "probe"
    quick = dict(data=small_data, steps=1, eval_every=0, batch_size=2, progress=False)
    report = zolite.tune(tiny_model, "sst2", run_dir=tmp_path / "same", layer="1", **quick)   # its own layer, named
    assert report["recipe"] == RECIPE and report["lr"]["source"] == "recipe"


def test_a_recipes_lr_goes_only_where_the_probe_can_size_other_weights(monkeypatch, capsys):
    from zolite.tune_setup import with_recipe

    recipe = {"layer": "all", "params": "bias,layernorm", "lr": 3e-3}
    monkeypatch.setattr("zolite.tune_setup.find_profile", lambda name: fake_profile({"boolq": recipe}))
    assert with_recipe("tiny", "boolq", {"params": "layernorm, bias"})["lr"] == 3e-3   # the same weights, spelt otherwise
    assert capsys.readouterr().err == ""
    assert "lr" not in with_recipe("tiny", "boolq", {"eps_scale": "activation"})        # z scaled otherwise
    assert "chose lr 0.003 for --layer all --params bias,layernorm" in capsys.readouterr().err
    # --nproc's parent reads the recipe for the batch only; rank 0 prints the line
    assert "lr" not in with_recipe("tiny", "boolq", {"eps_scale": "activation"}, say=False)
    assert capsys.readouterr().err == ""
    assert with_recipe("tiny", "boolq", {"layer": "0", "optimizer": "adam"})["lr"] == 3e-3   # Adam: no probe
    monkeypatch.setattr("zolite.tune_setup.find_profile", lambda name: fake_profile({"boolq": {"lr": 3e-3}}))
    assert with_recipe("tiny", "boolq", {"layer": "0"}) == {"layer": "0", "recipe": True}
    # a recipe without a layer was chosen for the profile's dominant layer: naming that layer keeps its lr
    monkeypatch.setattr("zolite.tune_setup.find_profile", lambda name: fake_profile({"boolq": {"lr": 3e-3}}, 1))
    assert with_recipe("tiny", "boolq", {"layer": "1"})["lr"] == 3e-3
    assert with_recipe("tiny", "boolq", {"layer": "01"})["lr"] == 3e-3
    assert with_recipe("tiny", "boolq", {"layer": "auto"})["lr"] == 3e-3
    assert "lr" not in with_recipe("tiny", "boolq", {"layer": "0"})


def test_asking_for_a_recipe_that_does_not_exist_is_one_line(tiny_model, small_data, tmp_path):
    result = run_cli("tune", "--model", tiny_model, "--task", "boolq", "--recipe", "--data", small_data,
                     "--run-dir", tmp_path / "run")
    assert result.exit_code != 0
    assert result.output.strip().splitlines()[-1].endswith("has no recipe for boolq (`zolite models` lists each "
                                                           "profile's); drop --recipe")
    assert not (tmp_path / "run").exists()


def test_a_recipe_cannot_choose_the_seed_or_the_data(monkeypatch):
    monkeypatch.setattr("zolite.tune_setup.find_profile", lambda name: fake_profile({"sst2": {"seed": 3}}))
    with pytest.raises(ZoliteError, match=r"\[tasks.sst2\] sets seed, which a recipe cannot"):
        task_recipe("tiny", "sst2")


def test_ablate_arms_run_without_recipes(tiny_recipe, tiny_model, small_data, tmp_path):
    """An arm is the profile's defaults and what it changes, so a plan means the same on a model with recipes."""
    plan = tmp_path / "plan.toml"
    plan.write_text('[defaults]\nlayer = "0"\nsteps = 1\neval_every = 0\nbatch_size = 2\nlr = 5e-3\n'
                    '[[arm]]\nname = "plain"\n')
    zolite.ablate(tiny_model, "sst2", plan=str(plan), seeds=1, data=small_data, out=str(tmp_path / "abl"),
                  progress=False)
    config = json.loads((tmp_path / "abl" / "plain" / "lr0.005-s0" / "config.json").read_text())
    assert (config["recipe"], config["guard"]) == (False, True)
    plan.write_text(plan.read_text() + "recipe = true\n")
    with pytest.raises(ZoliteError, match="a plan's arms run without the profile's task recipes"):
        zolite.ablate(tiny_model, "sst2", plan=str(plan), seeds=1, data=small_data, out=str(tmp_path / "abl2"))


def test_a_recipe_without_a_layer_leaves_the_layer_to_the_scan_or_profile(monkeypatch, tiny_model, small_data,
                                                                          tmp_path):
    monkeypatch.setattr("zolite.tune_setup.find_profile", lambda name: fake_profile({"sst2": {"guard": False}}))
    report = zolite.tune(tiny_model, "sst2", data=small_data, run_dir=tmp_path / "run", layer="0", lr=5e-3, steps=1,
                         eval_every=0, batch_size=2, progress=False)
    assert report["recipe"] == {"guard": False} and report["layer_source"] == "given"


def test_a_recipe_is_read_as_the_command_line_writes_it(monkeypatch, tiny_model, small_data, tmp_path):
    """layer as a number, params with spaces: taken, and reported as taken."""
    recipe = {"layer": 1, "params": "v_proj, o_proj", "lr": 2e-3}
    monkeypatch.setattr("zolite.tune_setup.find_profile", lambda name: fake_profile({"sst2": recipe}))
    report = zolite.tune(tiny_model, "sst2", data=small_data, run_dir=tmp_path / "run", steps=1, eval_every=0,
                         batch_size=2, progress=False)
    assert report["recipe"] == {"layer": "1", "params": "v_proj,o_proj", "lr": 2e-3}
    assert report["layer_source"] == f"profile {tiny_model}'s recipe for sst2" and report["lr"]["source"] == "recipe"


def test_a_recipe_run_resumes_as_it_started(tiny_recipe, tiny_model, small_data, tmp_path):
    quick = dict(data=small_data, eval_every=1, batch_size=2, progress=False)
    zolite.tune(tiny_model, "sst2", run_dir=tmp_path / "run", steps=1, **quick)
    config = tmp_path / "run" / "config.json"
    saved = json.loads(config.read_text())
    config.write_text(json.dumps({**saved, "steps": 2}))   # one more step to go
    report = zolite.tune(tiny_model, "sst2", resume=tmp_path / "run", progress=False)
    assert report["steps"] == 2 and report["recipe"] == RECIPE
    with pytest.raises(ZoliteError, match="was started with recipe=True, not False"):
        zolite.tune(tiny_model, "sst2", resume=tmp_path / "run", recipe=False, progress=False)


@pytest.mark.qwen
def test_qwen_boolq_runs_its_recipe(small_data, tmp_path, monkeypatch):
    """The real model: `zolite tune --model qwen2.5-coder-1.5b --task boolq` tunes every layer's biases and norms
    (143,360 weights) at the recipe's lr. 5.5 min on 2 CPU cores (the GGUF's check and conversion included), 11 GB
    of memory."""
    import os

    path = os.environ.get("ZOLITE_QWEN_GGUF")
    if not path:
        pytest.skip("set ZOLITE_QWEN_GGUF to Qwen2.5-Coder-1.5B-Instruct's Q4_K_M .gguf (1.1 GB) to run this")
    sources = tmp_path / "cache" / "sources"   # the test's own cache (conftest), where the profile's parts are joined
    sources.mkdir(parents=True)
    (sources / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf").symlink_to(os.path.abspath(path))
    result = run_cli("tune", "--model", "qwen2.5-coder-1.5b", "--task", "boolq", "--data", small_data, "--steps", "1",
                     "--eval-every", "0", "--batch-size", "2", "--max-length", "128", "--quiet",
                     "--run-dir", tmp_path / "run")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["recipe"] == {"layer": "all", "params": "bias,layernorm", "eps_scale": "activation", "lr": 3e-3}
    assert (report["tuned_params"], report["lr"]["source"]) == (143_360, "recipe")
