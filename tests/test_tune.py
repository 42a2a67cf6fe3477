"""The whole path on the tiny model: tune -> patch -> apply -> eval, determinism, kill-and-resume."""
from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import zolite
from conftest import run_cli
from test_errors import assert_user_error
from zolite.errors import ZoliteError
from zolite.patch import load_patch

QUICK = ["--layer", "1", "--steps", "6", "--eval-every", "3", "--batch-size", "4", "--lr", "1e-2", "--quiet"]


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_tune_apply_eval_end_to_end(tiny_model, small_data, tmp_path):
    run = tmp_path / "run"
    r = run_cli("tune", "--model", tiny_model, "--task", "sst2", "--data", small_data, "--run-dir", run, "--json", *QUICK)
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output.strip().splitlines()[-1])
    assert summary["steps"] == 6 and summary["layers"] == "1"

    patch = load_patch(run / "patch.safetensors")
    assert set(patch.metadata) >= {"zolite.format", "zolite.version", "zolite.model", "zolite.arch", "zolite.layer",
                                   "zolite.base_sha256", "zolite.task", "zolite.steps", "zolite.metric", "zolite.hparams"}
    assert patch.metadata["zolite.layer"] == "1" and patch.metadata["zolite.task"] == "sst2"
    assert all(name.startswith("model.layers.1.") for name in patch.tensors)
    assert all(t.dtype == torch.float16 for t in patch.tensors.values())
    assert json.loads(patch.metadata["zolite.hparams"])["lr"] == 1e-2

    report = json.loads((run / "report.json").read_text())
    assert len(report["loss_curve"]) == 6 and [s for s, _ in report["val_curve"]] == [0, 3, 6]
    assert report["data"]["counts"] == {"train": 40, "val": 20, "test": 40}
    assert report["final"]["val"]["n"] == 20 and "cpu_rss_peak_gib" in report["memory"]
    assert json.loads((run / "config.json").read_text())["layer"] == "1"

    # the patch changes the model only in layer 1, and apply copies exactly the patch's values in
    loaded = zolite.load_model(tiny_model)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    zolite.apply_patch(loaded.model, run / "patch.safetensors")
    after = loaded.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= set(patch.tensors)
    for name, t in patch.tensors.items():
        assert torch.equal(after[name], t.float())

    r = run_cli("apply", run / "patch.safetensors", "--model", tiny_model, "--prompt", "the movie was")
    assert r.exit_code == 0 and r.output.strip(), r.output
    r = run_cli("apply", run / "patch.safetensors", "--model", tiny_model, "--eval", "sst2", "--data", small_data)
    assert r.exit_code == 0 and "zero-shot" in r.output and "patched" in r.output, r.output
    rows = tmp_path / "in.jsonl"
    rows.write_text('{"sentence": "a great film"}\n\n{"sentence": "dull and boring", "label": 0}\n')
    r = run_cli("apply", run / "patch.safetensors", "--model", tiny_model, "--input", rows)
    assert r.exit_code == 0, r.output
    preds = [json.loads(line) for line in r.output.strip().splitlines()]
    assert [p["line"] for p in preds] == [1, 3] and all(p["prediction"] in ("terrible", "great") for p in preds)

    r = run_cli("eval", "--model", tiny_model, "--task", "sst2", "--data", small_data,
                "--patch", run / "patch.safetensors", "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.output)
    assert result["rows"] == 40 and result["zero_shot"]["n"] == result["patched"]["n"] == 40
    assert 0 <= result["patched"]["ci95"][0] <= result["patched"]["accuracy"] <= result["patched"]["ci95"][1] <= 1


def test_the_last_step_is_scored_and_eval_uses_the_patchs_data_seed(tiny_model, small_data, tmp_path):
    """Steps after the last multiple of --eval-every get a val check (--keep best can keep them); zolite eval --patch
    splits with the data seed the patch was tuned with, and refuses another one for val / test rows."""
    run = tmp_path / "run"
    r = run_cli("tune", "--model", tiny_model, "--task", "sst2", "--data", small_data, "--run-dir", run, "--layer", "1",
                "--steps", "5", "--eval-every", "2", "--batch-size", "4", "--data-seed", "1", "--quiet")
    assert r.exit_code == 0, r.output
    report = json.loads((run / "report.json").read_text())
    assert [s for s, _ in report["val_curve"]] == [0, 2, 4, 5]
    assert report["memory_profile"]["phases"]["eval"]["count"] == 4   # the step-0 check is in the profile too
    result = zolite.evaluate(tiny_model, "sst2", patch=run / "patch.safetensors", data=small_data, split="val")
    assert result["data_seed"] == 1 and result["patched"]["score"] == report["final"]["val"]["score"]
    assert_user_error(run_cli("eval", "--model", tiny_model, "--task", "sst2", "--data", small_data, "--patch",
                              run / "patch.safetensors", "--data-seed", "0"), "tuned on the train split of --data-seed 1")


def test_same_seed_same_patch_bits(tiny_model, small_data, tmp_path):
    a = zolite.tune(tiny_model, "boolq", data=small_data, run_dir=tmp_path / "a", layer="2", steps=5,
                    eval_every=0, batch_size=3, lr=1e-2, progress=False)
    b = zolite.tune(tiny_model, "boolq", data=small_data, run_dir=tmp_path / "b", layer="2", steps=5,
                    eval_every=0, batch_size=3, lr=1e-2, progress=False)
    c = zolite.tune(tiny_model, "boolq", data=small_data, run_dir=tmp_path / "c", layer="2", steps=5,
                    eval_every=0, batch_size=3, lr=1e-2, seed=1, progress=False)
    assert a["loss_curve"] == b["loss_curve"]
    assert sha(a["patch"]) == sha(b["patch"])
    assert sha(a["patch"]) != sha(c["patch"])


def test_full_model_mode_tunes_every_layer(tiny_model, small_data, tmp_path):
    report = zolite.tune(tiny_model, "sst2", data=small_data, run_dir=tmp_path / "all", layer="all", steps=3,
                         eval_every=0, batch_size=4, lr=1e-2, progress=False)
    patch = load_patch(report["patch"])
    assert report["layers"] == "all" and patch.layers == [0, 1, 2, 3]
    assert {n.split(".")[2] for n in patch.tensors} == {"0", "1", "2", "3"}


def _tune_cmd(model, data, run_dir):
    return [sys.executable, "-m", "zolite.cli", "tune", "--model", model, "--data", data, "--run-dir", str(run_dir),
            "--layer", "1", "--steps", "300", "--eval-every", "10", "--batch-size", "4", "--lr", "1e-2", "--quiet"]


def test_sigkill_and_resume_gives_the_same_patch(tiny_model, small_data, tmp_path):
    full = tmp_path / "full"
    subprocess.run(_tune_cmd(tiny_model, small_data, full), check=True, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_tune_cmd(tiny_model, small_data, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoint.safetensors").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "patch.safetensors").exists()

    resumed = subprocess.run([sys.executable, "-m", "zolite.cli", "tune", "--resume", str(killed), "--quiet"],
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert sha(killed / "patch.safetensors") == sha(full / "patch.safetensors")
    assert (json.loads((killed / "report.json").read_text())["loss_curve"]
            == json.loads((full / "report.json").read_text())["loss_curve"])


class Interrupted(Exception):
    pass


def _cut_off_after(monkeypatch, step: int):
    """Make tune stop (as if killed) right after writing the checkpoint of `step`."""
    tune_module = sys.modules["zolite.tune"]
    save = tune_module._save

    def save_then_stop(run_dir, tuned, stepper, best, state, trained_on):
        save(run_dir, tuned, stepper, best, state, trained_on)
        if state["step"] == step:
            raise Interrupted
    monkeypatch.setattr(tune_module, "_save", save_then_stop)


@pytest.mark.parametrize("options", [
    {}, {"n_z": 2, "optimizer": "momentum"}, {"estimator": "residual", "optimizer": "adam"},
    {"layerwise": True, "weight_decay": 0.1}, {"optimizer": "sign"}, {"dtype": "float16", "optimizer": "adam"},
    {"estimator": "fo", "optimizer": "adam"}, {"params": "v_proj,down_proj"},
    {"eps_scale": "sparse", "dtype": "float16"}, {"lr_schedule": "cosine", "optimizer": "momentum"}],
    ids=["mezo", "nz2-momentum", "residual-adam", "layerwise-wd", "sign", "fp16-residuals-adam", "fo-adam",
         "params-subset", "sparse-fp16", "cosine-momentum"])
def test_resume_gives_the_uninterrupted_run(options, tiny_model, small_data, tmp_path, monkeypatch):
    """A run cut off after its step-4 checkpoint and resumed ends bit for bit like one that was never stopped (the
    patch keeps the last step, so it holds the weights the resumed steps made). ZO runs checkpoint their seeds and
    projected gradients (kilobytes, replayed from the base), backprop its tensors."""
    common = dict(data=small_data, layer="1", steps=8, eval_every=2, batch_size=4, lr=1e-2, keep="last",
                  progress=False, **options)
    full = zolite.tune(tiny_model, "sst2", run_dir=tmp_path / "full", **common)
    with monkeypatch.context() as m:
        _cut_off_after(m, 4)
        with pytest.raises(Interrupted):
            zolite.tune(tiny_model, "sst2", run_dir=tmp_path / "cut", **common)
    checkpoint = tmp_path / "cut" / "checkpoint.safetensors"
    if options.get("estimator") == "fo":
        assert checkpoint.stat().st_size > 10_000   # the layer, the best copy, Adam's buffers
    else:
        assert checkpoint.stat().st_size < 4_000 and zolite.checkpoint.load_checkpoint(tmp_path / "cut")[0] == {}
    resumed = zolite.tune(tiny_model, "sst2", resume=tmp_path / "cut", progress=False)
    assert full["kept_step"] == 8 and resumed["kept_step"] == 8
    assert sha(resumed["patch"]) == sha(full["patch"])
    assert resumed["loss_curve"] == full["loss_curve"] and resumed["val_curve"] == full["val_curve"]
    assert resumed["forward_passes"] == full["forward_passes"]
    tokens = [zolite.checkpoint.load_checkpoint(tmp_path / name)[2]["tokens"] for name in ("full", "cut")]
    assert tokens[0] > 0 and tokens[1] == tokens[0]   # the resumed run's throughput counts the steps before the cut


def test_replay_rebuilds_the_best_weights_of_an_earlier_step(tiny_model, small_data, tmp_path, monkeypatch):
    """The best-val copy of a step before the cut is rebuilt during replay: made best (by editing the checkpoint's
    state), step 2's weights become the patch, equal to step 2's weights of an uninterrupted run."""
    from zolite.checkpoint import load_checkpoint, save_checkpoint

    common = dict(data=small_data, layer="1", steps=6, eval_every=2, batch_size=4, lr=1e-2, progress=False)
    weights_at = {}
    tune_module = sys.modules["zolite.tune"]
    save = tune_module._save

    def save_and_remember(run_dir, tuned, stepper, best, state, trained_on):
        save(run_dir, tuned, stepper, best, state, trained_on)
        weights_at.setdefault(state["step"], {k: v.clone() for k, v in tuned.state().items()})
    with monkeypatch.context() as m:
        m.setattr(tune_module, "_save", save_and_remember)
        zolite.tune(tiny_model, "sst2", run_dir=tmp_path / "full", **common)
    with monkeypatch.context() as m:
        _cut_off_after(m, 4)
        with pytest.raises(Interrupted):
            zolite.tune(tiny_model, "sst2", run_dir=tmp_path / "cut", **common)
    masters, best, state = load_checkpoint(tmp_path / "cut")
    save_checkpoint(tmp_path / "cut", masters, best, {**state, "best_step": 2, "best_metric": 2.0})   # unbeatable
    resumed = zolite.tune(tiny_model, "sst2", resume=tmp_path / "cut", progress=False)
    assert resumed["kept_step"] == 2
    patch = load_patch(resumed["patch"]).tensors
    assert not torch.equal(weights_at[2]["model.layers.1.mlp.up_proj.weight"],
                           weights_at[4]["model.layers.1.mlp.up_proj.weight"])
    for name, value in weights_at[2].items():
        assert torch.equal(patch[name], value.half()), name


@pytest.mark.parametrize("options", [{}, {"n_z": 2, "optimizer": "momentum"}], ids=["mezo", "nz2-momentum"])
def test_dense_checkpoints_of_earlier_versions_still_resume(options, tiny_model, small_data, tmp_path, monkeypatch):
    """A ZO run checkpointed the old way (tensors, and for plain MeZO its trajectory) resumes to the same result;
    plain MeZO goes on with seed checkpoints, others with dense ones."""
    from zolite.checkpoint import load_checkpoint, save_checkpoint

    common = dict(data=small_data, layer="1", steps=8, eval_every=2, batch_size=4, lr=1e-2, keep="last",
                  progress=False, **options)
    full = zolite.tune(tiny_model, "sst2", run_dir=tmp_path / "full", **common)

    def old_save(run_dir, tuned, stepper, best, state, trained_on):
        tensors, scalars = stepper.state()
        trajectory = [[u[0][0], u[1][0]] for u in stepper.updates] if stepper.plain() else None
        save_checkpoint(run_dir, {**tuned.exact_state(), **{f"opt/{k}": v for k, v in tensors.items()}}, best,
                        {**state, "optimizer": scalars, "trajectory": trajectory})
        if state["step"] == 4:
            raise Interrupted
    with monkeypatch.context() as m:
        m.setattr(sys.modules["zolite.tune"], "_save", old_save)
        with pytest.raises(Interrupted):
            zolite.tune(tiny_model, "sst2", run_dir=tmp_path / "cut", **common)
    resumed = zolite.tune(tiny_model, "sst2", resume=tmp_path / "cut", progress=False)
    assert sha(resumed["patch"]) == sha(full["patch"]) and resumed["loss_curve"] == full["loss_curve"]
    masters = load_checkpoint(tmp_path / "cut")[0]
    assert (masters == {}) == (options == {})   # plain MeZO now checkpoints its seeds


def test_seed_checkpoint_resumes_where_its_z_are_drawn_again(tiny_model, small_data, tmp_path, monkeypatch):
    """Another device type or dtype is refused up front; another GPU model replays, and the digest decides."""
    from zolite.checkpoint import load_checkpoint, save_checkpoint

    options = dict(data=small_data, layer="1", steps=4, eval_every=2, batch_size=4, progress=False)
    whole = zolite.tune(tiny_model, "sst2", run_dir=tmp_path / "whole", **options)
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        _cut_off_after(m, 2)
        with pytest.raises(Interrupted):
            zolite.tune(tiny_model, "sst2", run_dir=run, **options)
    masters, best, state = load_checkpoint(run)
    save_checkpoint(run, masters, best, {**state, "trained_on": "cuda/NVIDIA H100 80GB HBM3/132 SMs/float32"})
    assert_user_error(run_cli("tune", "--resume", run, "--quiet"), "checkpointed on cuda/NVIDIA H100",
                      "resume it there, or start it again")
    save_checkpoint(run, masters, best, {**state, "trained_on": "cpu/float16"})   # another dtype
    assert_user_error(run_cli("tune", "--resume", run, "--quiet"), "checkpointed on cpu/float16")
    # same descriptor, other z (say another torch's generator): the replayed weights' digest tells
    save_checkpoint(run, masters, best, {**state, "replay_sha256": "0" * 64})
    assert_user_error(run_cli("tune", "--resume", run, "--quiet"), "its seeds give the same z only there")
    # another GPU model of the same device type and dtype: its replay gives the digest, so it goes on
    tune_module = sys.modules["zolite.tune"]
    monkeypatch.setattr(tune_module, "device_descriptor", lambda device, dtype: "cpu/another CPU/float32")
    save_checkpoint(run, masters, best, state)
    assert run_cli("tune", "--resume", run, "--quiet").exit_code == 0
    report = json.loads((run / "report.json").read_text())
    assert report["devices"] == ["cpu/float32", "cpu/another CPU/float32"]
    assert report["loss_curve"] == whole["loss_curve"] and sha(run / "patch.safetensors") == sha(whole["patch"])


def test_half_precision_patch_fits_a_base_with_negative_zeros(tmp_path, small_data):
    """A -0.0 weight (common in fp16 checkpoints) must not make the base fingerprint differ: the fingerprint is taken
    over the parameters as stored, not over the fp32 master values (where -0.0 + residual 0.0 reads +0.0)."""
    from conftest import build_tiny_model
    from transformers import LlamaForCausalLM

    folder = build_tiny_model(tmp_path / "model")
    model = LlamaForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, :3] = -0.0
    model.save_pretrained(folder)
    report = zolite.tune(str(folder), "sst2", data=small_data, run_dir=tmp_path / "run", layer="1", steps=2,
                         eval_every=0, batch_size=2, lr=0.0, dtype="float16", progress=False)
    loaded = zolite.load_model(str(folder), dtype="float16")
    assert torch.signbit(loaded.model.model.layers[1].mlp.up_proj.weight[0, :3]).all()
    zolite.apply_patch(loaded.model, report["patch"])   # refused before the fix: "tuned from another base"


def test_given_layer_needs_no_scan_key(tmp_path, small_data):
    """With --layer given, tune does not read the scan cache's key from the files: a checkpoint saved from the base
    model (keys without the `model.` prefix) has no embedding under the name the key looks for, and still tunes."""
    from conftest import build_tiny_model
    from transformers import AutoTokenizer, LlamaForCausalLM

    full = build_tiny_model(tmp_path / "full")
    LlamaForCausalLM.from_pretrained(full).model.save_pretrained(tmp_path / "base")
    AutoTokenizer.from_pretrained(full).save_pretrained(tmp_path / "base")
    report = zolite.tune(str(tmp_path / "base"), "sst2", data=small_data, run_dir=tmp_path / "run", layer="1",
                         steps=1, eval_every=0, batch_size=2, progress=False)
    assert report["layers"] == "1" and report["layer_source"] == "given"
    # and the key is found there too (a GPU run reads it for its memory plan): the same as the full checkpoint's
    from zolite.scan import folder_identity

    assert folder_identity(tmp_path / "base") == folder_identity(full)


def test_zo_runs_checkpoint_their_seeds_between_evals(tiny_model, small_data, tmp_path, monkeypatch):
    """A seed checkpoint also every SEED_CHECKPOINT_S seconds (0 here: every step), so a run cut off between evals
    (or one without val) resumes from its last step, not its last eval, and still ends as an uninterrupted one."""
    options = dict(data=small_data, layer="1", steps=6, eval_every=4, batch_size=4, lr=1e-2, keep="last",
                   progress=False)
    whole = zolite.tune(tiny_model, "sst2", run_dir=tmp_path / "whole", **options)
    monkeypatch.setattr(sys.modules["zolite.tune"], "SEED_CHECKPOINT_S", 0)
    with monkeypatch.context() as m:
        _cut_off_after(m, 3)
        with pytest.raises(Interrupted):
            zolite.tune(tiny_model, "sst2", run_dir=tmp_path / "cut", **options)
    from zolite.checkpoint import load_checkpoint
    assert load_checkpoint(tmp_path / "cut")[2]["step"] == 3
    resumed = zolite.tune(tiny_model, "sst2", resume=tmp_path / "cut", progress=False)
    assert sha(resumed["patch"]) == sha(whole["patch"]) and resumed["loss_curve"] == whole["loss_curve"]
    assert resumed["val_curve"] == whole["val_curve"]


@pytest.mark.parametrize("keep", ["best", "last"])
def test_a_run_cut_off_while_writing_its_patch_resumes(tiny_model, small_data, tmp_path, monkeypatch, keep):
    """The last checkpoint is the loop's end, before the patch's weights are chosen and rounded: resuming it (no
    steps left) writes the patch an uninterrupted run writes. A cut between evals with keep=best, too."""
    options = dict(data=small_data, layer="1", steps=7, eval_every=3, batch_size=4, lr=1e-2, keep=keep,
                   progress=False)
    whole = zolite.tune(tiny_model, "sst2", run_dir=tmp_path / "whole", **options)
    tune_module = sys.modules["zolite.tune"]
    monkeypatch.setattr(tune_module, "SEED_CHECKPOINT_S", 0)

    def patch_write_fails(*args, **kwargs):
        raise Interrupted
    with monkeypatch.context() as m:
        m.setattr(tune_module, "save_patch", patch_write_fails)
        with pytest.raises(Interrupted):
            zolite.tune(tiny_model, "sst2", run_dir=tmp_path / "cut", **options)
    resumed = zolite.tune(tiny_model, "sst2", resume=tmp_path / "cut", progress=False)
    assert sha(resumed["patch"]) == sha(whole["patch"]) and resumed["kept_step"] == whole["kept_step"]
    with monkeypatch.context() as m:
        _cut_off_after(m, 5)   # between the evals of steps 3 and 6
        with pytest.raises(Interrupted):
            zolite.tune(tiny_model, "sst2", run_dir=tmp_path / "between", **options)
    resumed = zolite.tune(tiny_model, "sst2", resume=tmp_path / "between", progress=False)
    assert sha(resumed["patch"]) == sha(whole["patch"]) and resumed["val_curve"] == whole["val_curve"]


def test_a_failed_run_leaves_no_folder_and_force_clears_the_old_report(tiny_model, small_data, tmp_path):
    run = tmp_path / "run"
    result = run_cli("tune", "--model", tiny_model, "--task", "sst2", "--data", small_data, "--layer", "99",
                     "--run-dir", run, "--quiet")
    assert_user_error(result, "layer 99 is out of range")
    assert not run.exists()
    options = dict(data=small_data, layer="1", steps=1, eval_every=0, batch_size=2, progress=False)
    zolite.tune(tiny_model, "sst2", run_dir=run, **options)
    assert (run / "report.md").is_file()
    with pytest.raises(ZoliteError, match="out of range"):   # --force, then the run fails: no stale report left
        zolite.tune(tiny_model, "sst2", run_dir=run, force=True, **{**options, "layer": "99"})
    assert not any((run / name).exists() for name in ("report.md", "report.json", "config.json"))


@pytest.mark.parametrize("mode, eps_scale, profile_eps, given, expected", [
    ("nf4", "absolute", None, None, 1e-2),     # a quantized base: its rounding outweighs the +-eps difference at 1e-3
    ("int8", "absolute", None, None, 1e-2),
    ("nf4", "sparse", None, None, 1e-2),
    ("nf4", "relative", None, None, 1e-3),     # eps in units of each tensor's RMS: MeZO's
    ("fp16", "absolute", None, None, 1e-3),    # unquantized: MeZO's eps
    ("offload", "absolute", None, None, 1e-3),
    ("nf4", "absolute", 1e-3, None, 1e-3),     # the profile's measured eps wins
    ("nf4", "absolute", None, 5e-3, 5e-3),     # and the user's over both
])
def test_eps_default_follows_the_base_quantization(mode, eps_scale, profile_eps, given, expected):
    from types import SimpleNamespace

    from zolite.profile import Profile
    from zolite.tasks import get_task
    from zolite.tune_setup import TuneConfig, fill_defaults

    profile = Profile(name="p", description="", source="hub:x/y", arch="llama", num_layers=2,
                      defaults={} if profile_eps is None else {"eps": profile_eps})
    loaded = SimpleNamespace(profile=profile, dtype=torch.float16, device=torch.device("cpu"), mode=mode)
    config = fill_defaults(TuneConfig(eps=given, eps_scale=eps_scale), loaded, [1], 2, get_task("sst2"))
    assert config.eps == expected
