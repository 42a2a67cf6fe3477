"""Model resolution: a converted .gguf is reused only for the file it was made from."""
from __future__ import annotations

import shutil

from zolite import loading


def test_a_converted_gguf_is_reused_only_for_its_own_file(tmp_path, monkeypatch):
    conversions = []

    def convert(gguf, out):   # stands in for the ~30 s conversion: what it leaves behind, and its record
        (out / "config.json").write_text("{}")
        loading._record_source(out, gguf, loading.file_sha256(gguf))
        conversions.append(gguf)
    monkeypatch.setattr(loading, "_convert_gguf", convert)
    first = tmp_path / "a" / "model.gguf"
    first.parent.mkdir()
    first.write_bytes(b"A" * 100)
    folder = loading.convert_gguf_cached(first)
    assert loading.convert_gguf_cached(first) == folder and len(conversions) == 1
    copy = tmp_path / "b" / "model.gguf"   # the same bytes elsewhere (another modification time): reused
    copy.parent.mkdir()
    shutil.copy(first, copy)
    assert loading.convert_gguf_cached(copy) == folder and len(conversions) == 1
    other = tmp_path / "c" / "model.gguf"   # same name and size, other bytes: converted into its own folder
    other.parent.mkdir()
    other.write_bytes(b"B" * 100)
    other_folder = loading.convert_gguf_cached(other)
    assert other_folder != folder and len(conversions) == 2
    assert loading.convert_gguf_cached(other) == other_folder and loading.convert_gguf_cached(first) == folder
    assert len(conversions) == 2
