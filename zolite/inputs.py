"""Files a user gives, checked before a library reads them: a missing or malformed one is one ZoliteError naming the
file and the fix (the CLI prints it on one line and exits 2), never a traceback from deep inside transformers.

- a model folder (`--model DIR`): its config.json, its tokenizer's JSON files and every safetensors header;
- the JSON files of a run folder (`--resume RUN_DIR`, ablate's --out): read_json.
The other inputs are checked by their own readers as they read: a .gguf (loading.convert_gguf_cached), a data file
(data.iter_rows), a patch (patch.load_patch), a task or plan TOML (tasks.custom, ablate.load_plan); and the paths
zolite writes by io.refuse_clobber / io.refuse_used_folder.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import ZoliteError

# the tokenizer's files that are JSON (a tokenizer.model is sentencepiece's binary: its loader checks it)
TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                  "vocab.json")
MODEL_FIX = "fix the file, or download or convert the model again"


def read_json(path: str | os.PathLike, fix: str):
    """The JSON value in `path`; a file that cannot be read or is not valid JSON is one error naming where, and `fix`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ZoliteError(f"cannot read {path} ({e}); {fix}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ZoliteError(f"{path} is not valid JSON (line {e.lineno}: {e.msg}); {fix}") from None


def check_model_folder(path: Path, spec: str) -> Path:
    """A Hugging Face model folder whose config, tokenizer JSON files and safetensors headers all read."""
    from safetensors import SafetensorError, safe_open

    config_file = path / "config.json"
    if not config_file.is_file():
        raise ZoliteError(f"{spec} is a folder without config.json; pass a Hugging Face model folder")
    config = read_json(config_file, MODEL_FIX)
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ZoliteError(f"{config_file} names no model_type (a transformers config has one, e.g. \"llama\"); "
                          f"{MODEL_FIX}")
    for name in (*TOKENIZER_JSON, *sorted(p.name for p in path.glob("*.safetensors.index.json"))):
        if (path / name).is_file():
            read_json(path / name, MODEL_FIX)
    if (path / "tokenizer.json").is_file():   # valid JSON, but a tokenizer? (transformers fails with a KeyError)
        from tokenizers import Tokenizer

        try:
            Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:   # the tokenizers library raises a bare Exception
            raise ZoliteError(f"{path / 'tokenizer.json'} is not a tokenizer ({str(e).splitlines()[0][:200]}); "
                              f"{MODEL_FIX}") from None
    for weights in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(weights, framework="pt"):   # reads the header only: names, shapes, offsets vs file size
                pass
        except (SafetensorError, OSError) as e:
            raise ZoliteError(f"{weights} is not a readable safetensors file ({str(e).splitlines()[0]}); "
                              f"{MODEL_FIX}") from None
    return path
