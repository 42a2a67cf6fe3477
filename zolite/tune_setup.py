"""A tune run's set-up: its options (TuneConfig) checked before anything loads, its run folder and patch path claimed,
the profile's defaults filled in, and the model loaded in the mode (and memory plan) that fits, with the tuned
layers chosen first so quantization leaves them alone."""
from __future__ import annotations

import dataclasses
import functools
import gc
import math
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ZoliteError, check_at_least
from .inputs import read_json
from .io import check_writable, config_mismatch, refuse_clobber
from .layers import decoder_layers, format_layers, is_every_layer, is_weight_matrix, parse_layers, parse_params
from .loading import (INT8_THRESHOLD, MODES, QUANT_MODES, choose_dtype, choose_mode, linear_names, load_model,
                      model_skeleton, quantizes_nothing, resolve_device, resolve_model)
from .optim import ESTIMATORS, OPTIMIZERS
from .patch import whole_layers_kept
from .plan import measured_activations, parse_size, plan_memory
from .profile import find_profile
from .scan import choose_layers, folder_identity, scan
from .stepsize import LR_SCHEDULES
from .tasks import get_task
from .trajectory import trajectory_path
from .zo import EPS_SCALES, selected_tensors

OBJECTIVES = ("ce", "lm", "accuracy", "f1")
BUILTIN_DEFAULTS = {"lr": "auto", "eps": 1e-3, "batch_size": 16, "steps": 1000, "eval_every": 100, "max_length": 512}
# eps when the base is quantized (nf4 / int8) and neither the user nor the profile gives one: a quantized base's
# rounding outweighs the +eps/-eps loss difference at MeZO's 1e-3. The projected gradient's correlation with an
# fp32 model's, 1e-3 -> 1e-2: nf4 0.77 -> 0.93 (Qwen2.5-Coder-1.5B, bench/results/real_scale_dev/noise_qwen), int8
# 0.11 -> 0.92 (SmolLM2, bench/results/quant_noise).
QUANTIZED_EPS = 1e-2
_EVERY_LAYER_UNQUANTIZED = ("--layers all tunes every layer's weights, so nothing is left to quantize with --mode "
                            "{mode}; use --mode fp16 or offload, or tune only the norms and biases (--params norm, "
                            "or norm,bias where the model has biases), which leaves every Linear weight quantized")


@dataclass
class TuneConfig:
    """Everything that decides a run's result. None = the model profile's default."""
    model: str = "smollm2-135m"
    task: str = "sst2"
    recipe: bool | None = None        # start from the profile's recipe for this task ([tasks.TASK]; None: where it
                                      # has one); in a run folder's config.json: whether one was applied
    layer: str | None = None          # "12", "3,5" or "all" (0-based); None / "auto" = the dominant layer
                                      # (this model's cached scan, else its profile, else a scan now)
    steps: int | None = None
    lr: float | str | None = None     # a number, or "auto": probed from the model before the run (zolite.stepsize)
    eps: float | None = None
    batch_size: int | None = None
    weight_decay: float = 0.0
    eval_every: int | None = None     # 0 = never (the patch is then the last step's weights)
    seed: int = 0                     # step seeds (z) and batch order
    data_seed: int = 0                # which rows go to train / val / test: fixed, so runs compare on the same rows
    objective: str | None = None      # ce: cross-entropy over candidates; lm: -log-likelihood of the gold answer;
                                      # accuracy / f1: minus the batch's accuracy / F1 (non-differentiable);
                                      # None: ce, or lm for generation tasks
    keep: str = "best"                # best: the weights of the best val step (step 0 included); last
    max_length: int | None = None
    dtype: str | None = None
    device: str | None = None
    mode: str | None = None           # fp16 (unquantized, in dtype) | int8 | nf4 | offload; None: the profile's / nf4
                                      # on a GPU, fp16 on the CPU. The tuned layers are never quantized or offloaded
    int8_threshold: float = INT8_THRESHOLD
    gpu_memory: str | None = None     # a budget ("8GiB"): plan mode and micro-batch to fit it, and cap the allocator
    micro_batch: int | None = None    # examples per forward (None: the whole batch); changes memory, not results
    estimator: str = "spsa"           # spsa (MeZO, n_z z per step) | residual (one-point residual feedback) | fo (backprop)
    n_z: int = 1                      # z per step (spsa): their estimates are averaged
    optimizer: str = "sgd"            # sgd | momentum | adam (AdamW) | sign
    momentum: float = 0.9
    layerwise: bool = False           # per-tensor trust ratio ||W|| / ||update|| (lr becomes a relative step)
    lr_schedule: str = "constant"     # constant | linear | cosine: the lr's decay towards 0 over the steps (ZO with
                                      # sgd / momentum)
    guard: bool = True                # halve the step when the training loss turns up (ZO with sgd / momentum)
                                      # and, in plain MeZO, go back to the lowest loss's weights
    params: str | None = None         # "v_proj,down_proj": only the tuned layers' tensors whose name holds one
    keep_whole_layers: bool = False   # nf4 / int8 with params: every Linear of the tuned layers unquantized, not
                                      # only those whose weight params selects (how zolite ran before 2026-12-06;
                                      # such runs resume so: with_new_options)
    eps_scale: str = "absolute"       # absolute: W + eps z; relative: tensor i gets eps * RMS(base W_i) * z;
                                      # activation: column j of a matrix (weight j of a norm) gets eps * s_j * z
                                      # (zolite.precondition);
                                      # sparse: z only on each tensor's smallest quarter of base weights
    cuda_graphs: bool | None = None   # replay the step's ±eps forward from CUDA graphs (zolite.graphs; GPU, layers
                                      # of small tensors), each batch padded to a multiple of 8 tokens
    tf32: bool | None = None          # fp32 matmuls on a GPU's TF32 tensor cores (inputs rounded to 10 mantissa
                                      # bits, fp32 range and sums): several times faster, not fp32's bits
                                      # (both None: the profile's on a GPU, where measured; else off)
    data: str | None = None
    eval_test: bool = False           # also score the held-out test rows at the end
    template: str | None = None       # custom tasks (task = a .jsonl file): see zolite/tasks/custom.py
    candidates: str | None = None
    label_field: str | None = None
    answer_field: str | None = None

    def task_options(self) -> dict:
        return {k: getattr(self, k) for k in ("template", "candidates", "label_field", "answer_field")}


# options added to TuneConfig after runs were made without them, at what those runs did
ADDED_OPTIONS = {"cuda_graphs": False, "tf32": False, "recipe": False, "lr_schedule": "constant"}
# off unless the profile turns them on, and then only on a GPU with unquantized weights (where they were measured to
# keep the results; under bitsandbytes they are not measured)
GPU_SPEED_OPTIONS = ("cuda_graphs", "tf32")


def speed_option(config: TuneConfig, name: str, defaults: dict, device: torch.device, mode: str) -> bool:
    """cuda_graphs / tf32 as given, else the profile's default where it was measured: a GPU, unquantized weights."""
    given = getattr(config, name)
    if given is not None:
        return given
    return bool(defaults.get(name, False)) and device.type == "cuda" and mode == "fp16"


def with_new_options(saved: dict) -> dict:
    """A run folder's config.json with the options added to zolite since that run started, as that run ran, so it
    still resumes and compares."""
    return {**ADDED_OPTIONS, "keep_whole_layers": whole_layers_kept(saved), **saved}


_FIELDS = {f.name for f in dataclasses.fields(TuneConfig)}   # the option names tune() takes
# what a profile's recipe may not set: which model, task, rows and seeds a run uses, and the machine's share of it
_NOT_IN_RECIPES = {"model", "task", "recipe", "seed", "data_seed", "data", "device", "eval_test", "template",
                   "candidates", "label_field", "answer_field", "gpu_memory", "micro_batch", "keep_whole_layers"}


def task_recipe(model: str, task: str) -> dict:
    """The options model profile `model` gives task `task` ([tasks.TASK] in its .toml: what scored best there); {}
    for a model without a profile or a task without a recipe."""
    return _profile_recipe(find_profile(str(model)), task)


def _profile_recipe(profile, task: str) -> dict:
    """task_recipe from a profile already read (None: no profile)."""
    recipe = dict(profile.tasks.get(task, {})) if profile else {}
    unknown = set(recipe) - (_FIELDS - _NOT_IN_RECIPES)
    if unknown:
        raise ZoliteError(f"profile {profile.name}: [tasks.{task}] sets {', '.join(sorted(unknown))}, which a recipe "
                          "cannot (only how the run learns: layer, params, lr, eps, guard, steps ...)")
    if "layer" in recipe:   # as the command line gives them: layer 27 -> "27", params "v_proj, o_proj" -> "v_proj,o_proj"
        recipe["layer"] = str(recipe["layer"])
    if "params" in recipe:
        recipe["params"] = ",".join(parse_params(recipe["params"]))
    return recipe


def given_options(model: str, task: str, resume, options: dict, say: bool = True) -> dict:
    """tune()'s options that were given (not None), over the task's recipe in a new run (with_recipe; say: print
    why a recipe's lr was dropped)."""
    given = {k: v for k, v in options.items() if v is not None}
    return given if resume is not None else with_recipe(model, task, given, say)


def with_recipe(model: str, task: str, given: dict, say: bool = True) -> dict:
    """The options given over the profile's recipe for the task, and recipe = whether one was applied. recipe=False
    given: none; True: the recipe must exist. say: print why the recipe's lr was dropped, if it was."""
    if given.get("recipe") is False:
        return given
    profile = find_profile(str(model))
    recipe = _profile_recipe(profile, task)
    if given.get("recipe") and not recipe:
        raise ZoliteError(f"{model} has no recipe for {task} (`zolite models` lists each profile's); drop --recipe")
    applied = bool(recipe)
    dominant = profile.dominant_layer if profile else None
    if "lr" in recipe and "lr" not in given and _other_weights(recipe, given, dominant) \
            and auto_lr_supported(TuneConfig(**{k: v for k, v in {**recipe, **given}.items() if k in _FIELDS})):
        chosen_for = recipe_text({k: recipe[k] for k in WEIGHT_OPTIONS if k in recipe}) or "the dominant layer"
        if say:
            print(f"zolite: {model}'s recipe for {task} chose lr {recipe['lr']:g} for {chosen_for}; other weights "
                  "get the probed step (--lr to give one)", file=sys.stderr)
        del recipe["lr"]
    return {**recipe, **given, "recipe": applied}


# the options that choose the tuned weights and the shape of their steps: an lr is chosen for one such choice
WEIGHT_OPTIONS = ("layer", "params", "eps_scale")


def _weight_choice(options: dict, dominant: int | None) -> dict:
    """WEIGHT_OPTIONS as options give them, in one spelling: layers and params sorted, layer "auto" or not given =
    the dominant layer (the profile's; None where it names none), eps_scale None = absolute."""
    layer = options.get("layer")
    if layer is None or str(layer).strip().lower() == "auto":
        layer = None if dominant is None else str(dominant)
    else:
        parts = (part.strip().lower() for part in str(layer).split(","))
        layer = ",".join(sorted(str(int(part)) if part.isdigit() else part for part in parts))   # 01 = 1
    params = ",".join(sorted(parse_params(options["params"]))) if options.get("params") else None
    return {"layer": layer, "params": params, "eps_scale": options.get("eps_scale") or "absolute"}


def _other_weights(recipe: dict, given: dict, dominant: int | None) -> bool:
    """Whether the options given tune other weights (or scale z otherwise) than the recipe's (a recipe without a
    layer was chosen for the profile's dominant one)."""
    ours, theirs = _weight_choice(given, dominant), _weight_choice(recipe, dominant)
    return any(given.get(k) is not None and ours[k] != theirs[k] for k in WEIGHT_OPTIONS)


def auto_lr_supported(config: TuneConfig) -> bool:
    """The probe measures the step of ZO-SGD (momentum: scaled by 1 - beta); Adam, sign and the trust ratio take
    steps of their own size, and backprop has no probe. (objective None: ce or lm, by the task.)"""
    return (config.estimator != "fo" and config.optimizer in ("sgd", "momentum") and not config.layerwise
            and config.objective in (None, "ce", "lm"))


def applied_recipe(config: TuneConfig, num_layers: int) -> dict | None:
    """The options of the task's recipe that the run's (filled) config holds: those not replaced by options given;
    None where no recipe applied."""
    if not config.recipe:
        return None
    def same(key, value):
        if key == "layer":
            return parse_layers(value, num_layers) == parse_layers(config.layer, num_layers)
        return getattr(config, key) == value
    return {k: v for k, v in task_recipe(config.model, config.task).items() if same(k, v)}


def recipe_text(recipe: dict) -> str:
    """A recipe as the command line's options: --layer all --params bias,layernorm --lr 0.001."""
    def option(key, value):
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            return flag if value else "--no-" + flag[2:]
        return f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}"
    return " ".join(option(k, v) for k, v in recipe.items())


def check_options(config: TuneConfig) -> None:
    """Numbers and choices the user gave, checked before anything is loaded (None = the profile's default)."""
    minimum = {"steps": 0, "batch_size": 1, "max_length": 2, "eval_every": 0, "lr": 0.0, "weight_decay": 0.0,
               "micro_batch": 1, "int8_threshold": 0.0}
    if isinstance(config.lr, str):
        if config.lr != "auto":
            raise ZoliteError(f"--lr must be a number or auto, got {config.lr!r}")
        minimum.pop("lr")
    for name, low in minimum.items():
        check_at_least(f"--{name.replace('_', '-')}", getattr(config, name), low)
    if not 0 <= config.momentum < 1:
        raise ZoliteError(f"--momentum must be in [0, 1), got {config.momentum}")
    if config.eps is not None and not (config.eps > 0 and math.isfinite(config.eps)):
        raise ZoliteError(f"--eps must be above 0, got {config.eps}")
    resolve_device(config.device)
    if config.recipe not in (None, True, False):
        raise ZoliteError(f"recipe must be True, False or None (the profile's where it has one), got {config.recipe!r}")
    if config.keep not in ("best", "last"):
        raise ZoliteError(f"--keep must be best or last, got {config.keep!r}")
    if config.micro_batch and config.batch_size and config.batch_size % config.micro_batch:
        raise ZoliteError(f"--micro-batch {config.micro_batch} must divide --batch-size {config.batch_size}")
    if config.lr_schedule not in LR_SCHEDULES:
        raise ZoliteError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {config.lr_schedule!r}")
    if config.lr_schedule != "constant" and (config.estimator == "fo" or config.optimizer not in ("sgd", "momentum")
                                             or config.layerwise):
        raise ZoliteError(f"--lr-schedule {config.lr_schedule} decays the steps of ZO-SGD and momentum; Adam, sign, "
                          "the trust ratio (--layerwise) and backprop size their own: drop --lr-schedule")
    if config.eps_scale not in EPS_SCALES:
        raise ZoliteError(f"--eps-scale must be one of {', '.join(EPS_SCALES)}, got {config.eps_scale!r}")
    if config.estimator not in ESTIMATORS:
        raise ZoliteError(f"unknown estimator '{config.estimator}'; choose one of {', '.join(ESTIMATORS)}")
    if config.optimizer not in OPTIMIZERS:
        raise ZoliteError(f"unknown optimizer '{config.optimizer}'; choose one of {', '.join(OPTIMIZERS)}")
    check_at_least("--n-z", config.n_z, 1)
    if config.estimator == "fo" and config.objective in ("accuracy", "f1"):
        raise ZoliteError(f"--estimator fo needs a differentiable objective (ce or lm), not {config.objective}")
    if config.objective == "f1" and (config.estimator, config.n_z, config.optimizer, config.layerwise) != ("spsa", 1, "sgd", False):
        raise ZoliteError("--objective f1 runs plain MeZO only (spsa, one z, sgd); drop the estimator/optimizer options")
    if config.mode not in (None, *MODES):
        raise ZoliteError(f"unknown mode '{config.mode}'; choose one of {', '.join(MODES)}")
    if config.mode in QUANT_MODES and is_every_layer(config.layer) and not parse_params(config.params):
        raise ZoliteError(_EVERY_LAYER_UNQUANTIZED.format(mode=config.mode))
    if config.eps_scale == "sparse" and config.weight_decay:
        raise ZoliteError("--weight-decay would also shrink the weights --eps-scale sparse leaves untouched; "
                          "drop one of the two")
    if config.gpu_memory is not None:
        parse_size(config.gpu_memory)
    if config.objective not in (None, *OBJECTIVES):
        raise ZoliteError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {config.objective!r}")


def check_world(world_size: int, estimator: str | None, batch_size: int | None) -> None:
    """What a run of several processes needs: ZO (backprop would exchange gradients) and at least a row per process
    in each step's batch (batch_size None: not known yet)."""
    if world_size == 1:
        return
    if estimator == "fo":
        raise ZoliteError("--estimator fo would exchange gradients between the processes; run backprop in one "
                          "process (drop --nproc / torchrun)")
    if batch_size is not None and batch_size < world_size:
        raise ZoliteError(f"{world_size} processes each take a slice of a step's batch, but --batch-size is "
                          f"{batch_size}; raise --batch-size to at least {world_size} or lower --nproc")


def prepare_run(model, task, run_dir, out, force, resume, options):
    """The config, run folder and patch path; checks a resumed folder against the arguments given."""
    unknown = set(options) - _FIELDS
    if unknown:
        cli_names = {"test": "eval_test", "layers": "layer"}   # the CLI's --test / --layers are these in Python
        hints = [f"{k} (use {cli_names[k]}=)" if k in cli_names else k for k in sorted(unknown)]
        raise TypeError(f"tune() got unknown options: {', '.join(hints)}")
    given = given_options(model, task, resume, options)
    if "params" in given:   # one spelling, so a resume given "v_proj, o_proj" matches a run of "v_proj,o_proj"
        given["params"] = ",".join(parse_params(given["params"]))
        if not given["params"]:
            del given["params"]
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "config.json").is_file():
            raise ZoliteError(f"{run_dir} is not a zolite run folder (no config.json); pass the RUN_DIR of an earlier tune")
        saved = read_json(run_dir / "config.json", "pass the RUN_DIR of an earlier tune, or start a new run")
        if not isinstance(saved, dict) or set(saved) - _FIELDS:
            raise ZoliteError(f"{run_dir / 'config.json'} is not the config of a tune run of this zolite version "
                              "(unknown options); start a new run")
        saved = with_new_options(saved)
        given.update({k: v for k, v in (("model", model), ("task", task)) if v is not None})
        mismatch = config_mismatch(saved, given)
        if mismatch:
            key, was, value = mismatch
            raise ZoliteError(f"{run_dir} was started with {key}={was!r}, not {value!r}; "
                              f"drop that option to resume it, or start a new run")
        config = TuneConfig(**saved)
        if out is not None and Path(out).resolve() != (run_dir / "patch.safetensors").resolve():
            _claim_patch_path(out, force)   # a file of the user's, not the run's own patch
        out = Path(out) if out else run_dir / "patch.safetensors"
        return config, run_dir, out
    config = TuneConfig(model=model, task=task, **given)
    check_options(config)
    get_task(task, **config.task_options())  # a bad task fails before anything is loaded or written
    if run_dir is None:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(model).name)
        run_dir = Path("runs") / f"{name}-{task}-L{config.layer if config.layer not in (None, 'auto') else 'dominant'}-s{config.seed}"
    run_dir = Path(run_dir)
    check_writable(run_dir, "--run-dir")
    if run_dir.exists() and not run_dir.is_dir():
        raise ZoliteError(f"--run-dir {run_dir} is a file; a run folder holds the run's files: choose another --run-dir")
    if run_dir.exists() and any(run_dir.iterdir()) and not force:
        raise ZoliteError(f"run folder {run_dir} already exists; resume it with --resume {run_dir}, "
                          "pass --force to start it again, or choose another --run-dir")
    out = Path(out) if out else run_dir / "patch.safetensors"
    _claim_patch_path(out, force)
    # (the folder itself is made when its config.json is written, after the model loaded: a failed load leaves none)
    # --force: the old run's files go (its patch stays until the new one replaces it)
    for stale in ("config.json", "checkpoint.safetensors", "report.json", "report.md", "memory.png"):
        (run_dir / stale).unlink(missing_ok=True)
    return config, run_dir, out


def _claim_patch_path(out, force: bool) -> None:
    """Refuse to overwrite the patch path or its trajectory without force; with force, a stale trajectory goes (it
    must not sit beside the new patch)."""
    refuse_clobber(out, force)
    refuse_clobber(trajectory_path(out), force)
    trajectory_path(out).unlink(missing_ok=True)


def default_eps(mode: str, eps_scale: str) -> float:
    """eps for a model whose profile gives none: QUANTIZED_EPS on a quantized base, unless eps is relative to each
    tensor's RMS (--eps-scale relative: another unit); else MeZO's."""
    if mode in QUANT_MODES and eps_scale != "relative":
        return QUANTIZED_EPS
    return BUILTIN_DEFAULTS["eps"]


def fill_defaults(config: TuneConfig, loaded, indices, num_layers, task, plan=None, world_size: int = 1) -> TuneConfig:
    """The profile's defaults for what was not given, and what the load decided. With several processes the
    micro-batch defaults to a process's slice of the batch (so a one-process run resumed from it evaluates the same
    micro-batches)."""
    defaults = dict(BUILTIN_DEFAULTS, **(loaded.profile.defaults if loaded.profile else {}))
    if config.lr is None and defaults["lr"] != "auto" and not _profile_weights(config, indices, loaded.profile) \
            and auto_lr_supported(config):
        layer = loaded.profile.dominant_layer
        print(f"zolite: profile {loaded.profile.name}'s lr {defaults['lr']:g} was chosen for "
              f"{'one layer' if layer is None else f'layer {layer}'}'s weights (all of them, z unscaled); these get "
              "the probed step (--lr to give one)", file=sys.stderr)
        defaults["lr"] = "auto"
    filled = {k: defaults[k] for k in BUILTIN_DEFAULTS if getattr(config, k) is None}
    if "eps" in filled and "eps" not in (loaded.profile.defaults if loaded.profile else {}):
        filled["eps"] = default_eps(loaded.mode, config.eps_scale)
    filled["layer"] = format_layers(indices, num_layers)
    filled["dtype"] = str(loaded.dtype).removeprefix("torch.")
    filled["device"] = str(loaded.device)
    filled["mode"] = loaded.mode
    filled["micro_batch"] = config.micro_batch or (plan.micro_batch if plan else None) or \
        -(-filled.get("batch_size", config.batch_size) // world_size)
    filled["objective"] = config.objective or ("lm" if task.generative else "ce")
    for name in GPU_SPEED_OPTIONS:
        filled[name] = speed_option(config, name, defaults, loaded.device, loaded.mode)
    config = dataclasses.replace(config, **filled)
    if task.generative and config.objective in ("ce", "accuracy"):
        raise ZoliteError(f"{task.name} is a generation task (no candidates): use --objective lm or f1")
    if not task.generative and config.objective == "f1":
        raise ZoliteError(f"{task.name} is scored by accuracy over candidates: use --objective ce, lm or accuracy")
    return config


def _profile_weights(config: TuneConfig, indices: list[int], profile) -> bool:
    """Whether the run tunes the weights a profile's lr was chosen for: its dominant layer, whole, z unscaled.
    SmolLM2's 3e-4, chosen for layer 11, learned and then diverged on every layer's norms, where the probed step
    scored best (docs/evidence.md, eighth part); all of its layers want ~10x less."""
    one_layer = len(indices) == 1 if profile.dominant_layer is None else indices == [profile.dominant_layer]
    return one_layer and config.params is None and config.eps_scale == "absolute"


def load_for_tuning(config: TuneConfig, world_size: int = 1):
    """The model in the run's mode with the tuned layers kept unquantized and on the GPU, the layers, where that
    choice came from, and the memory plan when a budget was given (for one process's slice of the batch). Layers are
    chosen before loading: quantized modes must know which layer to leave alone."""
    path, profile = resolve_model(config.model)
    device = resolve_device(config.device)
    skeleton = model_skeleton(path)
    num_layers = len(decoder_layers(skeleton)[1])
    # read from the model's files only when needed (a cached scan, a memory plan): it hashes the embedding
    identity = functools.cache(lambda: folder_identity(path, skeleton))
    indices, source = choose_layers(config.layer, num_layers, identity, profile,
                                    lambda: scan(config.model, seeds=0, device=device, dtype=config.dtype,
                                                 mode=config.mode))
    selected_tensors(skeleton, indices, config.params)   # a bad --params fails before the weights load
    if config.mode in QUANT_MODES and quantizes_nothing(skeleton, indices, unquantized_params(config)):
        raise ZoliteError(_EVERY_LAYER_UNQUANTIZED.format(mode=config.mode))   # e.g. every layer named
    mode, plan = plan_for_device(config, device, skeleton, indices, identity, profile, world_size)
    mode = mode or _default_mode(config, device, profile, skeleton, indices)
    _check_backprop_on_cpu_nf4(config, mode, device, skeleton, indices)
    # the Linears whose weights are tuned stay unquantized; biases and norms are never quantized
    loaded = load_model(config.model, device=device, dtype=config.dtype, mode=mode, keep_layers=indices,
                        keep_params=unquantized_params(config), int8_threshold=config.int8_threshold)
    return loaded, indices, source, plan


def unquantized_params(config: TuneConfig) -> str | None:
    """The --params whose Linears a quantized mode leaves unquantized (None: every Linear of the tuned layers)."""
    return None if config.keep_whole_layers else config.params


def _check_backprop_on_cpu_nf4(config: TuneConfig, mode: str, device: torch.device, skeleton, indices) -> None:
    """bitsandbytes' CPU 4-bit matmul adds a Linear's bias in place once it has run for inference (val scoring),
    which autograd refuses where backprop passes through it: refused up front, not with a traceback mid-run."""
    if config.estimator != "fo" or mode != "nf4" or device.type != "cpu":
        return
    prefix, decoder = decoder_layers(skeleton)
    kept = set(linear_names(skeleton, indices, unquantized_params(config)))
    if any(is_weight_matrix(m) and m.bias is not None and f"{prefix}.{i}.{name}" not in kept
           for i in range(min(indices), len(decoder)) for name, m in decoder[i].named_modules()):
        raise ZoliteError("--estimator fo backpropagates through 4-bit Linears with biases, which bitsandbytes' CPU "
                          "kernel cannot; use --mode fp16 on the CPU, or a GPU")


def _default_mode(config: TuneConfig, device: torch.device, profile, skeleton, indices) -> str:
    """The mode of a run not planned otherwise: as given, else fp16 when every layer's weights are tuned (nothing is
    left to quantize), else the profile's / the device's default."""
    if config.mode:
        return config.mode
    nothing_to_quantize = quantizes_nothing(skeleton, indices, unquantized_params(config))
    return "fp16" if nothing_to_quantize else choose_mode(None, device, profile)


def plan_for_device(config: TuneConfig, device: torch.device, skeleton, indices, identity, profile,
                    world_size: int = 1):
    """(mode, plan). With --gpu-memory: the fastest mode and largest micro-batch for that budget, the allocator
    capped to it. On a GPU without it: the run as asked (its mode, the whole batch) unless by the estimate that would
    not fit the card's free memory; then the same mode with the largest micro-batch that fits, else (no --mode given)
    offload, else the run is tried as asked (the estimate errs high). So a run's numbers never depend on how much
    memory happened to be free, unless it would not have fit. On the CPU: the mode as given, no plan."""
    asked = config.gpu_memory is not None
    if not asked and device.type != "cuda":
        return config.mode, None
    if asked:
        budget = parse_size(config.gpu_memory)
    else:   # what a scan earlier in this process left in torch's cache is free for this run too
        gc.collect()
        torch.cuda.empty_cache()
        budget = free_gpu_memory(device)
    defaults = profile.defaults if profile else {}
    batch = -(-(config.batch_size or defaults.get("batch_size", BUILTIN_DEFAULTS["batch_size"])) // world_size)
    seq_len = config.max_length or defaults.get("max_length", BUILTIN_DEFAULTS["max_length"])
    micro = min(config.micro_batch, batch) if config.micro_batch else None   # (a micro-batch over a slice: the slice)
    dtype = choose_dtype(config.dtype, device, profile)
    try:
        measured = measured_activations(identity(), dtype, profile)
    except ZoliteError:   # no embedding to key this machine's measurements by: the profile's, or the analytic estimate
        measured = measured_activations(None, dtype, profile)

    def plan_for(mode):
        return plan_memory(skeleton, indices, budget, batch, seq_len, dtype, mode=mode, measured=measured,
                           micro_batch=micro, estimator=config.estimator, optimizer=config.optimizer,
                           params=unquantized_params(config),
                           # the profile's default depends on the mode the plan picks: None = in fp16 only
                           cuda_graphs=config.cuda_graphs if config.cuda_graphs is not None
                           else (None if speed_option(config, "cuda_graphs", defaults, device, "fp16") else False))

    if asked:
        plan = plan_for(config.mode)
        on_cpu = "" if device.type == "cuda" else " (running on the CPU: its micro-batch is used, nothing is capped)"
        print(f"zolite: memory plan: {plan.reason}{on_cpu}", file=sys.stderr)
        if device.type == "cuda":   # hold the run to its budget: an underestimate fails here, not elsewhere
            cap_gpu_memory(budget, device)
        return plan.mode, plan
    default = _default_mode(config, device, profile, skeleton, indices)
    free = f"the GPU's free {budget / 2**30:.1f} GiB"
    fallback = config.mode is None and default != "offload" and config.estimator != "fo"
    for mode in [default] + (["offload"] if fallback else []):
        try:
            plan = plan_for(mode)
        except ZoliteError:
            continue
        if plan.mode == default and plan.micro_batch == (micro or batch):
            return config.mode, None   # fits as asked
        print(f"zolite: by the estimate the run would not fit {free} as asked; memory plan: {plan.reason}",
              file=sys.stderr)
        return plan.mode, plan
    print(f"zolite: by the estimate nothing fits {free}; trying the run as asked (the estimate errs high; "
          "--gpu-memory plans for a budget you give)", file=sys.stderr)
    return config.mode, None


def _cuda_index(device: torch.device) -> int:
    """torch's memory calls want an index, not a bare 'cuda'."""
    return device.index if device.index is not None else torch.cuda.current_device()


def free_gpu_memory(device: torch.device) -> int:
    return torch.cuda.mem_get_info(_cuda_index(device))[0]


def cap_gpu_memory(budget: int, device: torch.device) -> float:
    """Cap this process's CUDA allocator at `budget` bytes on `device`; returns the fraction set."""
    index = _cuda_index(device)
    fraction = min(1.0, budget / torch.cuda.get_device_properties(index).total_memory)
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    return fraction


@contextmanager
def fp32_matmuls(tf32: bool):
    """Within this block fp32 matmuls run on TF32 tensor cores if tf32 (torch's "high" precision), else in full fp32
    ("highest", torch's default); the process's setting is restored after. Half-precision matmuls are unaffected."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)
