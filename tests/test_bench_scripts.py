"""The GPU benchmarks run end to end on the CPU, so a change to what they drive (tune's step, the server) cannot
break them unnoticed until a device session (issue 24's run.world once cost one: bench/step_speed.py failed there)."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from zolite import tune
from zolite.checkpoint import load_checkpoint
from zolite.stepsize import PROBES

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _run(*args) -> str:
    """Run a bench script; its stdout."""
    result = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_step_speed_times_every_method(tmp_path):
    _run(BENCH / "step_speed.py", "--out", tmp_path, "--configs", "launch-L11", "--steps", "1", "--warmup", "1",
         "--rounds", "1")
    config = json.loads((tmp_path / "results.json").read_text())["configs"]["launch-L11"]
    assert "error" not in config, config.get("error")
    assert set(config["ms"]) == {"zolite", "zolite-bare", "graphs", "graphs-bare", "eager", "floor-2x", "floor-2b"}
    assert all(ms > 0 for ms in config["ms"].values())
    assert config["fused_vs_per_half"]["max_abs_diff"] < 1e-4   # same z, same batch: rounding only


def test_step_speed_times_some_tensors_and_backprop(tmp_path):
    """--params configs (BoolQ's recipe shape: every layer's norms), the opt-in backprop step, and a profile of
    --profile-steps steps."""
    _run(BENCH / "step_speed.py", "--out", tmp_path, "--configs", "launch-norms", "--steps", "1", "--warmup", "1",
         "--rounds", "1", "--step-samples", "1", "--only", "zolite-bare,eager,backprop", "--profile", "zolite-bare",
         "--profile-steps", "2")
    assert (tmp_path / "profile-launch-norms-zolite-bare.txt").read_text().startswith("2 steps")
    config = json.loads((tmp_path / "results.json").read_text())["configs"]["launch-norms"]
    assert "error" not in config, config.get("error")
    assert set(config["ms"]) == {"zolite-bare", "eager", "backprop"} and all(ms > 0 for ms in config["ms"].values())
    assert config["layers"] == "all (norm)" and config["tuned_params"] == 2 * 30 * 64   # 2 norms a layer
    assert "backprop/eager" in config["ratios"]


def test_serve_bench_answers_every_request(tiny_model, tmp_path):
    _run(BENCH / "serve_bench.py", "--model", tiny_model, "--device", "cpu", "--layer", "1", "--requests", "4",
         "--clients", "1,2", "--max-tokens", "4", "--workers", "one-at-a-time,continuous", "--out", tmp_path)
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(r["clients"], r["worker"]) for r in rows] == [
        (1, "one-at-a-time"), (1, "continuous"), (2, "one-at-a-time"), (2, "continuous")]
    assert all(r["requests"] == 4 and r["requests_per_s"] > 0 for r in rows)
    assert rows[1]["swaps"] == 0 and rows[0]["swaps"] == 4   # continuous mixes patches in a batch; the old worker swaps


def test_grad_energy_splits_the_layer_gradient_into_groups(tiny_model, small_data, tmp_path):
    out = tmp_path / "energy.json"
    _run(BENCH / "grad_energy.py", "--model", tiny_model, "--task", "sst2", "--layer", "1", "--data", small_data,
         "--batches", "2", "--batch-size", "4", "--out", out)
    result = json.loads(out.read_text())
    groups = result["groups"]
    assert groups["layer"]["numel"] == sum(t["numel"] for t in result["tensors"])
    assert sum(g["share_of_energy"] for name, g in groups.items() if name != "layer") == pytest.approx(1.0)
    assert groups["layer"]["zo_rate_vs_layer"] == pytest.approx(1.0)
    # every layer's biases and norms, on the same batches: the norms' squared gradient in layer 1 is the same number
    subset = tmp_path / "bitfit.json"
    _run(BENCH / "grad_energy.py", "--model", tiny_model, "--task", "sst2", "--layer", "all", "--params", "layernorm",
         "--data", small_data, "--batches", "2", "--batch-size", "4", "--out", subset)
    tensors = {t["name"]: t for t in json.loads(subset.read_text())["tensors"]}
    assert {t["group"] for t in tensors.values()} == {"norms"} and len({n.split(".")[2] for n in tensors}) > 1
    for t in result["tensors"]:
        if t["group"] == "norms":
            assert tensors[t["name"]]["mean_grad_sq"] == pytest.approx(t["mean_grad_sq"], rel=1e-4)


def test_step_ops_counts_each_dtype():
    rows = [line.split("|")[1:-1] for line in _run(BENCH / "step_ops.py").splitlines() if line.startswith("| float")]
    assert [r[0].strip() for r in rows] == ["float32", "float16"] and all(int(r[3]) > 0 for r in rows)


def _results_tree(root, tiny_model, small_data, monkeypatch, done_arm, cut_arm, zero_shot):
    """A device session's results tree in small: two finished seeds of root/sst2/DONE_ARM, seed 0 of
    root/sst2/CUT_ARM cut off after 2 of 4 steps, and a zero-shot file named ZERO_SHOT (score 0.5)."""
    import zolite
    from test_tune import Interrupted, _cut_off_after

    common = dict(data=small_data, layer="1", steps=4, eval_every=2, batch_size=4, lr="auto", eval_test=True,
                  progress=False)
    for seed in (0, 1):
        zolite.tune(tiny_model, "sst2", run_dir=root / "sst2" / done_arm / f"lrauto-s{seed}", seed=seed, **common)
    with monkeypatch.context() as m:
        _cut_off_after(m, 2)
        with pytest.raises(Interrupted):
            zolite.tune(tiny_model, "sst2", run_dir=root / "sst2" / cut_arm / "lrauto-s0", **common)
    (root / zero_shot).write_text(json.dumps({"zero_shot": {"score": 0.5, "n": 40}}))


def test_runs_table_reads_finished_and_cut_off_runs(tiny_model, small_data, tmp_path, monkeypatch):
    """The device sessions' runs come home finished (report.json) or cut off (a seed checkpoint): both get a row,
    finished seeds an arm's test mean."""
    _results_tree(tmp_path, tiny_model, small_data, monkeypatch, "mezo", "cut", "zero-shot-sst2-fp16.json")
    _run(BENCH / "runs_table.py", tmp_path, "--json", tmp_path / "runs.json", "--md", tmp_path / "runs.md")
    rows = {r["run"]: r for r in json.loads((tmp_path / "runs.json").read_text())}
    assert rows["sst2/cut/lrauto-s0"]["status"] == "cut off" and rows["sst2/cut/lrauto-s0"]["steps"] == 2
    assert rows["sst2/mezo/lrauto-s1"]["status"] == "done" and rows["sst2/mezo/lrauto-s1"]["test"] is not None
    assert rows["sst2/cut/lrauto-s0"]["lr"] == rows["sst2/mezo/lrauto-s0"]["lr"]   # the same probe, seed 0
    table = (tmp_path / "runs.md").read_text()
    tests = [rows[f"sst2/mezo/lrauto-s{s}"]["test"] for s in (0, 1)]
    assert f"| sst2/mezo lrauto | 2 | {sum(tests) / 2:.3f} ± " in table and "| zero-shot-sst2-fp16 | | 0.500 (n = 40)" in table


def test_real_scale_matrix_fills_each_cell_from_its_arm(tiny_model, small_data, tmp_path, monkeypatch):
    """Issue 22's matrix: a cell is its arm's finished seeds' test mean ± std, plus its cut-off runs; a cell whose
    arm has no run reads "not run", zero-shot comes from the zero-shot files."""
    _results_tree(tmp_path, tiny_model, small_data, monkeypatch, "zolite", "mezo-full", "zero-shot-sst2-nf4.json")
    _run(BENCH / "real_scale_matrix.py", tmp_path, "--md", tmp_path / "matrix.md")
    cells = [line.strip("| ").split(" | ")
             for line in (tmp_path / "matrix.md").read_text().split("\n\n")[1].splitlines()[2:]]
    rows = {(c[0], c[1]): c[2:] for c in cells}   # (row, mode) -> the tasks' cells, SST-2's first
    tests = [json.loads((tmp_path / "sst2" / "zolite" / f"lrauto-s{s}" / "report.json").read_text())
             ["final"]["test"]["score"] for s in (0, 1)]
    spread = abs(tests[0] - tests[1]) / 2 ** 0.5   # the std of two values
    assert rows["zolite's defaults: layer 1, probed lr, eps 1e-2, guard", "nf4"][0] == \
        f"{sum(tests) / 2:.3f} ± {spread:.3f} (2 of 3)"
    assert rows["full-model MeZO (eps 1e-3, no guard, probed lr)", "fp16"][0] == "1 cut off at step 2"
    assert rows["backprop into layer 1 (AdamW 1e-4, 500 steps)", "nf4"][0] == "not run"
    assert rows["zero-shot", "nf4"] == ["0.500", "-", "-"] and rows["zero-shot", "fp16"][0] == "-"


def test_guard_return_runs_both_guards(tiny_model, small_data, tmp_path):
    _run(BENCH / "guard_return_cpu.py", "--out", tmp_path, "--", "--model", tiny_model, "--task", "sst2", "--layer",
         "1", "--data", small_data, "--steps", "200", "--eval-every", "100", "--lr", "1e-3", "--batch-size", "4",
         "--device", "cpu")
    back, halve = (json.loads((tmp_path / f"{v}.report.json").read_text())["lr"] for v in ("return", "halve"))
    # (a tiny random model's loss hardly answers its weights, so the guard may not fire here: tests/test_stepsize.py
    # checks the returns themselves on a loss that does)
    assert back["returned"] is not None and halve["returned"] is None   # the second run's guard only halves
    table = (tmp_path / "results.md").read_text()
    assert "| return |" in table and "| halve |" in table


def test_guard_variants_l0_changes_only_the_reference(tiny_model, small_data, tmp_path):
    _run(BENCH / "guard_return_cpu.py", "--out", tmp_path, "--variants", "return,l0", "--", "--model", tiny_model,
         "--task", "sst2", "--layer", "1", "--data", small_data, "--steps", "20", "--eval-every", "10",
         "--batch-size", "4", "--eps", "1e-2", "--lr", "auto", "--device", "cpu")
    choice = {v: load_checkpoint(tmp_path / v)[2]["lr_choice"] for v in ("return", "l0")}
    assert choice["return"]["lr"] == choice["l0"]["lr"]                # the same probe
    ours, l0 = choice["return"]["guard_reference"], choice["l0"]["guard_reference"]
    assert len(ours) == len(l0) == PROBES and ours != l0
    assert "| l0 |" in (tmp_path / "results.md").read_text()


def test_guard_reference_replay_tells_the_offsets_halving_from_a_real_one(tiny_model, small_data, tmp_path):
    """Two runs of the old guard (l0 under "base_losses"), their losses replaced by known ones: one flat at
    l0 + eps^2 c / 2 (a run that has not moved: only the l0 reference halves it), one that climbs (both halve)."""
    rng = random.Random(0)
    flat = [1.1 + 0.02 * rng.gauss(0, 1) for _ in range(400)]
    climbing = flat[:100] + [1.1 + 0.002 * t + 0.02 * rng.gauss(0, 1) for t in range(300)]
    for name, losses in (("flat", flat), ("climbing", climbing)):
        run = tmp_path / "final" / "sst2" / name / "lrauto-s0"
        tune(tiny_model, "sst2", data=small_data, layer="1", steps=2, eval_every=2, batch_size=4, eps=1e-2,
             lr="auto", device="cpu", run_dir=run, progress=False)
        checkpoint = run / "checkpoint.safetensors"
        with safe_open(str(checkpoint), "pt") as f:
            metadata = f.metadata()
        state = json.loads(metadata["zolite.state"])
        choice = state["lr_choice"]
        del choice["guard_reference"]
        choice["base_losses"] = [1.0 + 0.02 * rng.gauss(0, 1) for _ in range(PROBES)]
        choice["probe"]["curvature"] = 2000.0                  # eps^2 c / 2 = 0.1 at eps 1e-2
        state["losses"] = losses
        save_file(load_file(str(checkpoint)), str(checkpoint), metadata={**metadata, "zolite.state": json.dumps(state)})
        config = json.loads((run / "config.json").read_text())
        (run / "config.json").write_text(json.dumps({**config, "steps": 400}))   # guard blocks of 100 steps
    table = _run(BENCH / "guard_reference_replay.py", tmp_path / "final")
    assert "| sst2/flat/lrauto-s0 | 0.01 | 0.100 | 400 | 200 | no |" in table
    assert "| sst2/climbing/lrauto-s0 | 0.01 | 0.100 | 400 |" in table
    assert [line for line in table.splitlines() if "climbing" in line][0].endswith("| yes |")


def test_calibration_ceiling_bounds_what_a_shift_can_reach(tiny_model, small_data, tmp_path):
    """The best shift on test is a ceiling: no lower than zero-shot (shift 0), always one class (a shift past every
    margin) or the val-chosen shift; the AUC is a probability."""
    _run(BENCH / "calibration_ceiling.py", "--model", tiny_model, "--task", "boolq", "--data", small_data,
         "--out", tmp_path)
    r = json.loads((tmp_path / "result.json").read_text())
    assert (r["val_rows"], r["test_rows"]) == (20, 40)
    ceiling = r["test_at_best_shift_ceiling"]
    assert ceiling >= max(r["test_zero_shot"], r["test_always_majority"], r["test_at_val_shift"])
    assert ceiling >= 1 - r["test_always_majority"]   # the other class, always
    assert r["val_at_that_shift"] >= r["val_zero_shot"]
    assert 0 <= r["test_auc"] <= 1 and 0 <= r["val_auc"] <= 1


def test_calibration_ceiling_names_a_wrong_data_folder_on_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(BENCH / "calibration_ceiling.py"), "--task", "boolq", "--data",
                             str(tmp_path / "missing"), "--out", str(tmp_path)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]   # one line, no traceback
    assert "no boolq data under" in result.stderr


def test_probe_features_saves_each_layers_state_and_the_final_norms_input(tiny_model, small_data, tmp_path):
    """The saved states are transformers' hidden states at the answer position, the last one the final norm's output
    (bench/probe_ceiling.py's `layer` index), and the final norm's input beside them; probe_ceiling refuses answers
    of several tokens (the tiny tokenizer's "Yes" / "No") on one line, as its margin would not be zolite's score."""
    import torch

    _run(BENCH / "probe_features.py", "--model", tiny_model, "--task", "boolq", "--data", small_data, "--out", tmp_path)
    saved = torch.load(tmp_path / "features.pt")
    assert [len(saved[s]["label"]) for s in ("train", "val", "test")] == [40, 20, 40]
    layers, pre = saved["test"]["layers"].float(), saved["test"]["pre_norm"]
    assert layers.shape == (40, 4 + 1, 32)   # the embeddings and each of the 4 layers' outputs
    norm = saved["final_norm"]
    normed = pre * torch.rsqrt(pre.pow(2).mean(-1, keepdim=True) + norm["eps"]) * norm["weight"]
    assert torch.allclose(layers[:, -1], normed, atol=1e-2)   # fp16-stored states: the last one is after the norm
    assert saved["test"]["single_token"] is False
    result = subprocess.run([sys.executable, str(BENCH / "probe_ceiling.py"), "--features",
                             str(tmp_path / "features.pt"), "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "more than one token" in result.stderr


def test_curvature_spread_measures_the_probes_curvature_along_scaled_z(tiny_model, small_data, tmp_path):
    """At the probe's eps the bench's mean curvature is the one `--lr auto` measured before a run with the same
    --eps-scale activation (the same scaled directions, batches and losses), and it differs from the unscaled one."""
    import zolite

    common = dict(data=small_data, layer="all", params="norm", steps=1, eval_every=1, batch_size=4, lr="auto",
                  dtype="float32", progress=False)
    probed = {scale: zolite.tune(tiny_model, "sst2", run_dir=tmp_path / scale, eps_scale=scale, **common)
              ["lr"]["probe"]["curvature"] for scale in ("absolute", "activation")}
    _run(BENCH / "curvature_spread.py", "--model", tiny_model, "--task", "sst2", "--data", small_data, "--target",
         "all:norm", "--eps", "1e-2", "--eps-scale", "activation", "--batch-size", 4, "--out", tmp_path / "c.json")
    row, = json.loads((tmp_path / "c.json").read_text())["rows"]
    assert (row["eps_scale"], len(row["values"])) == ("activation", PROBES)
    assert row["mean"] == pytest.approx(probed["activation"], rel=1e-4)
    assert probed["activation"] != pytest.approx(probed["absolute"], rel=1e-2)


@pytest.mark.parametrize("script, args, says", [
    ("probe_features.py", ["--task", "boolq", "--data", "{tmp}/missing", "--out", "{tmp}/out"], "no boolq data under"),
    ("probe_ceiling.py", ["--features", "{tmp}/missing.pt", "--out", "{tmp}/out"], "no file"),
])
def test_probe_scripts_name_a_wrong_input_on_one_line(tmp_path, script, args, says):
    args = [a.format(tmp=tmp_path) for a in args]
    result = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert says in result.stderr


@pytest.mark.parametrize("plan", sorted((BENCH / "plans").glob("*.toml")), ids=lambda p: p.stem)
def test_bench_plans_load(plan):
    """A device session spends minutes before a plan's first run: a misspelt option must fail here instead."""
    from zolite.ablate import load_plan

    arms = load_plan(str(plan))["arms"]
    assert arms and len({a["name"] for a in arms}) == len(arms)
