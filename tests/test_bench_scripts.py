"""The GPU benchmarks run end to end on the CPU, so a change to what they drive (tune's step, the server) cannot
break them unnoticed until a device session (issue 24's run.world once cost one: bench/step_speed.py failed there)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert set(config["ms"]) == {"zolite", "zolite-bare", "eager", "floor-2x", "floor-2b"}
    assert all(ms > 0 for ms in config["ms"].values())
    assert config["fused_vs_per_half"]["max_abs_diff"] < 1e-4   # same z, same batch: rounding only


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


def test_step_ops_counts_each_dtype():
    rows = [line.split("|")[1:-1] for line in _run(BENCH / "step_ops.py").splitlines() if line.startswith("| float")]
    assert [r[0].strip() for r in rows] == ["float32", "float16"] and all(int(r[3]) > 0 for r in rows)
