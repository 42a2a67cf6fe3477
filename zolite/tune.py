"""`zolite tune`: MeZO on one decoder layer (or all of them), read top to bottom.

set up (model, task data, tuned layers) -> loop (ZO step, log, eval, checkpoint) -> patch + report.
"""
from __future__ import annotations

import dataclasses
import functools
import gc
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import CheckpointDevice, load_checkpoint, save_checkpoint
from .data import batches_for_step, sample_splits
from .errors import ZoliteError, check_at_least
from .evaluate import accuracy_report, encode_rows, evaluate_rows, score_encoded
from .io import config_mismatch, refuse_clobber, write_json
from .layers import decoder_layers, format_layers
from .loading import (INT8_THRESHOLD, MODES, QUANT_MODES, choose_dtype, choose_mode, load_model, resolve_device,
                      model_skeleton, resolve_model, source_record)
from .memory import MemoryProfiler, weight_breakdown, write_memory_report
from .plan import measured_activations, parse_size, plan_memory
from .patch import fingerprint, save_patch
from .trajectory import device_descriptor, device_kind, save_trajectory, trajectory_path
from .scan import choose_layers, folder_identity, scan
from .scoring import collate, pad_token_id
from .tasks import CustomTask, get_task, task_data
from .optim import ESTIMATORS, OPTIMIZERS, Stepper
from .zo import TunedLayers, generation_losses

OBJECTIVES = ("ce", "lm", "accuracy", "f1")
SEED_CHECKPOINT_S = 60   # a seed checkpoint is kilobytes: ZO runs also write one this often between evals
BUILTIN_DEFAULTS = {"lr": 1e-6, "eps": 1e-3, "batch_size": 16, "steps": 1000, "eval_every": 100, "max_length": 512}


@dataclass
class TuneConfig:
    """Everything that decides a run's result. None = the model profile's default."""
    model: str = "smollm2-135m"
    task: str = "sst2"
    layer: str | None = None          # "12", "3,5" or "all" (0-based); None / "auto" = the dominant layer
                                      # (this model's cached scan, else its profile, else a scan now)
    steps: int | None = None
    lr: float | None = None
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
    eps_scale: str = "absolute"       # absolute: W + eps z; relative: tensor i gets eps * RMS(base W_i) * z
    data: str | None = None
    eval_test: bool = False           # also score the held-out test rows at the end
    template: str | None = None       # custom tasks (task = a .jsonl file): see zolite/tasks/custom.py
    candidates: str | None = None
    label_field: str | None = None
    answer_field: str | None = None

    def task_options(self) -> dict:
        return {k: getattr(self, k) for k in ("template", "candidates", "label_field", "answer_field")}


# With LLM.int8 the two-point estimate tracks the unquantized one from this eps up (correlation 0.92 at 1e-2,
# 0.11 at 1e-3, over 32 z draws on SmolLM2, CPU backend: bench/results/quant_noise).
INT8_MIN_EPS = 1e-2


def tune(model: str = "smollm2-135m", task: str = "sst2", *, run_dir=None, out=None, force: bool = False,
         resume=None, progress: bool = True, **options) -> dict:
    """Tune and write a patch; returns the run's summary (also in RUN_DIR/report.json)."""
    config, run_dir, out = _prepare_run(model, task, run_dir, out, force, resume, options)
    t_start = time.perf_counter()

    # --- set up: model, layers, data ---
    with MemoryProfiler(resolve_device(config.device)) as profiler:
        with profiler.phase("load"):
            loaded, indices, layer_source, plan = load_for_tuning(config)
        net, tokenizer = loaded.model, loaded.tokenizer
        _, layers = decoder_layers(net)
        task_ = get_task(config.task, **config.task_options())
        config = _fill_defaults(config, loaded, indices, len(layers), task_, plan)
        if (loaded.mode == "int8" and config.estimator != "fo" and config.eps_scale == "absolute"
                and config.eps < INT8_MIN_EPS):
            print(f"zolite: warning: int8 rounds each layer's inputs to 8 bits, and at eps {config.eps:g} that "
                  "rounding outweighs the +eps/-eps loss difference (bench/results/quant_noise); "
                  f"use --mode nf4, or --eps {INT8_MIN_EPS:g}", file=sys.stderr)
        splits = sample_splits(task_data(task_, config.data), seed=config.data_seed,
                               validate=task_.validate,
                               expand=task_.expand)
        if not splits.train:
            raise ZoliteError(f"{splits.source} has too few rows to train on ({splits.total_rows}); pass a larger file")
        with profiler.phase("data"):
            train = encode_rows(tokenizer, task_, splits.train, config.max_length)
            val = encode_rows(tokenizer, task_, splits.val, config.max_length)
        tuned = TunedLayers(net, indices, config.eps_scale)
        static = weight_breakdown(net, tuned)
        base_sha256 = fingerprint(tuned.weights())
        load_s = time.perf_counter() - t_start
        write_json(run_dir / "config.json", dataclasses.asdict(config))

        eval_batch = 2 * (config.micro_batch or config.batch_size)   # a ZO forward's rows: what memory was planned for

        def score(rows: list[dict]) -> dict:
            return evaluate_rows(net, tokenizer, task_, rows, max_length=config.max_length, batch_size=eval_batch)

        def val_score() -> float:
            if task_.generative:
                return score(splits.val)["score"]
            scores = score_encoded(net, tokenizer, val, eval_batch)   # classification: encoded once
            return accuracy_report(scores, [e.accepted for e in val])["score"]

        # --- the stepper, then resume (a seed checkpoint replays its updates) or score the base weights on val ---
        pad, device = pad_token_id(tokenizer), loaded.device
        stepper = Stepper(net, tuned, estimator=config.estimator, n_z=config.n_z, eps=config.eps,
                          objective=config.objective, micro_batch=config.micro_batch, seed=config.seed,
                          phase=profiler.phase, collate_to_device=lambda c: collate(c, pad).to(device),
                          name=config.optimizer, lr=config.lr, weight_decay=config.weight_decay,
                          momentum=config.momentum, layerwise=config.layerwise)
        if config.objective == "f1":   # greedy answers under +eps and -eps, scored like the eval: raw rows go in
            stepper.pair_losses = lambda rows, seed: generation_losses(net, tokenizer, tuned, task_, rows, seed,
                                                                        config.eps, config.max_length)
        trained_on = device_descriptor(device, loaded.dtype)
        state = {"step": 0, "losses": [], "val": [], "best_step": None, "best_metric": None, "train_s": 0.0,
                 "devices": [trained_on]}
        best = None
        # a finite fallback if the run diverges: the best-val copy, else (no val) the base weights, step 0
        start_step, start_weights = 0, None if config.eval_every and val else _cpu_copy(tuned.state())
        saved = load_checkpoint(run_dir) if resume else None
        if saved is not None:
            with profiler.phase("resume"):   # the replay of a seed checkpoint
                best, state = _resume(saved, tuned, stepper, trained_on, run_dir)
        elif config.eval_every and val:
            with profiler.phase("eval"):
                state["val"].append([0, val_score()])
            state["best_step"], state["best_metric"] = 0, state["val"][-1][1]
            best = _cpu_copy(tuned.state())
        bar = _progress_bar(state["step"], config.steps, progress)
        state.setdefault("tokens", 0)   # (a checkpoint of an older zolite has none)
        last_save = time.monotonic()
        with profiler.phase("train"):
            while state["step"] < config.steps and state.get("diverged_at") is None:   # (a resumed run may have)
                step = state["step"]
                t0 = time.perf_counter()
                rows = batches_for_step(len(train), config.batch_size, step, config.seed)
                if config.objective == "f1":
                    examples = [splits.train[i] for i in rows]
                else:
                    examples = [train[i] for i in rows]
                    state["tokens"] += sum(len(e.context) for e in examples)
                state["losses"].append(stepper.step(step, examples))
                state["step"] = step + 1
                state["train_s"] += time.perf_counter() - t0
                if not math.isfinite(state["losses"][-1]):   # diverged: the weights are no longer usable
                    state["diverged_at"] = state["step"]
                    break

                # val checks every eval_every steps and at the last step (so --keep best can keep the steps after
                # the last multiple of eval_every)
                if config.eval_every and (state["step"] % config.eval_every == 0 or state["step"] == config.steps):
                    if val:
                        with profiler.phase("eval"):
                            acc = val_score()
                        state["val"].append([state["step"], acc])
                        if acc > state["best_metric"]:   # also with --keep last: a diverged run falls back to it
                            state["best_step"], state["best_metric"] = state["step"], acc
                            best = _cpu_copy(tuned.state())
                    _save(run_dir, tuned, stepper, best, state, trained_on)
                    last_save = time.monotonic()
                elif stepper.updates is not None and time.monotonic() - last_save >= SEED_CHECKPOINT_S:
                    _save(run_dir, tuned, stepper, best, state, trained_on)   # a cut-off run loses about a minute
                    last_save = time.monotonic()
                bar.update(1)
                bar.set_postfix_str(_postfix(state, profiler))
            bar.close()
        # the loop's end (before the patch's weights are chosen): a run cut off while writing its patch resumes here
        _save(run_dir, tuned, stepper, best, state, trained_on)

        # --- the patch: best (or last) weights, rounded to fp16 first so the final score is the patch's ---
        diverged = state.get("diverged_at") is not None
        if diverged:
            print(f"zolite: the loss became {state['losses'][-1]} at step {state['diverged_at']} (diverged); the patch "
                  "keeps the best val weights (or the weights the run started from)", file=sys.stderr)
        if (config.keep == "best" or diverged) and best is not None:
            tuned.load(best)
        elif diverged:
            tuned.load(start_weights)
        tuned.load({k: v.half().float() for k, v in tuned.state().items()})
        with profiler.phase("final eval"):
            final = {"val": score(splits.val) if splits.val else None}
            if config.eval_test and splits.test:
                final["test"] = score(splits.test)
        metric = {"name": task_.metric, "val": final["val"]["score"] if final["val"] else None,
                  "kept_step": state["best_step"] if (config.keep == "best" or diverged) and best is not None
                  else start_step if diverged else state["step"]}
        with profiler.phase("patch write"):
            patch_metadata = {
                "zolite.model": _model_reference(config.model), "zolite.arch": net.config.model_type,
                "zolite.layer": ",".join(map(str, indices)), "zolite.base_sha256": base_sha256,
                "zolite.task": config.task, "zolite.steps": str(state["step"]), "zolite.metric": metric,
                "zolite.hparams": dataclasses.asdict(config)}
            source = source_record(loaded.path)
            if source:   # the GGUF file the base was read from: `export --format gguf` refuses it once it changed
                patch_metadata["zolite.source_sha256"] = source["sha256"]
            if isinstance(task_, CustomTask):   # its template, so the patch applies without the task's files
                patch_metadata["zolite.task_spec"] = {k: v for k, v in task_.spec.to_dict().items() if k != "data"}
            save_patch(out, tuned.state(), patch_metadata, force=True)
            if stepper.plain() and stepper.updates is not None:   # seeds: kilobytes
                trajectory = [(u[0][0], u[1][0]) for u in stepper.updates[:metric["kept_step"]]]
                save_trajectory(trajectory_path(out), trajectory, {
                    **patch_metadata, "zolite.dense_sha256": fingerprint(tuned.state()),
                    "zolite.trained_on": trained_on}, force=True)   # checked up front
        step_ms = 1000 * state["train_s"] / max(1, len(state["losses"]))
        memory_profile = profiler.report(static, extra={
            "step_ms": round(step_ms, 2), "plan": plan.reason if plan else None,
            "tokens_per_s": round(state["tokens"] / state["train_s"], 1) if state["train_s"] and state["tokens"] else None})

        report = {
            "patch": str(out), "run_dir": str(run_dir), "config": dataclasses.asdict(config),
            "model": {"name": config.model, "path": str(loaded.path), "arch": net.config.model_type,
                      "num_layers": len(layers), "dtype": str(loaded.dtype).removeprefix("torch."),
                      "device": str(device)},
            "layers": format_layers(indices, len(layers)), "layer_source": layer_source, "tuned_params": tuned.numel(),
            "base_sha256": base_sha256,
            "data": {"source": splits.source, "rows_in_file": splits.total_rows, "counts": splits.counts},
            "steps": state["step"], "kept_step": metric["kept_step"], "forward_passes": stepper.forwards,
            "diverged_at_step": state.get("diverged_at"), "devices": state["devices"],
            "final": final, "val_curve": state["val"], "loss_curve": state["losses"],
            "timing": {"load_s": round(load_s, 2), "train_s": round(state["train_s"], 2),
                       "step_ms": round(step_ms, 2),
                       "total_s": round(time.perf_counter() - t_start, 2)},
            "memory": profiler.peaks(), "memory_profile": memory_profile,
            "plan": plan.as_dict() if plan else None,
        }
        write_json(run_dir / "report.json", report)
        title = (f"zolite tune {config.model} / {config.task}, layers {report['layers']}, mode {loaded.mode}, "
                 f"{report['model']['dtype']}")
        summary = (f"Steps {state['step']}, batch {config.batch_size} (micro-batch {config.micro_batch}), "
                   f"{step_ms:.1f} ms/step; val {metric['val']}; patch {out}.")
        write_memory_report(memory_profile, run_dir, title, summary)
        return report


def _model_reference(model: str) -> str:
    """The base as a patch names it: a profile or hub id as given, a local folder or file by its absolute path (so
    apply without --model finds it from any folder)."""
    return str(Path(model).resolve()) if Path(model).exists() else model


def load_for_tuning(config: TuneConfig):
    """The model in the run's mode with the tuned layers kept unquantized and on the GPU, the layers, where that
    choice came from, and the memory plan when a budget was given. Layers are chosen before loading: quantized
    modes must know which layer to leave alone."""
    path, profile = resolve_model(config.model)
    device = resolve_device(config.device)
    skeleton = model_skeleton(path)
    num_layers = len(decoder_layers(skeleton)[1])
    # read from the model's files only when needed (a cached scan, a memory plan): it hashes the embedding
    identity = functools.cache(lambda: folder_identity(path, skeleton))
    indices, source = choose_layers(config.layer, num_layers, identity, profile,
                                    lambda: scan(config.model, seeds=0, device=device, dtype=config.dtype,
                                                 mode=config.mode))
    if config.mode in QUANT_MODES and len(indices) == num_layers:
        raise ZoliteError(f"--layers all tunes every layer, so nothing is left to quantize with --mode {config.mode}; "
                          "use --mode fp16 or offload")
    mode, plan = plan_for_device(config, device, skeleton, indices, identity, profile)
    mode = mode or _default_mode(config, device, profile, every_layer=len(indices) == num_layers)
    loaded = load_model(config.model, device=device, dtype=config.dtype, mode=mode, keep_layers=indices,
                        int8_threshold=config.int8_threshold)
    return loaded, indices, source, plan


def _default_mode(config: TuneConfig, device: torch.device, profile, every_layer: bool) -> str:
    """The mode of a run not planned otherwise: as given, else fp16 when every layer is tuned (nothing is left to
    quantize), else the profile's / the device's default."""
    return config.mode or ("fp16" if every_layer else choose_mode(None, device, profile))


def plan_for_device(config: TuneConfig, device: torch.device, skeleton, indices, identity, profile):
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
    batch = config.batch_size or defaults.get("batch_size", BUILTIN_DEFAULTS["batch_size"])
    seq_len = config.max_length or defaults.get("max_length", BUILTIN_DEFAULTS["max_length"])
    dtype = choose_dtype(config.dtype, device, profile)
    try:
        measured = measured_activations(identity(), dtype, profile)
    except ZoliteError:   # no embedding to key this machine's measurements by: the profile's, or the analytic estimate
        measured = measured_activations(None, dtype, profile)

    def plan_for(mode):
        return plan_memory(skeleton, indices, budget, batch, seq_len, dtype, mode=mode, measured=measured,
                           micro_batch=config.micro_batch, estimator=config.estimator, optimizer=config.optimizer)

    if asked:
        plan = plan_for(config.mode)
        on_cpu = "" if device.type == "cuda" else " (running on the CPU: its micro-batch is used, nothing is capped)"
        print(f"zolite: memory plan: {plan.reason}{on_cpu}", file=sys.stderr)
        if device.type == "cuda":   # hold the run to its budget: an underestimate fails here, not elsewhere
            cap_gpu_memory(budget, device)
        return plan.mode, plan
    default = _default_mode(config, device, profile, every_layer=len(indices) == len(decoder_layers(skeleton)[1]))
    free = f"the GPU's free {budget / 2**30:.1f} GiB"
    fallback = config.mode is None and default != "offload" and config.estimator != "fo"
    for mode in [default] + (["offload"] if fallback else []):
        try:
            plan = plan_for(mode)
        except ZoliteError:
            continue
        if plan.mode == default and plan.micro_batch == (config.micro_batch or batch):
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


def _save(run_dir, tuned, stepper, best, state, trained_on: str) -> None:
    """Checkpoint the loop's state with, for ZO runs, every step's seeds and projected gradients (a seed checkpoint:
    kilobytes, replayed on resume), else (backprop) the layers as stored, the best weights and the optimiser's
    buffers (opt/...)."""
    tensors, scalars = stepper.state()
    state = {**state, "optimizer": scalars, "trained_on": trained_on}
    if stepper.updates is not None:
        save_checkpoint(run_dir, {}, None, {**state, "updates": stepper.updates,
                                            "replay_sha256": fingerprint(tuned.exact_state(), as_stored=True)})
    else:
        save_checkpoint(run_dir, {**tuned.exact_state(), **{f"opt/{k}": v for k, v in tensors.items()}}, best,
                        state)


def _resume(saved, tuned, stepper, trained_on: str, run_dir) -> tuple[dict | None, dict]:
    """Put the checkpoint's weights and optimiser state back; returns (best weights, the loop's state, its devices
    with this one added: a run resumed on another GPU model has its later losses from that GPU)."""
    masters, best, state = saved
    devices = state.setdefault("devices", [state["trained_on"]] if state.get("trained_on") else [])
    if trained_on not in devices:
        devices.append(trained_on)
    scalars = state.pop("optimizer", {})
    updates = state.pop("updates", None)
    old_trajectory = state.pop("trajectory", None)   # dense checkpoints of zolite before seed checkpoints
    if updates is None:   # dense: the layers as stored and the optimiser's buffers
        tuned.load({k: v for k, v in masters.items() if not k.startswith("opt/")})
        stepper.load({k[4:]: v for k, v in masters.items() if k.startswith("opt/")}, scalars)
        # plain MeZO recorded its steps (as the trajectory): it goes on with seed checkpoints; else with dense ones
        plain_steps = old_trajectory is not None and stepper.plain() and len(old_trajectory) == state["step"]
        stepper.updates = [[[s], [g]] for s, g in old_trajectory] if plain_steps else None
        return best, state
    mismatch = CheckpointDevice(f"{run_dir} was checkpointed on {state.get('trained_on')}; its seeds give the same "
                                f"z only there (this is {trained_on}): resume it there, or start it again")
    if device_kind(state.get("trained_on")) != device_kind(trained_on):   # z: the device type's generator, in dtype
        raise mismatch
    best = {}

    def keep_best(step: int) -> None:
        if step == state["best_step"]:
            best.update(_cpu_copy(tuned.state()))
    keep_best(0)
    stepper.replay(updates, keep_best)
    # another GPU model (or torch) may draw the same z or not: the replayed weights' digest decides
    if fingerprint(tuned.exact_state(), as_stored=True) != state.pop("replay_sha256", None):
        raise mismatch
    stepper.load(None, scalars)
    return best or None, state


def _cpu_copy(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The best weights so far, kept off the GPU."""
    return {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}


def _prepare_run(model, task, run_dir, out, force, resume, options):
    """The config, run folder and patch path; checks a resumed folder against the arguments given."""
    unknown = set(options) - {f.name for f in dataclasses.fields(TuneConfig)}
    if unknown:
        cli_names = {"test": "eval_test", "layers": "layer"}   # the CLI's --test / --layers are these in Python
        hints = [f"{k} (use {cli_names[k]}=)" if k in cli_names else k for k in sorted(unknown)]
        raise TypeError(f"tune() got unknown options: {', '.join(hints)}")
    given = {k: v for k, v in options.items() if v is not None}
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "config.json").is_file():
            raise ZoliteError(f"{run_dir} is not a zolite run folder (no config.json); pass the RUN_DIR of an earlier tune")
        saved = json.loads((run_dir / "config.json").read_text())
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


def check_options(config: TuneConfig) -> None:
    """Numbers and choices the user gave, checked before anything is loaded (None = the profile's default)."""
    minimum = {"steps": 0, "batch_size": 1, "max_length": 2, "eval_every": 0, "lr": 0.0, "weight_decay": 0.0,
               "micro_batch": 1, "int8_threshold": 0.0}
    for name, low in minimum.items():
        check_at_least(f"--{name.replace('_', '-')}", getattr(config, name), low)
    if not 0 <= config.momentum < 1:
        raise ZoliteError(f"--momentum must be in [0, 1), got {config.momentum}")
    if config.eps is not None and not (config.eps > 0 and math.isfinite(config.eps)):
        raise ZoliteError(f"--eps must be above 0, got {config.eps}")
    resolve_device(config.device)
    if config.keep not in ("best", "last"):
        raise ZoliteError(f"--keep must be best or last, got {config.keep!r}")
    if config.micro_batch and config.batch_size and config.batch_size % config.micro_batch:
        raise ZoliteError(f"--micro-batch {config.micro_batch} must divide --batch-size {config.batch_size}")
    if config.eps_scale not in ("absolute", "relative"):
        raise ZoliteError(f"--eps-scale must be absolute or relative, got {config.eps_scale!r}")
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
    if config.gpu_memory is not None:
        parse_size(config.gpu_memory)
    if config.objective not in (None, *OBJECTIVES):
        raise ZoliteError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {config.objective!r}")


def _fill_defaults(config: TuneConfig, loaded, indices, num_layers, task, plan=None) -> TuneConfig:
    defaults = dict(BUILTIN_DEFAULTS, **(loaded.profile.defaults if loaded.profile else {}))
    filled = {k: defaults[k] for k in BUILTIN_DEFAULTS if getattr(config, k) is None}
    filled["layer"] = format_layers(indices, num_layers)
    filled["dtype"] = str(loaded.dtype).removeprefix("torch.")
    filled["device"] = str(loaded.device)
    filled["mode"] = loaded.mode
    filled["micro_batch"] = config.micro_batch or (plan.micro_batch if plan else None) or filled.get("batch_size", config.batch_size)
    filled["objective"] = config.objective or ("lm" if task.generative else "ce")
    config = dataclasses.replace(config, **filled)
    if task.generative and config.objective in ("ce", "accuracy"):
        raise ZoliteError(f"{task.name} is a generation task (no candidates): use --objective lm or f1")
    if not task.generative and config.objective == "f1":
        raise ZoliteError(f"{task.name} is scored by accuracy over candidates: use --objective ce, lm or accuracy")
    return config


def _progress_bar(start: int, total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, file=sys.stderr, unit="step", dynamic_ncols=True)


def _postfix(state: dict, profiler) -> str:
    recent = state["losses"][-20:]
    ms = 1000 * state["train_s"] / max(1, len(state["losses"]))
    peaks = profiler.peaks()
    mem = peaks.get("gpu_allocated_peak_gib", peaks["cpu_rss_peak_gib"])
    val = f" val {state['val'][-1][1]:.3f}" if state["val"] else ""
    return f"loss {sum(recent) / len(recent):.4f} {ms:.0f} ms/step mem {mem:.2f} GiB{val}"
