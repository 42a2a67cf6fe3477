"""Hot-swapped patches: swap/reset bit-exactness, refusals, trajectories replayed bit for bit, export, serving."""
from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

import zolite
from conftest import run_cli
from test_errors import assert_user_error
from zolite.errors import ZoliteError
from zolite.patch import load_patch
from zolite.swap import PatchSet, load_with_patches
from zolite.apply import replay
from zolite.trajectory import trajectory_path

PROBE = "the film was"


@pytest.fixture(scope="module")
def two_patches(tiny_model, small_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("patches")
    paths = {}
    for name, (task, seed) in {"a": ("sst2", 0), "b": ("boolq", 1)}.items():
        zolite.tune(tiny_model, task, data=small_data, run_dir=root / name, layer="1,2", steps=6, eval_every=0,
                    batch_size=4, lr=0.5, eps=0.05, seed=seed, progress=False)
        paths[name] = root / name / "patch.safetensors"
    return paths


def _logits(model, tokenizer):
    ids = tokenizer(PROBE, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        return model(ids).logits


def test_swap_matches_copying_and_reset_is_bit_exact(tiny_model, two_patches):
    loaded = zolite.load_model(tiny_model)
    base_state = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    base_logits = _logits(loaded.model, loaded.tokenizer)
    expected = {}
    for name, path in two_patches.items():   # the plain way: copy the patch into a fresh model
        other = zolite.load_model(tiny_model)
        zolite.apply_patch(other.model, path)
        expected[name] = _logits(other.model, other.tokenizer)
    patches = PatchSet(loaded.model)
    for where in ("device", "pinned", "disk"):
        patches.attach(f"a-{where}", two_patches["a"], where)
        patches.attach(f"b-{where}", two_patches["b"], where)
    for name in ["a-device", "b-pinned", "a-disk", "b-device", "a-pinned", "b-disk", "a-device"]:
        patches.swap(name)
        assert torch.equal(_logits(loaded.model, loaded.tokenizer), expected[name[0]]), name
    assert not torch.equal(expected["a"], expected["b"])
    patches.reset()
    assert torch.equal(_logits(loaded.model, loaded.tokenizer), base_logits)
    assert all(torch.equal(base_state[k], v) for k, v in loaded.model.state_dict().items())


def test_refuses_other_base_and_broken_files(tiny_model, other_tiny_model, two_patches, tmp_path):
    other = zolite.load_model(other_tiny_model)
    patches = PatchSet(other.model)
    with pytest.raises(ZoliteError, match="tuned from another base"):
        patches.attach("a", two_patches["a"])
    blob = two_patches["a"].read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(blob[: len(blob) // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a patch at all")
    loaded = zolite.load_model(tiny_model)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    patches = PatchSet(loaded.model)
    for bad in (truncated, garbage):
        with pytest.raises(ZoliteError, match="not a readable safetensors patch"):
            patches.attach("bad", bad)
    assert patches.names() == [] and all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())
    with pytest.raises(ZoliteError, match="unknown patch 'zzz'"):
        patches.swap("zzz")


def test_trajectory_replays_the_dense_patch_bit_for_bit(tiny_model, two_patches, tmp_path):
    dense = load_patch(two_patches["a"])
    trajectory = load_patch(trajectory_path(two_patches["a"]))
    assert trajectory.metadata["zolite.kind"] == "trajectory" and trajectory.metadata["zolite.trajectory_steps"] == "6"
    assert trajectory_path(two_patches["a"]).stat().st_size < two_patches["a"].stat().st_size / 10
    loaded = zolite.load_model(tiny_model)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    replayed = replay(loaded.model, trajectory)
    assert set(replayed.tensors) == set(dense.tensors)
    assert all(torch.equal(replayed.tensors[k], dense.tensors[k]) for k in dense.tensors)
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())   # base restored
    out = tmp_path / "replayed.safetensors"
    result = run_cli("patch", "convert", trajectory_path(two_patches["a"]), "--out", out, "--model", tiny_model)
    assert result.exit_code == 0 and "bit-identical" in result.output, result.output
    assert all(torch.equal(load_patch(out).tensors[k], dense.tensors[k]) for k in dense.tensors)
    info = run_cli("patch", "info", trajectory_path(two_patches["a"]), "--json")
    assert json.loads(info.output)["kind"] == "trajectory"
    assert_user_error(run_cli("patch", "convert", two_patches["a"], "--out", tmp_path / "x.safetensors"),
                      "already dense")
    half = zolite.load_model(tiny_model, dtype="float16")   # other arithmetic: refused, not silently different
    with pytest.raises(ZoliteError, match="trained on cpu/float32.*this is cpu/float16"):
        replay(half.model, trajectory)
    # another model of the same device type and dtype (say an H100 run on an H200): replayed, the fingerprint decides
    from zolite.patch import Patch

    elsewhere = {**trajectory.metadata, "zolite.trained_on": "cpu/another CPU/float32"}
    replayed = replay(loaded.model, Patch(trajectory.tensors, elsewhere, trajectory.path))
    assert all(torch.equal(replayed.tensors[k], dense.tensors[k]) for k in dense.tensors)
    other_z = {**elsewhere, "zolite.dense_sha256": "0" * 64}
    with pytest.raises(ZoliteError, match="did not reproduce its dense patch.*replayed on cpu/float32"):
        replay(loaded.model, Patch(trajectory.tensors, other_z, trajectory.path))
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())   # base restored after it too


def test_export_is_a_plain_checkpoint(tiny_model, two_patches, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = run_cli("export", "--model", tiny_model, "--patch", two_patches["b"], "--out", tmp_path / "merged",
                     "--dtype", "float32")
    assert result.exit_code == 0, result.output
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    patched = zolite.load_model(tiny_model)
    zolite.apply_patch(patched.model, two_patches["b"])
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert torch.equal(_logits(merged, tok), _logits(patched.model, patched.tokenizer))
    assert_user_error(run_cli("export", "--model", tiny_model, "--patch", two_patches["b"], "--out",
                              tmp_path / "merged"), "already exists", "--force")
    (tmp_path / "a-file").write_text("mine")   # an existing file is refused, even with --force, and kept
    assert_user_error(run_cli("export", "--model", tiny_model, "--patch", two_patches["b"], "--out",
                              tmp_path / "a-file", "--force"), "is a file", "choose another --out")
    assert (tmp_path / "a-file").read_text() == "mine"


def test_routed_apply(tiny_model, two_patches, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps(r) for r in [
        {"patch": "a", "sentence": "a great film"},
        {"patch": "b", "passage": "Water is wet.", "question": "is water wet"},
        {"patch": "a", "sentence": "dull and long"}]) + "\n")
    result = run_cli("apply", f"a={two_patches['a']}", f"b={two_patches['b']}", "--model", tiny_model, "--input", rows)
    assert result.exit_code == 0, result.output
    out = [json.loads(line) for line in result.output.strip().splitlines()]
    assert [(o["line"], o["patch"]) for o in out] == [(1, "a"), (2, "b"), (3, "a")]
    assert out[0]["prediction"] in ("terrible", "great") and out[1]["prediction"] in ("Yes", "No")
    rows.write_text(json.dumps({"patch": "c", "sentence": "x"}) + "\n")
    assert_user_error(run_cli("apply", f"a={two_patches['a']}", f"b={two_patches['b']}", "--model", tiny_model,
                              "--input", rows), "line 1", "patch='c'")


def _post(url, body, raw=None):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url + "/v1/completions", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_server_answers_each_request_with_its_own_patch(tiny_model, two_patches):
    from zolite.predict import complete
    from zolite.serve import PatchServer

    loaded, patches = load_with_patches(tiny_model, {k: str(v) for k, v in two_patches.items()})
    prompts = ["the film was", "is water wet", "a great", "dull and"]
    expected = {}
    for name in ("a", "b", None):
        patches.swap(name)
        for prompt in prompts:
            expected[(name, prompt)] = complete(loaded.model, loaded.tokenizer, prompt, max_new_tokens=5)
    assert expected[("a", prompts[0])] != expected[("b", prompts[0])] or expected[("a", prompts[1])] != expected[("b", prompts[1])]
    assert {reason for _, reason in expected.values()} <= {"stop", "length"}
    patches.reset()
    server = PatchServer(loaded, patches, port=0, timeout=30)
    server.start()
    url = "http://%s:%d" % server.address
    try:
        jobs = [(name, prompt) for name in ("a", "b", None) for prompt in prompts] * 2
        answers = {}

        def ask(i, name, prompt):
            answers[i] = _post(url, {"prompt": prompt, "max_tokens": 5, "patch": name, "temperature": 0})

        threads = [threading.Thread(target=ask, args=(i, *job)) for i, job in enumerate(jobs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, (name, prompt) in enumerate(jobs):
            status, body = answers[i]
            assert status == 200 and body["patch"] == name
            choice = body["choices"][0]
            assert (choice["text"], choice["finish_reason"]) == expected[(name, prompt)], (name, prompt)
        assert server.swaps < len(jobs)   # grouped by patch, not one swap per request
        assert _post(url, {"prompt": "x", "patch": "nope"})[0] == 404
        assert _post(url, None, raw=b"{not json")[0] == 400
        assert _post(url, {"prompt": 3})[0] == 400
        assert _post(url, {"prompt": "x", "max_tokens": 0})[0] == 400
        assert _post(url, {"prompt": ""})[0] == 400 and _post(url, {"prompt": "x", "max_tokens": True})[0] == 400
        assert _post(url, {"prompt": "x", "patch": ["a"]})[0] == 400   # a list is not a name: 400, not 404
        with urllib.request.urlopen(url + "/health?verbose=1", timeout=10) as r:   # a query string is ignored
            health = json.loads(r.read())
        assert health["status"] == "ok" and sorted(health["patches"]) == ["a", "b"]
        with pytest.raises(ZoliteError, match="cannot listen on 127.0.0.1:%d" % server.address[1]):
            PatchServer(loaded, patches, port=server.address[1])
    finally:
        server.stop()


def test_failed_swap_leaves_the_base_active(tiny_model, two_patches, tmp_path):
    import shutil

    loaded = zolite.load_model(tiny_model)
    base_logits = _logits(loaded.model, loaded.tokenizer)
    patches = PatchSet(loaded.model)
    patches.attach("a", two_patches["a"], "pinned")
    disk_copy = tmp_path / "b.safetensors"
    shutil.copy(two_patches["b"], disk_copy)
    patches.attach("b", disk_copy, "disk")
    patches.swap("a")
    time.sleep(0.01)
    disk_copy.write_bytes(b"replaced by something else")   # a file changed since attach is refused, not read
    with pytest.raises(ZoliteError, match="changed since it was attached"):
        patches.swap("b")
    assert patches.active is None and torch.equal(_logits(loaded.model, loaded.tokenizer), base_logits)
    shutil.copy(two_patches["a"], disk_copy)   # even a valid patch: it was not the one checked against the base
    with pytest.raises(ZoliteError, match="changed since it was attached"):
        patches.swap("b")
    assert patches.active is None
    patches.swap("a")   # and the good patch still works
    other = zolite.load_model(tiny_model)
    zolite.apply_patch(other.model, two_patches["a"])
    assert torch.equal(_logits(loaded.model, loaded.tokenizer), _logits(other.model, other.tokenizer))
    # a patch naming a tensor this model does not have: one clear line, nothing attached
    from zolite.patch import save_patch
    alien = load_patch(two_patches["a"])
    tensors = {k.replace("layers.1.", "layers.9."): v for k, v in alien.tensors.items()}
    save_patch(tmp_path / "alien.safetensors", tensors, {k: v for k, v in alien.metadata.items()
                                                          if k not in ("zolite.format", "zolite.version")})
    with pytest.raises(ZoliteError, match="model.layers.9.*does not have"):
        patches.attach("alien", tmp_path / "alien.safetensors")
    assert patches.names() == ["a", "b"]
    # metadata edited by hand: missing names and a broken layer list are one line each
    for drop, change, message in [("zolite.model", {}, "missing zolite.model"),
                                  ("zolite.task", {}, "missing zolite.task"),
                                  (None, {"zolite.layer": "x"}, "broken zolite.layer")]:
        metadata = {k: v for k, v in alien.metadata.items() if k not in ("zolite.format", "zolite.version", drop)}
        save_patch(tmp_path / "edited.safetensors", alien.tensors, {**metadata, **change}, force=True)
        with pytest.raises(ZoliteError, match=message):
            load_patch(tmp_path / "edited.safetensors")


def test_completion_says_why_it_stopped(tiny_model):
    """"length" when max_new_tokens cut it off, "stop" when the model ended it (its end-of-sequence token)."""
    from zolite.predict import complete

    loaded = zolite.load_model(tiny_model)
    eos = loaded.tokenizer.eos_token_id
    loaded.model.generation_config.eos_token_id = eos

    def always(token):   # the head's logits made to pick `token` every time
        def hook(module, args, logits):
            forced = torch.zeros_like(logits)
            forced[..., token] = 1.0
            return forced
        return loaded.model.lm_head.register_forward_hook(hook)

    other = (eos + 1) % loaded.model.config.vocab_size
    with always(other):
        text, reason = complete(loaded.model, loaded.tokenizer, "the film was", max_new_tokens=3)
    assert reason == "length" and text == loaded.tokenizer.decode([other] * 3, skip_special_tokens=True)
    with always(eos):
        assert complete(loaded.model, loaded.tokenizer, "the film was", max_new_tokens=3) == ("", "stop")
    loaded.model.generation_config.eos_token_id = [eos, other]   # several end ids (e.g. Llama 3's): any ends it
    with always(other):
        assert complete(loaded.model, loaded.tokenizer, "the film was", max_new_tokens=1)[1] == "stop"


def test_apply_input_checks_every_row_before_printing(tiny_model, two_patches, tmp_path):
    """A bad row past the first 256-row chunk: one line, exit 2, and no prediction printed before it."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join('{"sentence": "fine film %d"}\n' % i for i in range(300)) + '{"text": "wrong field"}\n')
    result = run_cli("apply", two_patches["a"], "--model", tiny_model, "--input", rows)
    assert_user_error(result, "line 301")
    assert '"prediction"' not in result.output
