"""`zolite tune`: MeZO on one decoder layer (or all of them), read top to bottom.

set up (model, task data, tuned layers) -> loop (ZO step, log, eval, checkpoint) -> patch + report.
`tune_loop()` is the loop; each phase it calls is a function below it. `tune()` runs it in this process, or in each
process of a data-parallel run (zolite/distributed.py: each takes a slice of every step's batch). The run's options
and the model's loading in the mode that fits are in tune_setup.py.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import CheckpointDevice, load_checkpoint, save_checkpoint
from .data import Splits, batches_for_step, sample_splits
from .distributed import PeerLost, World, in_worker, join, launch, local_device, quiet_unless_main
from .errors import ZoliteError, check_at_least
from .evaluate import accuracy_report, encode_rows, evaluate_rows, predictions
from .graphs import ForwardGraphs
from .io import write_json
from .layers import decoder_layers, format_layers
from .loading import LoadedModel, resolve_device, source_record
from .memory import MemoryProfiler, weight_breakdown, write_memory_report
from .optim import Stepper, weighted_mean
from .precondition import measure_scales, scale_summary
from .patch import fingerprint, save_patch
from .scoring import collate, pad_token_id
from .stepsize import (BASE_BATCHES, PROBES, LossGuard, effective_updates, new_guard, probe_lr, reference_losses,
                       schedule_factor)
from .tasks import CustomTask, Task, get_task, task_data
from .trajectory import device_descriptor, device_kind, save_trajectory, trajectory_path
from .tune_setup import (QUANTIZED_EPS, TuneConfig, applied_recipe, auto_lr_supported, check_world, fill_defaults,
                         fp32_matmuls, given_options, load_for_tuning, prepare_run)
from .zo import TunedLayers, generation_losses

SEED_CHECKPOINT_S = 60   # a seed checkpoint is kilobytes: ZO runs also write one this often between evals


def tune(model: str = "smollm2-135m", task: str = "sst2", *, run_dir=None, out=None, force: bool = False,
         resume=None, progress: bool = True, nproc: int | None = None, **options) -> dict:
    """Tune and write a patch; returns the run's summary (also in RUN_DIR/report.json; None in the processes of a
    distributed run other than rank 0).

    nproc: start that many processes on this machine (torch's elastic launcher), each taking a slice of every
    step's batch. Under torchrun the processes are torchrun's (zolite.distributed)."""
    if nproc is not None:
        check_at_least("--nproc", nproc, 1)
        if nproc > 1 and not in_worker():
            # a recipe may set the batch; rank 0 prints the recipe's lines
            given = given_options(model, task, resume, options, say=False)
            check_world(nproc, given.get("estimator"), given.get("batch_size"))
            return launch(nproc, tune, model, task, run_dir=run_dir, out=out, force=force, resume=resume,
                          progress=progress, **options)
    world = join()
    if nproc is not None and nproc != world.size:
        raise ZoliteError(f"--nproc {nproc} inside a run of {world.size} processes (torchrun starts them): drop --nproc")
    try:
        with quiet_unless_main(world):
            return _tune(world, model, task, run_dir, out, force, resume, progress and world.main, options)
    finally:
        world.leave()


def _tune(world: World, model, task, run_dir, out, force, resume, progress, options) -> dict:
    """tune() in one process of the run (the only one, or one of torchrun's)."""
    # rank 0 checks the options and claims the run folder; every rank gets its answer
    config, run_dir, out = world.share(lambda: prepare_run(model, task, run_dir, out, force, resume, options))
    config = dataclasses.replace(config, device=local_device(config.device, world))   # GPU LOCAL_RANK
    try:
        return tune_loop(world, config, run_dir, out, resume, progress)
    except PeerLost as e:   # the line names this run's folder
        raise PeerLost(str(e).replace("RUN_DIR", str(run_dir))) from None


def tune_loop(world: World, config: TuneConfig, run_dir: Path, out: Path, resume, progress: bool) -> dict | None:
    """Set up, loop, patch and report, in this process (rank 0 writes; the others return None)."""
    t_start = time.perf_counter()
    with MemoryProfiler(resolve_device(config.device)) as profiler, contextlib.ExitStack() as run_scope:
        # --- set up: model, layers, data, the stepper; then resume (a seed checkpoint replays its updates) or
        # score the base weights on val ---
        run = world.agree(lambda: set_up(config, run_dir, profiler, t_start, world))
        world.check_same("the device that draws z, the base layers' fingerprint", (run.trained_on, run.base_sha256))
        config = run.config
        run_scope.enter_context(fp32_matmuls(config.tf32 and run.loaded.device.type == "cuda"))   # once it is known
        state, best, start_weights = start(run, run_dir, resume, profiler)
        bar = _progress_bar(state["step"], config.steps, progress)
        last_save = time.monotonic()

        # --- the loop: ZO step, log, val check and checkpoint ---
        with profiler.phase("train"):
            while state["step"] < config.steps and state.get("diverged_at") is None:   # (a resumed run may have)
                train_step(run, state)
                if not math.isfinite(state["losses"][-1]):   # diverged: the weights are no longer usable
                    state["diverged_at"] = state["step"]
                    break

                # val checks every eval_every steps and at the last step (so --keep best can keep the steps after
                # the last multiple of eval_every)
                if config.eval_every and (state["step"] % config.eval_every == 0 or state["step"] == config.steps):
                    if run.val:
                        best = check_val(run, state, best, profiler)
                    checkpoint(run, run_dir, best, state)
                    last_save = time.monotonic()
                elif run.stepper.updates is not None and time.monotonic() - last_save >= SEED_CHECKPOINT_S:
                    checkpoint(run, run_dir, best, state)   # a cut-off run loses about a minute
                    last_save = time.monotonic()
                bar.update(1)
                bar.set_postfix_str(_postfix(state, profiler))
            bar.close()
        # the loop's end (before the patch's weights are chosen): a run cut off while writing its patch resumes here
        checkpoint(run, run_dir, best, state)

        # --- the patch: best (or last) weights, rounded to fp16 first so the final score is the patch's ---
        kept_step = keep_weights(run, state, best, start_weights)
        with profiler.phase("final eval"):
            final = {"val": run.score(run.splits.val) if run.splits.val else None}
            if config.eval_test and run.splits.test:
                final["test"] = run.score(run.splits.test)
        metric = {"name": run.task.metric, "val": final["val"]["score"] if final["val"] else None,
                  "kept_step": kept_step}
        if not run.world.main:   # rank 0 writes the patch and the report
            return None
        with profiler.phase("patch write"):
            write_patch(run, out, state, metric)
        return write_report(run, run_dir, out, state, final, metric, profiler, t_start)


@dataclass
class Run:
    """What the loop works on: the config with the profile's defaults filled in, the model, its tuned layers, the
    task's rows and the stepper."""
    config: TuneConfig
    loaded: LoadedModel
    indices: list[int]
    layer_source: str
    plan: object                  # the memory plan (None: the run as asked)
    num_layers: int
    task: Task
    splits: Splits
    train: list                   # the train and val rows, encoded
    val: list
    tuned: TunedLayers
    static: dict                  # the weights' memory, by part
    base_sha256: str
    load_s: float
    stepper: Stepper
    trained_on: str               # the device descriptor: where the step seeds draw these z
    lr_source: str                # where a numeric lr came from: "given" (--lr), "recipe" or "profile"
    world: World                  # this process's place in the run (world size 1: the only one)
    recipe: dict | None           # the options the run took from its task's recipe (None: no recipe applied)
    lr_choice: dict | None = None  # the lr used and how it was chosen (given, or the probe's): set by start()
    guard: LossGuard | None = None
    kept_weights: dict | None = None   # the guard's copy of the weights to go back to (plain MeZO runs: see stepsize)
    block_start: dict | None = None    # and of the weights the current block started from
    exchange: list = dataclasses.field(default_factory=lambda: [0, 0, 0])   # this process's steps, the bytes and
                                                                            # all_reduces they sent

    @property
    def eval_batch(self) -> int:
        return forward_rows(self.config)

    def score(self, rows: list[dict]) -> dict:
        """The task's metric on rows; each rank scores its slice, the predictions are gathered."""
        return evaluate_rows(self.loaded.model, self.loaded.tokenizer, self.task, rows,
                             max_length=self.config.max_length, batch_size=self.eval_batch, world=self.world)

    def val_score(self) -> float:
        if self.task.generative:
            return self.score(self.splits.val)["score"]
        predicted = self.world.gather(predictions(self.loaded.model, self.loaded.tokenizer,   # encoded once
                                                  self.world.shard(self.val), self.eval_batch))
        return accuracy_report(predicted, [e.accepted for e in self.val])["score"]


def set_up(config: TuneConfig, run_dir: Path, profiler, t_start: float, world: World | None = None) -> Run:
    """Load the model, fill in the profile's defaults, sample and encode the task's rows, take the tuned layers'
    fingerprint; write the run's config.json (rank 0); build the stepper."""
    world = world or World()
    with profiler.phase("load"):
        loaded, indices, layer_source, plan = load_for_tuning(config, world.size)
    world.device = loaded.device   # the losses are summed there (NCCL on CUDA)
    net, tokenizer = loaded.model, loaded.tokenizer
    _, layers = decoder_layers(net)
    task_ = get_task(config.task, **config.task_options())
    lr_given = config.lr is not None
    config = fill_defaults(config, loaded, indices, len(layers), task_, plan, world.size)
    # an lr not given can only be the profile's: the built-in default is "auto", which choose_lr reports as "probe",
    # as it does a profile's lr that fill_defaults turned to the probe
    lr_source = "given" if lr_given else "profile"
    recipe = applied_recipe(config, len(layers))   # what the run took from its task's recipe (None: no recipe)
    if recipe and "layer" in recipe:
        layer_source = f"profile {config.model}'s recipe for {config.task}"
    if recipe and "lr" in recipe:
        lr_source = "recipe"
    check_world(world.size, config.estimator, config.batch_size)
    if (loaded.mode == "int8" and config.estimator != "fo" and config.eps_scale == "absolute"
            and config.eps < QUANTIZED_EPS):
        print(f"zolite: warning: int8 rounds each layer's inputs to 8 bits, and at eps {config.eps:g} that "
              "rounding outweighs the +eps/-eps loss difference (bench/results/quant_noise); "
              f"use --mode nf4, or --eps {QUANTIZED_EPS:g}", file=sys.stderr)
    splits = sample_splits(task_data(task_, config.data), seed=config.data_seed,
                           validate=task_.validate,
                           expand=task_.expand)
    if not splits.train:
        raise ZoliteError(f"{splits.source} has too few rows to train on ({splits.total_rows}); pass a larger file")
    with profiler.phase("data"):
        train = encode_rows(tokenizer, task_, splits.train, config.max_length)
        val = encode_rows(tokenizer, task_, splits.val, config.max_length)
    tuned = TunedLayers(net, indices, config.eps_scale, config.params)
    static = weight_breakdown(net, tuned)
    base_sha256 = fingerprint(tuned.weights())
    load_s = time.perf_counter() - t_start
    if world.main:
        write_json(run_dir / "config.json", dataclasses.asdict(config))

    pad, device = pad_token_id(tokenizer), loaded.device
    stepper = Stepper(net, tuned, estimator=config.estimator, n_z=config.n_z, eps=config.eps,
                      objective=config.objective, micro_batch=config.micro_batch, seed=config.seed,
                      phase=profiler.phase, collate_to_device=lambda c: collate(c, pad).to(device),
                      name=config.optimizer, lr=0.0, weight_decay=config.weight_decay,   # lr: set by start()
                      momentum=config.momentum, layerwise=config.layerwise, world=world)
    if config.cuda_graphs and config.estimator == "spsa" and config.objective != "f1":
        stepper.graphs = ForwardGraphs(net, tuned)
    if config.objective == "f1":   # greedy answers under +eps and -eps, scored like the eval: raw rows go in
        stepper.pair_losses = lambda rows, seed, eps=None: tuple(weighted_mean(rows, None, lambda chunk: generation_losses(
            net, tokenizer, tuned, task_, chunk, seed, config.eps if eps is None else eps, config.max_length), world))
    return Run(config, loaded, indices, layer_source, plan, len(layers), task_, splits, train, val, tuned, static,
               base_sha256, load_s, stepper, device_descriptor(device, loaded.dtype), lr_source, world, recipe)


def start(run: Run, run_dir: Path, resume, profiler) -> tuple[dict, dict | None, dict | None]:
    """The loop's state, the best weights so far and the weights a diverged run without val falls back to: from the
    run folder's checkpoint when resuming (a seed checkpoint replays its updates), else step 0's, the base weights
    scored on val. Measures what the base decides (activation scales, the probed lr) or reads it back."""
    world = run.world
    state = {"step": 0, "losses": [], "val": [], "best_step": None, "best_metric": None, "train_s": 0.0,
             "devices": [run.trained_on], "world_sizes": [world.size]}
    best = None
    # a finite fallback if the run diverges: the best-val copy, else (no val) the base weights, step 0
    start_weights = None if run.config.eval_every and run.val else _cpu_copy(run.tuned.state())
    saved = world.share(lambda: load_checkpoint(run_dir)) if resume else None   # rank 0 reads it, every rank replays
    choose_step(run, saved, profiler)
    if run.guard is not None:
        run.guard.returns = guard_returns(run) if saved is None else _resumed_guard_returns(run, saved[2])
        if saved is not None:
            run.guard.replay(saved[2]["losses"])
        if run.guard.returns:   # the base's weights (before a seed checkpoint's replay), until a block's loss is lower
            run.kept_weights = run.block_start = _cpu_copy(run.tuned.exact_state())
    if saved is not None:
        with profiler.phase("resume"):   # the replay of a seed checkpoint
            best, state = world.agree(lambda: _resume(saved, run, run_dir))
        sizes = state.setdefault("world_sizes", [1])   # (a checkpoint of an older zolite has none: one process)
        if sizes[-1] != world.size:
            sizes.append(world.size)
    elif run.config.eval_every and run.val:
        with profiler.phase("eval"):
            state["val"].append([0, run.val_score()])
        state["best_step"], state["best_metric"] = 0, state["val"][-1][1]
        best = _cpu_copy(run.tuned.state())
    state.setdefault("tokens", 0)   # (a checkpoint of an older zolite has none)
    state["lr_choice"] = run.lr_choice
    if run.guard is not None:
        state["guard_returns"] = run.guard.returns
    return state, best, start_weights


def _resumed_guard_returns(run: Run, saved_state: dict) -> bool:
    """Whether a resumed run's guard goes back: as its checkpoint says; an older zolite's run (which says nothing)
    only from a seed checkpoint (a dense one's replay cannot rebuild the kept weights) and only if its guard, which
    only halved, never did (then nothing it did differs)."""
    if "guard_returns" in saved_state:
        return saved_state["guard_returns"]
    if saved_state.get("updates") is None or not guard_returns(run):
        return False
    halving_only = new_guard(run.config.steps, run.lr_choice)
    halving_only.replay(saved_state["losses"])
    return not halving_only.backoffs


def choose_step(run: Run, saved, profiler) -> None:
    """The step's scale and size, decided on the base weights (a resumed run reads them from its checkpoint): the
    activation scales of z (--eps-scale activation), the lr (given, or probed) and the guard."""
    config, device = run.config, run.loaded.device
    with profiler.phase("lr probe"):
        if config.eps_scale == "activation":   # a resumed run keeps the scales it started with (none: scale 1)
            run.tuned.set_scales(_saved_scales(saved) if saved is not None else
                                 measure_scales(run.loaded.model, run.tuned, run.train, run.eval_batch, device))
        run.lr_choice = (saved[2].get("lr_choice") if saved is not None else None) or choose_lr(run)
    run.stepper.optimizer.lr = run.lr_choice["lr"]
    run.config = dataclasses.replace(config, lr=run.lr_choice["lr"])   # patches and trajectories record the number
    if uses_guard(config):
        run.guard = new_guard(config.steps, run.lr_choice)


def uses_guard(config: TuneConfig) -> bool:
    return config.guard and auto_lr_supported(config)


def forward_rows(config: TuneConfig) -> int:
    """A ZO forward's rows (a micro-batch's +eps and -eps copies): what memory was planned for, and the batch that
    scoring and the activation scales are measured in."""
    return 2 * (config.micro_batch or config.batch_size)


def probe_batch(train: list, config: TuneConfig, k: int) -> list:
    """Batch k of the lr probe's and the guard reference's: drawn apart from the run's (seed -1 - seed)."""
    return [train[i] for i in batches_for_step(len(train), config.batch_size, k, -1 - config.seed)]


def choose_lr(run: Run) -> dict:
    """{"lr", "source", "probe", "guard_reference"}: the lr given, or for "auto" the probe's on the base weights
    (zolite.stepsize), on batches drawn apart from the run's; guard_reference: the run's loss there."""
    config, stepper = run.config, run.stepper
    train = run.splits.train if config.objective == "f1" else run.train

    def batch(k: int) -> list:
        return probe_batch(train, config, k)

    if config.lr != "auto":
        reference = reference_losses(stepper.pair_losses, [batch(k) for k in range(BASE_BATCHES)], config.seed,
                                     config.eps) if uses_guard(config) else []
        return {"lr": float(config.lr), "source": run.lr_source, "probe": None, "guard_reference": reference,
                "forwards": 2 * len(reference)}
    if not auto_lr_supported(config):
        raise ZoliteError("--lr auto measures the curvature of a differentiable loss under ZO-SGD; with --estimator "
                          "fo, --optimizer adam / sign, --layerwise or --objective accuracy / f1 give --lr")
    probe = probe_lr(stepper.pair_losses, [(batch(2 * k), batch(2 * k + 1)) for k in range(PROBES)], config.seed,
                     config.eps)
    lr = probe.lr * (1 - config.momentum if config.optimizer == "momentum" else 1.0)
    return {"lr": float(f"{lr:.4g}"), "source": "probe", "probe": probe.as_dict(), "guard_reference": probe.reference,
            "forwards": probe.forwards}


def train_step(run: Run, state: dict) -> None:
    """One ZO (or backprop) step on the step's batch (a function of run seed and step); its loss, prompt tokens and
    time go into the loop's state."""
    config = run.config
    step = state["step"]
    t0, sent, reduces = time.perf_counter(), run.world.exchanged, run.world.reduces
    rows = batches_for_step(len(run.train), config.batch_size, step, config.seed)   # the global batch: each rank
                                                                                    # takes its slice of it
    if config.objective == "f1":
        examples = [run.splits.train[i] for i in rows]
    else:
        examples = [run.train[i] for i in rows]
        state["tokens"] += sum(len(e.context) for e in examples)
    # the step's lr multiplier: the guard's backoffs times the schedule's decay (the updates record it, so a resume
    # or a trajectory replays them as they were)
    run.stepper.lr_factor = ((run.guard.factor if run.guard is not None else 1.0)
                             * schedule_factor(config.lr_schedule, step, config.steps))
    state["losses"].append(run.stepper.step(step, examples))
    state["step"] = step + 1
    state["train_s"] += time.perf_counter() - t0
    run.exchange = [run.exchange[0] + 1, run.exchange[1] + run.world.exchanged - sent,
                    run.exchange[2] + run.world.reduces - reduces]
    if run.guard is not None:
        follow_guard(run, run.guard.check(state["losses"]), state["step"])


def guard_returns(run: Run) -> bool:
    """Whether the guard goes back to kept weights: in plain MeZO, whose weights are all there is to put back (an
    optimiser's buffers would have to go back too)."""
    return run.stepper.plain()


def follow_guard(run: Run, action: str | None, step: int) -> None:
    """Do what the guard said after `step` (stepsize.LossGuard.check): the weights back to the kept ones, or the
    block's starting weights as the kept ones (a halving needs nothing here: train_step reads the guard's factor);
    then copy the weights if a block starts here."""
    if action == "return":
        run.tuned.load(run.kept_weights)
    elif action == "snapshot":
        run.kept_weights = run.block_start
    if step and run.guard.copy_at(step):
        run.block_start = _cpu_copy(run.tuned.exact_state())


def check_val(run: Run, state: dict, best: dict | None, profiler) -> dict | None:
    """Score val after this step; returns the best weights so far (a copy of these if they score best)."""
    with profiler.phase("eval"):
        acc = run.val_score()
    state["val"].append([state["step"], acc])
    if acc > state["best_metric"]:   # also with --keep last: a diverged run falls back to it
        state["best_step"], state["best_metric"] = state["step"], acc
        best = _cpu_copy(run.tuned.state())
    return best


def keep_weights(run: Run, state: dict, best: dict | None, start_weights: dict | None) -> int:
    """Put the patch's weights in the tuned layers, rounded to fp16 as the patch holds them: the best val step's
    (--keep best, or a diverged run), else the last step's, else (diverged without val) the weights the run started
    from. Returns the step they are from."""
    diverged = state.get("diverged_at") is not None
    if diverged:
        print(f"zolite: the loss became {state['losses'][-1]} at step {state['diverged_at']} (diverged); the patch "
              "keeps the best val weights (or the weights the run started from)", file=sys.stderr)
    keep_best = (run.config.keep == "best" or diverged) and best is not None
    if keep_best:
        run.tuned.load(best)
    elif diverged:
        run.tuned.load(start_weights)
    run.tuned.load({k: v.half().float() for k, v in run.tuned.state().items()})
    return state["best_step"] if keep_best else 0 if diverged else state["step"]


def write_patch(run: Run, out: Path, state: dict, metric: dict) -> None:
    """The dense patch and, for plain MeZO, its seed trajectory up to the kept step (kilobytes)."""
    config, tuned = run.config, run.tuned
    patch_metadata = {
        "zolite.model": _model_reference(config.model), "zolite.arch": run.loaded.model.config.model_type,
        "zolite.layer": ",".join(map(str, run.indices)), "zolite.base_sha256": run.base_sha256,
        "zolite.task": config.task, "zolite.steps": str(state["step"]), "zolite.metric": metric,
        "zolite.hparams": dataclasses.asdict(config)}
    source = source_record(run.loaded.path)
    if source:   # the GGUF file the base was read from: `export --format gguf` refuses it once it changed
        patch_metadata["zolite.source_sha256"] = source["sha256"]
    if isinstance(run.task, CustomTask):   # its template, so the patch applies without the task's files
        patch_metadata["zolite.task_spec"] = {k: v for k, v in run.task.spec.to_dict().items() if k != "data"}
    save_patch(out, tuned.state(), patch_metadata, force=True)
    if run.stepper.plain() and run.stepper.updates is not None:   # seeds: kilobytes
        returned = run.guard.returned if run.guard else []   # the updates a return to kept weights undid: left out
        updates = run.stepper.updates
        trajectory = [(updates[i][0][0], updates[i][1][0]) for i in effective_updates(metric["kept_step"], returned)]
        save_trajectory(trajectory_path(out), trajectory, {
            **patch_metadata, "zolite.dense_sha256": fingerprint(tuned.state()),
            "zolite.trained_on": run.trained_on}, force=True, scales=tuned.scale_tensors())   # checked up front


def write_report(run: Run, run_dir: Path, out: Path, state: dict, final: dict, metric: dict, profiler,
                 t_start: float) -> dict:
    """report.json (the run's summary, returned), report.md and memory.png."""
    config, loaded = run.config, run.loaded
    step_ms = 1000 * state["train_s"] / max(1, len(state["losses"]))
    memory_profile = profiler.report(run.static, extra={
        "step_ms": round(step_ms, 2), "plan": run.plan.reason if run.plan else None,
        "tokens_per_s": round(state["tokens"] / state["train_s"], 1) if state["train_s"] and state["tokens"] else None})

    report = {
        "patch": str(out), "run_dir": str(run_dir), "config": dataclasses.asdict(config),
        "model": {"name": config.model, "path": str(loaded.path), "arch": loaded.model.config.model_type,
                  "num_layers": run.num_layers, "dtype": str(loaded.dtype).removeprefix("torch."),
                  "device": str(loaded.device)},
        "recipe": run.recipe,
        "layers": format_layers(run.indices, run.num_layers), "layer_source": run.layer_source,
        "tuned_params": run.tuned.numel(), "base_sha256": run.base_sha256,
        "data": {"source": run.splits.source, "rows_in_file": run.splits.total_rows, "counts": run.splits.counts},
        "steps": state["step"], "kept_step": metric["kept_step"], "forward_passes": run.stepper.forwards,
        "lr": {**{k: v for k, v in run.lr_choice.items() if k not in ("guard_reference", "base_losses")},
               "schedule": config.lr_schedule,
               "backoffs": run.guard.backoffs if run.guard else None,
               "returned": run.guard.returned if run.guard and run.guard.returns else None},
        "activation_scales": scale_summary(run.tuned.scale_tensors()) if run.tuned.scale_tensors() else None,
        "diverged_at_step": state.get("diverged_at"), "devices": state["devices"],
        "distributed": _exchange_report(run, state),
        "final": final, "val_curve": state["val"], "loss_curve": state["losses"],
        "timing": {"load_s": round(run.load_s, 2), "train_s": round(state["train_s"], 2),
                   "step_ms": round(step_ms, 2),
                   "total_s": round(time.perf_counter() - t_start, 2),
                   "cuda_graphs": run.stepper.graphs.summary() if run.stepper.graphs else None},
        "memory": profiler.peaks(), "memory_profile": memory_profile,
        "plan": run.plan.as_dict() if run.plan else None,
    }
    write_json(run_dir / "report.json", report)
    title = (f"zolite tune {config.model} / {config.task}, layers {report['layers']}, mode {loaded.mode}, "
             f"{report['model']['dtype']}")
    summary = (f"Steps {state['step']}, batch {config.batch_size} (micro-batch {config.micro_batch}), "
               f"{step_ms:.1f} ms/step; val {metric['val']}; patch {out}.")
    write_memory_report(memory_profile, run_dir, title, summary)
    return report


def _exchange_report(run: Run, state: dict) -> dict:
    """The run's processes and what one step exchanged: the payload of its all_reduces (float64 sums of l+, l- and
    rows; one per z), measured over this process's steps."""
    steps, sent, reduces = run.exchange
    return {"world_size": run.world.size, "world_sizes": state.get("world_sizes", [run.world.size]),
            "backend": run.world.backend, "bytes_per_step": sent / steps if steps else 0,
            "all_reduces_per_step": reduces / steps if steps else 0}


def checkpoint(run: Run, run_dir: Path, best, state: dict) -> None:
    """Rank 0 writes the run's checkpoint (every rank holds the same weights and state)."""
    if run.world.main:
        _save(run_dir, run.tuned, run.stepper, best, state, run.trained_on)


def _model_reference(model: str) -> str:
    """The base as a patch names it: a profile or hub id as given, a local folder or file by its absolute path (so
    apply without --model finds it from any folder)."""
    return str(Path(model).resolve()) if Path(model).exists() else model


def _save(run_dir, tuned, stepper, best, state, trained_on: str) -> None:
    """Checkpoint the loop's state with, for ZO runs, every step's seeds and projected gradients (a seed checkpoint:
    kilobytes, replayed on resume), else (backprop) the layers as stored, the best weights and the optimiser's
    buffers (opt/...)."""
    tensors, scalars = stepper.state()
    state = {**state, "optimizer": scalars, "trained_on": trained_on}
    scales = {f"{k}#scale": v for k, v in tuned.scale_tensors().items()}   # measured: saved, not recomputed
    if stepper.updates is not None:
        save_checkpoint(run_dir, scales, None, {**state, "updates": stepper.updates,
                                                "replay_sha256": fingerprint(tuned.exact_state(), as_stored=True)})
    else:
        save_checkpoint(run_dir, {**tuned.exact_state(), **{f"opt/{k}": v for k, v in tensors.items()}, **scales},
                        best, state)


def _saved_scales(saved) -> dict:
    """The activation scales a checkpoint holds (none: a fresh run, or another eps scale)."""
    return {k.removesuffix("#scale"): v for k, v in saved[0].items() if k.endswith("#scale")} if saved else {}


def _resume(saved, run: Run, run_dir) -> tuple[dict | None, dict]:
    """Put the checkpoint's weights and optimiser state back; returns (best weights, the loop's state, its devices
    with this one added: a run resumed on another GPU model has its later losses from that GPU). The guard's state
    is already replayed from the losses: its returns and kept weights are replayed with the updates."""
    tuned, stepper, trained_on = run.tuned, run.stepper, run.trained_on
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

    def after_step(step: int) -> None:
        if run.guard is not None:   # (the updates carry their lr factors; train_step sets the next one)
            follow_guard(run, run.guard.action_at(step), step)
        if step == state["best_step"]:
            best.update(_cpu_copy(tuned.state()))
    after_step(0)
    stepper.replay(updates, after_step)
    # another GPU model (or torch) may draw the same z or not: the replayed weights' digest decides
    if fingerprint(tuned.exact_state(), as_stored=True) != state.pop("replay_sha256", None):
        raise mismatch
    stepper.load(None, scalars)
    return best or None, state


def _cpu_copy(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The best weights so far, kept off the GPU."""
    return {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}


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
