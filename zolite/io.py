"""Files on disk: written so that a crash never leaves half a file and nothing the user has is overwritten by accident;
the check that a run folder holds the run asked for."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import ZoliteError


def refuse_clobber(path: str | os.PathLike, force: bool) -> None:
    check_writable(path)
    if Path(path).is_dir():
        raise ZoliteError(f"{path} is a folder; give a file path (e.g. {Path(path) / 'patch.safetensors'})")
    if Path(path).exists() and not force:
        raise ZoliteError(f"{path} already exists; pass --force to overwrite it or choose another path")


def refuse_used_folder(path: str | os.PathLike, force: bool, option: str = "--out") -> None:
    """A folder zolite writes into: refused when it is a file, or when it holds files and force is off."""
    check_writable(path, option)
    if Path(path).exists() and not Path(path).is_dir():
        raise ZoliteError(f"{path} is a file, and {option} names a folder to write into; choose another {option}")
    if Path(path).exists() and any(Path(path).iterdir()) and not force:
        raise ZoliteError(f"{path} already exists; pass --force to overwrite it or choose another {option}")


def check_writable(path: str | os.PathLike, option: str | None = None) -> None:
    """A path zolite will write (a file or a folder): refused when a file stands where one of its folders would be."""
    for parent in Path(path).parents:
        if parent.exists():
            if not parent.is_dir():
                where = f"{option} {path}" if option else str(path)
                raise ZoliteError(f"{where}: {parent} is a file, not a folder; choose another "
                                  f"{option or 'path'}")
            break


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp"):
    """Yield a temporary path beside `path` (ending in `suffix`); on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())   # mkstemp makes it 0600; the file gets a normal file's mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def file_stamp(path: str | os.PathLike) -> list[int]:
    """Size, modification time and inode: a file replaced or rewritten since it was stamped differs."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def umask() -> int:
    """The process's umask (os.umask can only be read by setting it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def config_mismatch(saved: dict, wanted: dict) -> tuple | None:
    """(option, saved value, wanted value) of the first option a run folder's config.json holds otherwise, or None.
    A layer of None / "auto" matches any layer (the profile's pick), and "1" matches 1."""
    for key, value in wanted.items():
        if key == "layer" and (value in (None, "auto") or str(value) == str(saved.get(key))):
            continue
        if saved.get(key) != value:
            return key, saved.get(key), value
    return None
