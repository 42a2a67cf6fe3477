"""Find a model from a profile name, a folder, a .gguf file or a hub id, and load it with its tokenizer."""
from __future__ import annotations

import gc
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ZoliteError
from .inputs import check_model_folder
from .io import file_sha256, file_stamp
from .offload import stream_from_cpu
from .parts import joined_file, parse_parts
from .profile import Profile, find_profile, get_profile, profile_names

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def cache_dir() -> Path:
    """zolite's cache: $ZOLITE_CACHE, else $XDG_CACHE_HOME/zolite, else ~/.cache/zolite."""
    if os.environ.get("ZOLITE_CACHE"):
        return Path(os.environ["ZOLITE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "zolite"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str                 # what the user asked for: a profile name, path or hub id
    path: Path                # the Hugging Face folder the weights came from
    profile: Profile | None
    device: torch.device
    dtype: torch.dtype
    mode: str = "fp16"        # fp16 (unquantized, in `dtype`), int8 / nf4 (bitsandbytes) or offload


def resolve_model(spec: str) -> tuple[Path, Profile | None]:
    """The local Hugging Face folder for `spec`, converting or downloading once if needed."""
    profile = find_profile(spec)
    if profile is not None:
        kind, _, where = profile.source.partition(":")
        if kind == "package":
            return convert_gguf_cached(_package_file(where, profile)), profile
        if kind == "parts":
            parts = parse_parts(profile.parts, profile.name)
            return convert_gguf_cached(joined_file(parts, cache_dir() / "sources")), profile
        return hub_folder(where), profile
    path = Path(spec).expanduser()
    if path.is_dir():
        return check_model_folder(path, spec), None
    if path.is_file():
        if path.suffix != ".gguf":
            raise ZoliteError(f"{spec} is a file but not a .gguf; pass a .gguf file or a Hugging Face model folder")
        return convert_gguf_cached(path), None
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return hub_folder(spec), None
    raise ZoliteError(f"unknown model '{spec}': not a profile ({', '.join(profile_names())}), "
                      "a local folder, a .gguf file or a hub id (org/name)")


def gguf_source(spec: str) -> Path | None:
    """The .gguf file the model `spec` is read from (a profile's package file, a .gguf path, a folder zolite converted
    from one), or None when it does not come from a GGUF (a Hugging Face folder or hub id)."""
    profile = find_profile(spec)
    path = Path(spec).expanduser()
    if profile is not None and profile.source.startswith("package:"):
        return _package_file(profile.source.partition(":")[2], profile)
    if profile is None and path.is_file() and path.suffix == ".gguf":
        return path.resolve()
    folder = path if profile is None and path.is_dir() else resolve_model(spec)[0]   # any other source kind that
    record = source_record(folder)                                                    # converts a GGUF records it
    return Path(record["gguf"]) if record else None


def source_record(folder: Path) -> dict | None:
    """{"gguf": path, "sha256": ..., "stamp": ...} of a folder convert_gguf_cached made, else None."""
    try:
        return json.loads((Path(folder) / "zolite_source.json").read_text())
    except (OSError, ValueError):
        return None


def _package_file(where: str, profile: Profile) -> Path:
    module, _, filename = where.partition("/")
    spec = importlib.util.find_spec(module)  # find, don't import: the package's own imports are not needed
    if spec is None or spec.origin is None:
        raise ZoliteError(f"model '{profile.name}' needs the package {module}: {profile.install_hint}")
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise ZoliteError(f"{path} is missing from the installed {module}; reinstall it: {profile.install_hint}")
    return path


def hub_folder(repo_id: str) -> Path:
    """A snapshot of a hub repository: from the HF cache, downloading it first when online."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja", "*.txt"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except (GatedRepoError, RepositoryNotFoundError) as e:
        raise ZoliteError(f"hub model {repo_id} cannot be read ({type(e).__name__}): accept its license on the "
                          "hub and run `hf auth login`, or pass a local folder") from None
    except Exception:  # offline, DNS, proxy...: fall back to what the cache has
        try:
            return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
        except Exception:
            raise ZoliteError(f"hub model {repo_id} is not in the Hugging Face cache and the hub cannot be "
                              "reached; download it where there is network, or pass a local folder") from None


def convert_gguf_cached(gguf: Path) -> Path:
    """Convert a .gguf file once into a Hugging Face folder (fp16 safetensors) under the cache; reuse it after, as
    long as it was made from this file (its size and modification time, else its SHA-256, match the record)."""
    out = cache_dir() / "models" / f"{gguf.stem}-{gguf.stat().st_size}"
    if (out / "config.json").is_file():
        if _made_from(out, gguf):
            return out
        out = out.with_name(f"{out.name}-{file_sha256(gguf)[:12]}")   # another file of the same name and size
        if (out / "config.json").is_file():
            return out
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"zolite: converting {gguf.name} once into {out} (about half a minute)", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _convert_gguf(gguf, tmp)
        try:
            tmp.rename(out)
        except OSError:  # another process converted it meanwhile
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _convert_gguf(gguf: Path, out: Path) -> None:
    # transformers de-quantizes GGUF tensors on load (~20 s) but refuses to save such a model, so the
    # weights are copied into a fresh model of the same class built from the config minus its quantization.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ZoliteError("reading .gguf files needs the gguf package: pip install gguf")
    try:
        src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (ValueError, OSError, KeyError) as e:   # not a GGUF file, truncated, or an architecture it cannot read
        raise ZoliteError(f"{gguf} could not be read as a GGUF model ({str(e).splitlines()[0][:200]}); "
                          "check the file (a complete download?)") from None
    cfg = src.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version"):
        cfg.pop(key, None)
    cfg["dtype"] = "float16"
    dst = type(src)(type(src.config)(**cfg))
    missing, unexpected = dst.load_state_dict(src.state_dict(), strict=False)
    tied = {"lm_head.weight"} if dst.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ZoliteError(f"{gguf}: weights do not match the architecture (missing {missing}, unexpected {unexpected})")
    dst.tie_weights()
    dst.to(torch.float16).save_pretrained(out)
    tok.save_pretrained(out)
    _record_source(out, gguf, file_sha256(gguf))


def _record_source(out: Path, gguf: Path, sha256: str) -> None:
    (out / "zolite_source.json").write_text(json.dumps({"gguf": str(gguf), "sha256": sha256,
                                                        "stamp": file_stamp(gguf)}) + "\n")


def _made_from(out: Path, gguf: Path) -> bool:
    """Whether the converted folder `out` came from `gguf`: the recorded stamp (size, modification time, inode), else
    (a copy, a touched file, an older record) the recorded SHA-256, which then refreshes the record."""
    try:
        source = json.loads((out / "zolite_source.json").read_text())
    except (OSError, ValueError):
        return False
    if source.get("stamp") == file_stamp(gguf):
        return True
    if source.get("sha256") != file_sha256(gguf):
        return False
    _record_source(out, gguf, source["sha256"])
    return True


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """--device as given, checked against this machine (cpu, cuda, cuda:N), else the GPU if there is one, else the
    CPU."""
    if device is None:
        return default_device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ZoliteError(f"unknown device '{device}'; use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ZoliteError(f"--device {device}: no CUDA GPU is visible here; drop --device to run on the CPU")
        if resolved.index is not None and resolved.index >= count:
            raise ZoliteError(f"--device {device}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")
    elif resolved.type != "cpu":
        raise ZoliteError(f"--device {device} is not supported; use cpu, cuda or cuda:N")
    return resolved


def choose_dtype(dtype: str | None, device: torch.device, profile: Profile | None) -> torch.dtype:
    """fp32 on the CPU (fp16 matmuls are slow there); on a GPU the profile's choice, fp16 without one."""
    if dtype is None:
        dtype = "float32" if device.type == "cpu" else (profile.defaults.get("dtype_cuda") if profile else None) or "float16"
    if dtype not in DTYPES:
        raise ZoliteError(f"unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


MODES = ("fp16", "int8", "nf4", "offload")
QUANT_MODES = ("int8", "nf4")
INT8_THRESHOLD = 6.0   # LLM.int8's outlier threshold (bitsandbytes' default); 0.0 turns the fp16 outlier path off


def choose_mode(mode: str | None, device: torch.device, profile: Profile | None) -> str:
    """nf4 on a GPU unless the profile says otherwise; unquantized ('fp16': every weight in --dtype) on the CPU.

    Not int8: on an H100 a Llama-2-7B-shaped ZO step took 402 ms in int8 against 260 ms in nf4, at 8.1 against
    5.3 GiB (bench/results/memory_modes), and LLM.int8 rounds every layer's inputs to 8 bits, which swamps the
    +-eps loss difference at MeZO's eps (bench/results/quant_noise): SmolLM2 tuned in int8 lost 10 points on SST-2
    where nf4 matched the unquantized run (bench/results/modes_smollm2)."""
    if mode is None:
        mode = "fp16" if device.type == "cpu" else (profile.defaults.get("mode_cuda") if profile else None) or "nf4"
    if mode not in MODES:
        raise ZoliteError(f"unknown mode '{mode}'; choose one of {', '.join(MODES)}")
    if mode == "offload" and device.type != "cuda":
        raise ZoliteError("--mode offload streams CPU-held layers to a GPU, and there is none here; "
                          "use --mode fp16 (or int8) on the CPU")
    return mode


def quantization_config(mode: str, dtype: torch.dtype, keep: list[str] = (), int8_threshold: float = INT8_THRESHOLD):
    """bitsandbytes through transformers: LLM.int8 (outliers kept in fp16) or 4-bit NF4 computing in `dtype`.

    keep: full names of Linear modules left unquantized (the tuned layer's). Full names, not a layer prefix: older
    transformers match skip names as substrings ('model.layers.1' also skips layers 10-19)."""
    if mode not in QUANT_MODES:
        raise ZoliteError(f"unknown mode '{mode}'; choose one of {', '.join(QUANT_MODES)} (or leave it out)")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ZoliteError(f"--mode {mode} needs bitsandbytes: pip install 'zolite[quant]'")
    from transformers import BitsAndBytesConfig

    skip = ["lm_head", *keep]   # an explicit list replaces the default, which skips lm_head
    if mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=float(int8_threshold),
                                  llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                              llm_int8_skip_modules=skip)


def model_skeleton(path: Path):
    """The model built on the meta device (no memory): module names and parameter shapes before loading."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


# the layers come from a patch (or a scan) here, not from the user's --layer
PATCH_HINT = "; is the patch for another model?"


def linear_names(skeleton, layers: list[int], params: str | dict[int, str | None] | None = None) -> list[str]:
    """Full names of the Linear (and Conv1D) modules inside the given decoder layers; with `params` (--params: parts of
    tensor names), only those whose weight it selects; a dict gives each layer its own (several patches on one base)."""
    from .layers import check_layer_indices, decoder_layers, is_weight_matrix, parse_params

    prefix, decoder = decoder_layers(skeleton)
    check_layer_indices(layers, len(decoder), PATCH_HINT)
    wanted = {i: parse_params(params.get(i) if isinstance(params, dict) else params) for i in layers}
    return [f"{prefix}.{i}.{name}" for i in layers for name, m in decoder[i].named_modules()
            if is_weight_matrix(m) and (not wanted[i] or any(w in f"{name}.weight" for w in wanted[i]))]


def quantizes_nothing(skeleton, layers: list[int], params: str | None = None) -> bool:
    """Whether keeping the Linears that tuning these layers' `params` changes unquantized leaves no decoder Linear
    to quantize: every layer's weights tuned, as in full-model MeZO."""
    from .layers import decoder_layers

    every = range(len(decoder_layers(skeleton)[1]))
    return len(linear_names(skeleton, layers, params)) == len(linear_names(skeleton, list(every)))


def check_cpu_memory(skeleton, dtype: torch.dtype) -> None:
    """Offload holds the frozen weights in CPU memory: refuse up front when they cannot fit."""
    import psutil

    need = sum(p.numel() for p in skeleton.parameters()) * torch.finfo(dtype).bits // 8
    free = psutil.virtual_memory().available
    if need > free:
        raise ZoliteError(f"--mode offload keeps the weights in CPU memory: {need / 2**30:.1f} GiB needed, "
                          f"{free / 2**30:.1f} GiB available; use --mode nf4 or int8, or free memory")


def load_model(spec: str, *, device: str | torch.device | None = None, dtype: str | None = None,
               mode: str | None = None, keep_layers: list[int] = (),
               keep_params: str | dict[int, str | None] | None = None,
               int8_threshold: float = INT8_THRESHOLD) -> LoadedModel:
    """Load `spec` (profile, folder, .gguf or hub id) frozen, in eval mode, for inference-only use.

    mode: fp16 (no quantization: every weight in `dtype`), int8 / nf4 (bitsandbytes; norms, biases, embeddings,
    lm_head and the Linears of `keep_layers` stay in `dtype`; with `keep_params`, the --params a run tunes or a
    patch was tuned with, only the Linears whose weight it selects; a dict: each layer's own), offload (weights in
    CPU memory, streamed to the GPU by zolite.offload; `keep_layers` stay on the GPU). None: the profile's / nf4 on a GPU, fp16 on the
    CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, profile = resolve_model(spec)
    device = resolve_device(device)
    torch_dtype = choose_dtype(dtype, device, profile)
    mode = choose_mode(mode, device, profile)
    extra = {}
    if mode != "fp16":   # the layers kept as they are (unquantized / on the GPU), checked on a weightless skeleton
        from .layers import check_layer_indices, decoder_layers

        skeleton = model_skeleton(path)
        check_layer_indices(list(keep_layers), len(decoder_layers(skeleton)[1]), PATCH_HINT)
    if mode in QUANT_MODES:
        # bitsandbytes logs a warning on every int8 matmul of a non-fp16 input (fp32 on the CPU): expected, and noisy
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        keep = linear_names(skeleton, list(keep_layers), keep_params) if keep_layers else []
        extra = {"quantization_config": quantization_config(mode, torch_dtype, keep, int8_threshold),
                 "device_map": {"": device}}
    elif mode == "offload":   # loaded into CPU memory; zolite.offload streams it (see there why not accelerate)
        gc.collect()   # an offloaded model dropped just before (a scan's) frees its pinned weights first
        check_cpu_memory(skeleton, torch_dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **extra)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ZoliteError(f"cannot load the model in {path}: {str(e).splitlines()[0]}") from None
    if tokenizer.pad_token is None:   # batched generation pads (left); some tokenizers ship without a pad token
        tokenizer.pad_token = tokenizer.eos_token
    if mode == "fp16":
        model.to(device)
    elif mode == "offload":
        stream_from_cpu(model, device, list(keep_layers))
    model.eval().requires_grad_(False)
    return LoadedModel(model, tokenizer, spec, path, profile, device, torch_dtype, mode)


def known_models() -> list[Profile]:
    return [get_profile(n) for n in profile_names()]
