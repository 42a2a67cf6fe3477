"""`zolite ablate`: plans, lr grids picked by val, resume, tables and plots."""
from __future__ import annotations

import csv
import json
import os
import queue
import sys

import pytest

import zolite
from conftest import one_cpu_thread, run_cli
from test_errors import assert_user_error
from zolite.ablate import arm_options, load_plan
from zolite.errors import ZoliteError

PLAN = """
name = "mini"
[defaults]
eval_test = true
layer = "1"          # the tiny random model has no dominant layer
[[arm]]
name = "mezo"
lr = [1e-3, 1e-2]
[[arm]]
name = "backprop"
estimator = "fo"
optimizer = "adam"
lr = 1e-3
[[arm]]
name = "last-layer-residual"
layer = "last"
estimator = "residual"
steps_factor = 2.0
lr_scale = 1.0
"""


def test_plan_layers_are_written_as_tune_stores_them(tiny_model, small_data, tmp_path):
    """A plan's layer = 1 (a TOML number) or "2,1" reaches config.json as "1" / "1,2": a second ablate over the same
    --out reads those runs back instead of refusing them as another run's."""
    plan = tmp_path / "layers.toml"
    plan.write_text('name = "layers"\n[[arm]]\nname = "one"\nlayer = 1\nlr = 1e-3\n'
                    '[[arm]]\nname = "two"\nlayer = "2,1"\nlr = 1e-3\n')
    options = dict(plan=str(plan), seeds=1, steps=2, out=tmp_path / "out", data=small_data, batch_size=4,
                   eval_every=0, progress=False)
    first = zolite.ablate(tiny_model, "sst2", **options)
    again = zolite.ablate(tiny_model, "sst2", **options)
    assert [a["runs"] for a in again["arms"]] == [a["runs"] for a in first["arms"]]
    assert [a["runs"][0]["layers"] for a in again["arms"]] == ["1", "1,2"]


def test_lr_and_steps_factor_in_defaults_apply_to_arms_without_their_own():
    plan = {"lr": [1e-3, 1e-2], "steps_factor": 2.0, "eps": 1e-2}
    facts = {"num_layers": 4, "dominant": 1, "lr": 3e-4, "steps": 10}
    assert arm_options({"name": "a"}, plan, facts, None, {}) == ({"eps": 1e-2, "steps": 20}, [1e-3, 1e-2])
    assert arm_options({"name": "b", "lr_scale": 2.0}, plan, facts, None, {})[1] == [6e-4]
    assert arm_options({"name": "c", "steps_factor": 1.0, "lr": 5e-3}, plan, facts, None, {}) == \
        ({"eps": 1e-2, "steps": 10}, [5e-3])


def test_builtin_plan_resolves_for_a_model():
    plan = load_plan("seed000")
    facts = {"num_layers": 30, "dominant": 11, "lr": 3e-4, "steps": 1000}
    resolved = {a["name"]: arm_options(a, plan["defaults"], facts, None, {}) for a in plan["arms"]}
    assert {"mezo", "eps-0.1", "nz5-same-forwards", "fo-layer", "layerwise", "residual-same-steps",
            "zo-adam", "layer-full", "layer-random"} <= set(resolved)
    assert resolved["nz5-same-forwards"][0]["steps"] == 200 and resolved["nz10-same-steps"][0]["steps"] == 1000
    assert resolved["residual-same-forwards"][0]["steps"] == 2000
    assert resolved["layer-last"][0]["layer"] == "29"
    assert resolved["layer-random"][0]["layer"] not in ("11", None)
    assert resolved["mezo"][1] == [3e-4] and resolved["layer-full"][1] == [9e-6, 3e-5, 9e-5]


def test_ablate_runs_resumes_and_tabulates(tiny_model, small_data, tmp_path):
    plan = tmp_path / "mini.toml"
    plan.write_text(PLAN)
    out = tmp_path / "abl"
    results = zolite.ablate(tiny_model, "sst2", plan=str(plan), seeds=2, steps=4, out=out, data=small_data,
                            batch_size=4, eval_every=2, progress=False)
    arms = {a["name"]: a for a in results["arms"]}
    assert len(arms["mezo"]["runs"]) == 3              # two lrs at seed 0, the picked one at seed 1
    assert arms["mezo"]["picked_lr"] in (1e-3, 1e-2)
    assert arms["last-layer-residual"]["runs"][0]["layers"] == "3"
    assert arms["last-layer-residual"]["runs"][0]["steps"] == 8
    assert arms["last-layer-residual"]["runs"][0]["forward_passes"] == 8
    assert arms["mezo"]["runs"][0]["forward_passes"] == 8
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["arm"] for r in rows] == ["mezo", "backprop", "last-layer-residual"]
    assert all(float(r["test_mean"]) >= 0 for r in rows)
    assert [r["status"] for r in rows] == ["done"] * 3
    assert [r["micro_batch"] for r in rows] == ["4"] * 3 and {r["mode"] for r in rows} == {"fp16"}
    assert all(0 <= float(r["kept_step_mean"]) <= 8 for r in rows)
    for name in ("results.md", "accuracy.png", "loss.png"):
        assert (out / name).stat().st_size > 0
    # the references beside the table: the test split's most common label's share, the base model's step-0 val score
    report0 = json.loads((out / "mezo" / "lr0.001-s0" / "report.json").read_text())
    label_counts = [c["n"] for c in report0["final"]["test"]["per_class"].values()]
    assert (f"most common label scores {max(label_counts) / sum(label_counts):.4f}; the untuned base model scores "
            f"{report0['val_curve'][0][1]:.4f} on val") in (out / "results.md").read_text()
    # resume: finished runs are read back, not run again
    report = out / "backprop" / "lr0.001-s1" / "report.json"
    before = report.stat().st_mtime_ns
    again = zolite.ablate(tiny_model, "sst2", plan=str(plan), seeds=2, steps=4, out=out, data=small_data,
                          batch_size=4, eval_every=2, progress=False)
    assert report.stat().st_mtime_ns == before
    assert again["arms"][1]["runs"] == results["arms"][1]["runs"]
    # the same --out with other settings: its folders hold other runs, so ablate refuses them (read back, resumed or
    # overwritten as this one, they would put wrong rows in the table), in one line, for a table too
    for extra in ([], ["--table-only"]):
        result = run_cli("ablate", "--model", tiny_model, "--task", "sst2", "--plan", plan, "--seeds", "2",
                         "--steps", "6", "--out", out, "--data", small_data, "--batch-size", "4",
                         "--eval-every", "2", "--quiet", *extra)
        assert_user_error(result, "holds a run with steps = 4, not 6", "another --out")
    # an option left at its default is compared too: these runs used --batch-size 4, the default is 16
    result = run_cli("ablate", "--model", tiny_model, "--task", "sst2", "--plan", plan, "--seeds", "2", "--steps", "4",
                     "--out", out, "--data", small_data, "--eval-every", "2", "--table-only")
    assert_user_error(result, "holds a run with batch_size = 4, not 16", "another --out")
    assert report.stat().st_mtime_ns == before


def test_parallel_jobs_give_the_sequential_results(tiny_model, small_data, tmp_path, monkeypatch):
    """--jobs runs each run in its own process; the runs are deterministic, so the table is the same. The runs are
    dealt over two (pretend) GPUs: on the CPU their CUDA_VISIBLE_DEVICES changes nothing, but the whole token path
    (manager queue, spawned workers taking and returning tokens) runs."""
    monkeypatch.setattr(sys.modules["zolite.ablate"], "_visible_gpus", lambda: ["a", "b"])
    plan = tmp_path / "mini.toml"
    plan.write_text(PLAN)
    common = dict(plan=str(plan), seeds=2, steps=4, data=small_data, batch_size=4, eval_every=2, progress=False,
                  arms="mezo,last-layer-residual")
    # the workers run on one thread each (3 jobs on 2 cores); so does the reference: a thread count changes how
    # some CPU kernels split their sums, and the losses' last bits with it (seen with transformers 5.25)
    with one_cpu_thread():
        one = zolite.ablate(tiny_model, "sst2", out=tmp_path / "one", **common)
    r = run_cli("ablate", "--model", tiny_model, "--task", "sst2", "--plan", plan, "--seeds", 2, "--steps", 4,
                "--data", small_data, "--batch-size", 4, "--eval-every", 2, "--arms", "mezo,last-layer-residual",
                "--out", tmp_path / "two", "--jobs", 3)
    assert r.exit_code == 0, r.output
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert [a["name"] for a in two["arms"]] == ["mezo", "last-layer-residual"]
    for a, b in zip(one["arms"], two["arms"]):
        assert a["picked_lr"] == b["picked_lr"]
        assert [(r["lr"], r["seed"], r["val"], r["test"], r["loss_by_25"]) for r in a["runs"]] == \
               [(r["lr"], r["seed"], r["val"], r["test"], r["loss_by_25"]) for r in b["runs"]]


def test_parallel_runs_spread_over_the_visible_gpus(monkeypatch):
    """Each worker holds one GPU's token while its run lasts: runs alternate over the GPUs, and a failed run gives its
    GPU back."""
    ablate_module = sys.modules["zolite.ablate"]   # (zolite.ablate the name is the function)

    assert ablate_module._gpu_is_free_to_pick([{"options": {}}, {"options": {"device": "cuda"}}])
    assert not ablate_module._gpu_is_free_to_pick([{"options": {}}, {"options": {"device": "cuda:1"}}])
    assert ablate_module._gpu_tokens(4, ["3", "5"]) == ["3", "5", "3", "5"]
    assert ablate_module._gpu_tokens(3, ["0"]) == [None] * 3 and ablate_module._gpu_tokens(2, []) == [None] * 2
    tokens = queue.Queue()
    for token in ablate_module._gpu_tokens(4, ["3", "5"]):
        tokens.put(token)
    seen = []

    def fake_run(*args):
        seen.append(os.environ["CUDA_VISIBLE_DEVICES"])
        if len(seen) == 2:
            raise RuntimeError("a failing run")
        return {"args": args}

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    monkeypatch.setattr(ablate_module, "_run", fake_run)
    assert ablate_module._run_on_a_gpu(tokens, "model", "task") == {"args": ("model", "task")}
    with pytest.raises(RuntimeError):
        ablate_module._run_on_a_gpu(tokens, "model", "task")
    for _ in range(3):
        ablate_module._run_on_a_gpu(tokens, "model", "task")
    assert seen == ["3", "5", "3", "5", "3"]
    assert tokens.qsize() == 4


def test_parallel_runs_start_longest_first():
    """The runs with the most forward passes start first: 10 z per step (20 per step) before backprop (~3) before
    MeZO (2) before residual feedback (1); plan order among equals."""
    from zolite.ablate import _forwards, _longest_first

    def run(name, **options):
        return ({"name": name, "options": {"steps": 100, **options}}, 1e-3, 0)

    ready = [run("mezo"), run("residual", estimator="residual"), run("nz10", n_z=10), run("fo", estimator="fo"),
             run("mezo-2"), run("nz5-short", n_z=5, steps=20)]
    assert [r[0]["name"] for r in _longest_first(ready)] == ["nz10", "fo", "mezo", "mezo-2", "nz5-short", "residual"]
    assert _forwards({"steps": 1000, "n_z": 10}) == 20000


def test_a_cut_off_run_resumes_or_starts_again(tiny_model, small_data, tmp_path, monkeypatch, capsys):
    """ablate continues a cut-off run from its seed checkpoint; one checkpointed on another GPU model is run again."""
    from test_tune import Interrupted, _cut_off_after
    from zolite.checkpoint import load_checkpoint, save_checkpoint

    ablate_module = sys.modules["zolite.ablate"]
    options = dict(data=small_data, layer="1", steps=4, eval_every=2, batch_size=4)
    whole = zolite.tune(tiny_model, "sst2", run_dir=tmp_path / "whole", lr=1e-2, seed=0, progress=False, **options)
    for name, elsewhere in (("here", False), ("elsewhere", True)):
        with monkeypatch.context() as m:
            _cut_off_after(m, 2)
            with pytest.raises(Interrupted):
                zolite.tune(tiny_model, "sst2", run_dir=tmp_path / name, lr=1e-2, seed=0, progress=False, **options)
        if elsewhere:
            masters, best, state = load_checkpoint(tmp_path / name)
            save_checkpoint(tmp_path / name, masters, best, {**state, "trained_on": "cuda/another GPU/float32"})
        row = ablate_module._run(tiny_model, "sst2", tmp_path / name, options, 1e-2, 0, False)
        report = json.loads((tmp_path / name / "report.json").read_text())
        assert report["loss_curve"] == whole["loss_curve"] and row["val"] == whole["final"]["val"]["score"]
        assert ("starting it again" in capsys.readouterr().err) == elsewhere


def test_a_run_of_an_older_zolite_resumes(tiny_model, small_data, tmp_path, monkeypatch):
    """A run folder whose config.json predates an option (cuda_graphs, tf32, lr_schedule: it ran at their defaults) is
    resumed by ablate and by tune --resume, not refused as another run's ("cuda_graphs = None, not False")."""
    from test_tune import Interrupted, _cut_off_after

    options = dict(data=small_data, layer="1", steps=4, eval_every=2, batch_size=4)
    whole = zolite.tune(tiny_model, "sst2", run_dir=tmp_path / "whole", lr=1e-2, seed=0, progress=False, **options)
    for name in ("by-ablate", "by-tune"):
        run_dir = tmp_path / name
        with monkeypatch.context() as m:
            _cut_off_after(m, 2)
            with pytest.raises(Interrupted):
                zolite.tune(tiny_model, "sst2", run_dir=run_dir, lr=1e-2, seed=0, progress=False, **options)
        config = json.loads((run_dir / "config.json").read_text())
        (run_dir / "config.json").write_text(json.dumps({k: v for k, v in config.items()
                                                         if k not in ("cuda_graphs", "tf32", "lr_schedule")}))
        if name == "by-ablate":
            sys.modules["zolite.ablate"]._run(tiny_model, "sst2", run_dir, {**options, "cuda_graphs": False,
                                                                            "lr_schedule": "constant"}, 1e-2, 0, False)
        else:
            zolite.tune(tiny_model, "sst2", resume=run_dir, progress=False, cuda_graphs=False, lr_schedule="constant")
        report = json.loads((run_dir / "report.json").read_text())
        assert report["loss_curve"] == whole["loss_curve"]


def test_parallel_ablation_starts_the_longest_runs_first(tiny_model, small_data, tmp_path, monkeypatch):
    """Two at a time: the two long runs (4 z per step, last in the plan) start before the short ones, which start
    only as a long one ends (each run writes its config.json when it starts)."""
    plan = tmp_path / "order.toml"
    plan.write_text('''
name = "order"
[defaults]
layer = "1"
[[arm]]
name = "short"
lr = [1e-3, 1e-2]
[[arm]]
name = "long"
n_z = 4
lr = [1e-3, 1e-2]
''')
    out = tmp_path / "out"
    zolite.ablate(tiny_model, "sst2", plan=str(plan), seeds=1, steps=6, out=out, jobs=2, data=small_data,
                  batch_size=4, eval_every=3, progress=False)
    started = {run.parent.name + "/" + run.name: (run / "config.json").stat().st_mtime_ns
               for run in out.glob("*/lr*")}
    assert len(started) == 4
    assert max(v for k, v in started.items() if k.startswith("long/")) < \
        min(v for k, v in started.items() if k.startswith("short/"))
    # run again: every run is finished, so all are read back in this process, none submitted to a worker
    from concurrent.futures import ProcessPoolExecutor

    def no_worker(*args, **kwargs):
        raise AssertionError("a finished run was given to a worker")
    monkeypatch.setattr(ProcessPoolExecutor, "submit", no_worker)
    again = zolite.ablate(tiny_model, "sst2", plan=str(plan), seeds=1, steps=6, out=out, jobs=2, data=small_data,
                          batch_size=4, eval_every=3, progress=False)
    assert sum(len(arm["runs"]) for arm in again["arms"]) == 4


def test_an_arm_with_one_lr_starts_all_its_seeds_at_once(tiny_model, small_data, tmp_path, monkeypatch):
    """Nothing to pick from a one-lr grid, so its seeds need not wait for seed 0: with three workers, the one-lr arm's
    two seeds (the longer runs) are submitted first, then the other arm's grid."""
    from concurrent.futures import ProcessPoolExecutor

    plan = tmp_path / "one-lr.toml"
    plan.write_text('name = "one-lr"\n[defaults]\nlayer = "1"\n[[arm]]\nname = "single"\nn_z = 2\nlr = 1e-3\n'
                    '[[arm]]\nname = "grid"\nlr = [1e-3, 1e-2]\n')
    submitted = []
    submit = ProcessPoolExecutor.submit

    def record(pool, fn, *args):
        submitted.append(f"{args[3].parent.name}/{args[3].name}")   # args: tokens, model, task, run_dir, ...
        return submit(pool, fn, *args)
    monkeypatch.setattr(ProcessPoolExecutor, "submit", record)
    zolite.ablate(tiny_model, "sst2", plan=str(plan), seeds=2, steps=2, out=tmp_path / "out", jobs=3,
                  data=small_data, batch_size=4, eval_every=1, progress=False)
    assert submitted[:2] == ["single/lr0.001-s0", "single/lr0.001-s1"]
    assert set(submitted[2:4]) == {"grid/lr0.001-s0", "grid/lr0.01-s0"} and len(submitted) == 5


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch):
    import torch

    from zolite.ablate import _visible_gpus

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6,2")
    assert _visible_gpus() == ["6", "2"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert _visible_gpus() == ["0", "1"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _visible_gpus() == []


def test_table_only_tabulates_a_cut_off_ablation(tiny_model, small_data, tmp_path):
    """--table-only runs nothing; arms still running are in the table, marked with what has finished."""
    plan = tmp_path / "mini.toml"
    plan.write_text(PLAN)
    out = tmp_path / "abl"
    common = dict(plan=str(plan), steps=4, out=out, data=small_data, batch_size=4, eval_every=2, progress=False)
    zolite.ablate(tiny_model, "sst2", seeds=1, arms="mezo,backprop", **common)
    (out / "backprop" / "lr0.001-s0" / "report.json").unlink()        # as if cut off mid-run
    made = {p.relative_to(out) for p in out.rglob("report.json")}
    r = run_cli("ablate", "--model", tiny_model, "--task", "sst2", "--plan", plan, "--seeds", 2, "--steps", 4,
                "--batch-size", 4, "--eval-every", 2, "--out", out, "--table-only")   # the run's options (not --data)
    assert r.exit_code == 0, r.output
    assert {p.relative_to(out) for p in out.rglob("report.json")} == made   # nothing ran
    rows = {row["arm"]: row for row in csv.DictReader(open(out / "results.csv"))}
    assert set(rows) == {"mezo"} and rows["mezo"]["status"] == "seeds 1/2" and rows["mezo"]["seeds"] == "1"
    assert "seeds 1/2" in (out / "results.md").read_text()
    (out / "mezo" / "lr0.01-s0" / "report.json").unlink()
    zolite.ablate(tiny_model, "sst2", seeds=2, table_only=True, **common)
    row = next(csv.DictReader(open(out / "results.csv")))
    assert row["status"] == "lr grid 1/2" and float(row["lr"]) == 1e-3
    assert_user_error(run_cli("ablate", "--model", tiny_model, "--plan", plan, "--out", tmp_path / "empty",
                              "--table-only"), "no finished runs of plan mini", "without --table-only")


def test_plan_errors(tiny_model, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[arm]]\nname = "x"\nlearning_rate = 1\n')
    with pytest.raises(ZoliteError, match="unknown option.*learning_rate"):
        load_plan(str(bad))
    assert_user_error(run_cli("ablate", "--model", tiny_model, "--plan", "seed999"), "unknown plan 'seed999'", "seed000")
    assert_user_error(run_cli("ablate", "--model", tiny_model, "--arms", "nope"), "has no arm(s) nope")
    assert_user_error(run_cli("ablate", "--model", tiny_model, "--jobs", "0"), "--jobs must be at least 1")
    assert_user_error(run_cli("ablate", "--model", tiny_model, "--steps", "0"), "--steps must be at least 1")
    for text, message in [('[arm]\nname = "x"\n', "[[arm]] (two brackets)"),
                          ('defaults = 3\n[[arm]]\nname = "x"\n', "defaults is a table"),
                          ('[[arm]]\nname = "x"\nlr_scale = "3"\n', "lr_scale = '3' in x should be a number above 0"),
                          ('[[arm]]\nname = "x"\nn_z = "5"\n', "n_z = '5' in x should be a whole number"),
                          ('[[arm]]\nname = "x"\nsteps_factor = 0\n', "steps_factor = 0 in x should be a number"),
                          ('[[arm]]\nname = "x"\nlayerwise = 1\n', "layerwise = 1 in x should be true or false"),
                          ('[defaults]\nseed = 1\n[[arm]]\nname = "x"\n', "seed in [defaults] is set by")]:
        bad.write_text(text)
        assert_user_error(run_cli("ablate", "--model", tiny_model, "--plan", bad), message)
    for text, message in [('[[arm]]\nname = "x"\nlr = [1e-3, 0.001]\n', "its lr grid 0.001, 0.001 repeats a value"),
                          ('[[arm]]\nname = "x"\nn_z = 0\nlr = 1e-3\n', "--n-z must be at least 1")]:
        bad.write_text(text)   # found when the arms are resolved, before any run starts
        assert_user_error(run_cli("ablate", "--model", tiny_model, "--plan", bad, "--out", tmp_path / "o"), message)
        assert not (tmp_path / "o").exists()
    empty = tmp_path / "empty.toml"
    empty.write_text('[[arm]]\nname = "x"\nlr = []\n')
    assert_user_error(run_cli("ablate", "--model", tiny_model, "--plan", empty, "--steps", "2"),
                      "arm x: its lr / lr_scale list is empty")


def test_a_run_whose_eps_came_from_its_load_mode_is_read_back(tiny_model, small_data, tmp_path):
    """Without eps in the plan or the profile, tune picks it from the load mode (1e-2 for a quantized base on a GPU):
    such a run folder is this plan's run, not another one's; an unquantized run at that eps is another run."""
    plan = tmp_path / "plan.toml"
    plan.write_text('name = "p"\n[[arm]]\nname = "mezo"\nlayer = 1\nlr = 1e-3\n')
    options = dict(plan=str(plan), seeds=1, steps=2, out=tmp_path / "out", data=small_data, batch_size=4,
                   eval_every=0, progress=False)
    first = zolite.ablate(tiny_model, "sst2", **options)
    config_file = tmp_path / "out" / "mezo" / "lr0.001-s0" / "config.json"
    config = json.loads(config_file.read_text())
    assert config["eps"] == 1e-3   # the CPU loads unquantized
    config_file.write_text(json.dumps({**config, "eps": 1e-2, "mode": "nf4"}))   # as an nf4 run on a GPU writes it
    again = zolite.ablate(tiny_model, "sst2", **options)
    assert again["arms"][0]["runs"] == first["arms"][0]["runs"]
    config_file.write_text(json.dumps({**config, "eps": 1e-2}))   # unquantized at 1e-2: another run
    with pytest.raises(ZoliteError, match="eps = 0.01, not 0.001"):
        zolite.ablate(tiny_model, "sst2", **options)


def test_an_arm_that_cannot_load_fails_before_any_run(tiny_model, small_data, tmp_path):
    """Every layer tuned leaves nothing to quantize: an arm asking for that in nf4 fails the plan up front, not after
    the other arms' runs (a whole device session's worth) have started."""
    plan = tmp_path / "plan.toml"
    plan.write_text('name = "p"\n[defaults]\nmode = "nf4"\n[[arm]]\nname = "layer"\nlayer = 1\nlr = 1e-3\n'
                    '[[arm]]\nname = "full"\nlayer = "all"\nlr = 1e-3\n')
    with pytest.raises(ZoliteError, match="nothing is left to quantize with --mode nf4"):
        zolite.ablate(tiny_model, "sst2", plan=str(plan), seeds=1, steps=2, out=tmp_path / "out", data=small_data,
                      progress=False)
    assert not (tmp_path / "out").exists()
