"""`zolite scan`: a planted outlier is found at its layer; the sensitivity probe leaves the weights bit-exact;
`tune --layer auto` uses the cached scan; bad input is refused."""
from __future__ import annotations

import json

import pytest
import torch

import zolite
from conftest import run_cli
from zolite.scan import scan

PLANTED_LAYER, CHANNEL = 2, 5


def plant_outlier(model, layer=PLANTED_LAYER, channel=CHANNEL, scale=1e5):
    """Scale one output channel of a layer's MLP: the residual stream after that layer gets a massive value
    in that channel (and keeps it in the later layers, as real massive activations do)."""
    with torch.no_grad():
        model.model.layers[layer].mlp.down_proj.weight[channel] *= scale


@pytest.fixture(scope="module")
def planted_model(tiny_model, tmp_path_factory):
    loaded = zolite.load_model(tiny_model)
    plant_outlier(loaded.model)
    out = tmp_path_factory.mktemp("planted")
    loaded.model.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)
    return str(out)


def test_planted_outlier_is_found_at_its_layer(planted_model, tmp_path):
    result = scan(planted_model, prompts=8, seeds=0, out=str(tmp_path / "scan"))
    assert result["dominant_layer"] == PLANTED_LAYER and result["mode"] == "fp16"   # the mode used, not None
    layers = result["layers"]
    assert layers[PLANTED_LAYER]["where"]["channel"] == CHANNEL and layers[PLANTED_LAYER]["outlier_share"] == 1.0
    assert all(a["outlier_share"] == 0.0 for a in layers[:PLANTED_LAYER])
    assert {p.name for p in (tmp_path / "scan").iterdir()} == {"report.json", "report.md", "scan.png"}
    assert (tmp_path / "scan" / "scan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 2 **<-** |" in (tmp_path / "scan" / "report.md").read_text()


def test_stricter_rule_moves_or_drops_the_layer(planted_model):
    loose = scan(planted_model, prompts=8, seeds=0, magnitude=1e-3, ratio=1.0)
    assert loose["dominant_layer"] == 0           # every layer crosses a rule that loose
    strict = scan(planted_model, prompts=8, seeds=0, magnitude=1e12)
    assert strict["dominant_layer"] is None


def test_sensitivity_probe_restores_weights_bit_exactly(tiny_model):
    loaded = zolite.load_model(tiny_model)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    result = scan(tiny_model, loaded=loaded, prompts=4, seeds=2, eps=1e-1)
    after = loaded.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    deltas = [a["delta_loss"] for a in result["layers"]]
    assert len(deltas) == 4 and all(d > 0 for d in deltas)
    assert result["sensitivity"]["most_sensitive_layer"] == max(range(4), key=deltas.__getitem__)


def test_tune_auto_uses_the_cached_scan(planted_model, small_data, tmp_path):
    scan(planted_model, prompts=8, seeds=0)
    report = zolite.tune(planted_model, "sst2", data=small_data, run_dir=tmp_path / "run", steps=1, eval_every=0,
                         batch_size=2, progress=False)
    assert report["layers"] == str(PLANTED_LAYER) and report["layer_source"].startswith("scan cached in")


def test_only_the_documented_rule_is_cached(planted_model, small_data, tmp_path):
    """An exploratory rule is reported, not cached: tune --layer auto keeps the documented rule's layer."""
    from zolite.scan import cached_dominant_layer

    loose = scan(planted_model, prompts=8, seeds=0, magnitude=1e-3, ratio=1.0, share=0.0)
    assert loose["dominant_layer"] == 0 and loose["cached"] is False
    assert cached_dominant_layer(loose["identity"])[0] is None
    assert scan(planted_model, prompts=8, seeds=0)["cached"] is True
    assert cached_dominant_layer(loose["identity"])[0] == PLANTED_LAYER


def test_tune_auto_scans_a_model_never_scanned(planted_model, small_data, tmp_path):
    report = zolite.tune(planted_model, "sst2", data=small_data, run_dir=tmp_path / "run", steps=1, eval_every=0,
                         batch_size=2, layer="auto", progress=False)
    assert report["layers"] == str(PLANTED_LAYER) and report["layer_source"].startswith("scanned now")


def test_int8_scan_finds_the_same_layer(planted_model):
    pytest.importorskip("bitsandbytes")
    result = scan(planted_model, prompts=8, seeds=2, mode="int8", device="cpu")
    assert result["dominant_layer"] == PLANTED_LAYER and result["mode"] == "int8"
    assert result["sensitivity"]["seeds"] == 0 and "cannot be perturbed" in result["sensitivity"]["skipped"]


def test_scan_cli_and_bad_input(planted_model, tmp_path):
    out = tmp_path / "s"
    r = run_cli("scan", "--model", planted_model, "--prompts", "4", "--seeds", "1", "--out", out, "--json")
    assert r.exit_code == 0 and json.loads(r.output)["dominant_layer"] == PLANTED_LAYER
    r = run_cli("scan", "--model", planted_model, "--prompts", "4", "--out", out)
    assert r.exit_code == 2 and "already exists" in r.output and "--force" in r.output
    r = run_cli("scan", "--model", planted_model, "--prompts", "0")
    assert r.exit_code == 2 and "--prompts must be at least 1" in r.output
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    r = run_cli("scan", "--model", planted_model, "--text", empty)
    assert r.exit_code == 2 and "holds no prompts" in r.output
    r = run_cli("scan", "--model", planted_model, "--share", "2")
    assert r.exit_code == 2 and "--share must be between 0 and 1" in r.output
    assert "Traceback" not in r.output
