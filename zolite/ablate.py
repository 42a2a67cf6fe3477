"""`zolite ablate`: run a plan of tune variants (arms) over seeds, resume where it stopped, and tabulate.

A plan is a TOML file (the built-in ones are in zolite/plans/): [defaults] tune options for every arm, and one
[[arm]] per variant with its own options. `lr` (absolute) or `lr_scale` (times the model profile's lr) may be a
list: seed 0 runs each value and the one with the best val score is used for the other seeds (test rows never
decide). `steps_factor` scales the steps (same-forward-budget arms); `layer = "last"` / `"random"` are resolved per
model ("random": a fixed draw that is never the dominant layer).

Every run is a normal tune run folder (OUT/ARM/lr<LR>-s<SEED>): a finished one (report.json) is read back, an
unfinished one resumed from its checkpoint. Results: OUT/results.csv, OUT/results.md, OUT/accuracy.png, OUT/loss.png.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import random
import statistics
import sys
from importlib import resources
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .checkpoint import CheckpointDevice
from .errors import ZoliteError, check_at_least
from .inputs import read_json
from .io import config_mismatch, write_text
from .layers import format_layers, parse_layers

ARM_KEYS = {"name", "lr", "lr_scale", "steps_factor"}


def plan_names() -> list[str]:
    return sorted(f.name[:-5] for f in (resources.files("zolite") / "plans").iterdir() if f.name.endswith(".toml"))


def load_plan(plan: str) -> dict:
    """A built-in plan by name, or a TOML file; checked up front (unknown tune options or value types, duplicate arm
    names)."""
    builtin = resources.files("zolite") / "plans" / f"{plan}.toml"
    try:
        text = builtin.read_text() if builtin.is_file() else Path(plan).read_text()
    except OSError:
        raise ZoliteError(f"unknown plan '{plan}': not a built-in plan ({', '.join(plan_names())}) "
                          "nor a readable TOML file") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ZoliteError(f"plan {plan} is not valid TOML: {e}") from None
    arms, defaults = data.get("arm", []), data.get("defaults", {})
    if not isinstance(arms, list) or not all(isinstance(a, dict) for a in arms):
        raise ZoliteError(f"plan {plan}: arms are tables written [[arm]] (two brackets), not [arm] or arm = ...")
    if not arms:
        raise ZoliteError(f"plan {plan} has no [[arm]] entries")
    if not isinstance(defaults, dict):
        raise ZoliteError(f"plan {plan}: defaults is a table, written [defaults]")
    names = [a.get("name") for a in arms]
    if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise ZoliteError(f"plan {plan}: every [[arm]] needs a unique name")
    for arm in [defaults, *arms]:
        _check_arm(plan, arm.get("name", "[defaults]"), arm)
    return {"name": data.get("name", Path(plan).stem), "description": data.get("description", ""),
            "defaults": defaults, "arms": arms}


def _check_arm(plan: str, where: str, arm: dict) -> None:
    """Option names and value types of an arm (or of [defaults]), so a typo fails here in one line, not in a run."""
    from .tune_setup import TuneConfig

    fields = {f.name: f.type for f in dataclasses.fields(TuneConfig)}
    unknown = set(arm) - set(fields) - ARM_KEYS
    if unknown:
        raise ZoliteError(f"plan {plan}: unknown option(s) {', '.join(sorted(unknown))} in {where}; use zolite "
                          "tune's option names (e.g. n_z, eps)")
    if "recipe" in arm:
        raise ZoliteError(f"plan {plan}: recipe in {where}: a plan's arms run without the profile's task recipes; "
                          "write the recipe's options into the arm instead")
    fixed = {"model", "task", "seed"} & set(arm)
    if fixed:
        raise ZoliteError(f"plan {plan}: {', '.join(sorted(fixed))} in {where} is set by zolite ablate's --model / "
                          "--task / --seeds, not by a plan; remove it")
    number = (int, float)
    for key, value in arm.items():
        if key in ("lr", "lr_scale"):
            ok = all((isinstance(v, number) and not isinstance(v, bool) and v > 0) or (key == "lr" and v == "auto")
                     for v in (value if isinstance(value, list) else [value]))
            want = "a number above 0 (lr: or \"auto\") or a list of them"
        elif key == "steps_factor":
            ok, want = isinstance(value, number) and not isinstance(value, bool) and value > 0, "a number above 0"
        elif key == "name":
            continue
        elif key == "layer":   # 11, "11", "3,5", "all", "last", "random", "auto"
            ok, want = isinstance(value, (int, str)) and not isinstance(value, bool), "a layer number or a string"
        else:
            kind = fields[key].split("|")[0].strip()   # "int | None" -> int
            types = {"int": (int,), "float": number, "str": (str,), "bool": (bool,)}.get(kind, (object,))
            ok = isinstance(value, types) and (kind == "bool" or not isinstance(value, bool))
            want = {"int": "a whole number", "float": "a number", "str": "a string", "bool": "true or false"}.get(kind)
        if not ok:
            raise ZoliteError(f"plan {plan}: {key} = {value!r} in {where} should be {want}")


def _model_facts(model: str) -> dict:
    from .layers import decoder_layers
    from .loading import model_skeleton, resolve_model
    from .scan import cached_dominant_layer, folder_identity
    from .tune_setup import BUILTIN_DEFAULTS

    path, profile = resolve_model(model)
    skeleton = model_skeleton(path)
    num_layers = len(decoder_layers(skeleton)[1])
    dominant, _ = cached_dominant_layer(folder_identity(path, skeleton))
    if dominant is None and profile is not None:
        dominant = profile.dominant_layer
    defaults = {**BUILTIN_DEFAULTS, **(profile.defaults if profile else {})}
    if "eps" not in (profile.defaults if profile else {}):
        defaults.pop("eps")   # tune's choice depends on the load mode (default_eps; _check_folder)
    return {"num_layers": num_layers, "dominant": dominant, "lr": defaults["lr"], "steps": defaults["steps"],
            "defaults": defaults}


def arm_options(arm: dict, defaults: dict, facts: dict, steps: int | None, extra: dict) -> tuple[dict, list[float]]:
    """tune options of an arm (without lr) and its lr grid. lr / lr_scale / steps_factor in [defaults] apply to the
    arms that have none of their own."""
    own_lr = {"lr", "lr_scale"} & set(arm)
    arm = {**{k: v for k, v in defaults.items() if k in ARM_KEYS - {"name"} and not (own_lr and k in ("lr", "lr_scale"))},
           **arm}
    options = {**{k: v for k, v in defaults.items() if k not in ARM_KEYS},
               **{k: v for k, v in arm.items() if k not in ARM_KEYS}, **extra}
    base_steps = steps or options.get("steps") or facts["steps"]
    options["steps"] = max(1, round(base_steps * arm.get("steps_factor", 1.0)))
    layer = options.get("layer")
    if layer == "last":
        options["layer"] = str(facts["num_layers"] - 1)
    elif layer == "random":
        choices = [i for i in range(facts["num_layers"]) if i != facts["dominant"]]
        options["layer"] = str(random.Random(0).choice(choices))
    elif layer is not None and str(layer).strip().lower() != "auto":   # as tune writes it in config.json: 11, "2,1"
        options["layer"] = format_layers(parse_layers(layer, facts["num_layers"]), facts["num_layers"])
    if "lr" in arm:
        grid = arm["lr"] if isinstance(arm["lr"], list) else [arm["lr"]]
    else:
        scales = arm.get("lr_scale", [1.0])
        scales = scales if isinstance(scales, list) else [scales]
        if facts["lr"] == "auto" and scales != [1.0]:
            raise ZoliteError(f"arm {arm['name']}: lr_scale multiplies the profile's lr, and this model's lr is "
                              "probed (auto); give the arm lr = [...] instead")
        grid = ["auto" if facts["lr"] == "auto" else facts["lr"] * s for s in scales]
    if not grid:
        raise ZoliteError(f"arm {arm['name']}: its lr / lr_scale list is empty; give at least one value")
    grid = [lr if lr == "auto" else float(f"{lr:.3g}") for lr in grid]   # as the run folders name them
    if len(set(grid)) != len(grid):
        raise ZoliteError(f"arm {arm['name']}: its lr grid {', '.join(map(lr_name, grid))} repeats a value "
                          "(lrs are kept to 3 significant digits); give each lr once")
    return options, grid


def _run(model, task, run_dir: Path, options: dict, lr: float, seed: int, progress: bool) -> dict:
    from .tune import tune

    report = _finished_report(run_dir)
    if report is None and (run_dir / "checkpoint.safetensors").is_file():
        try:
            report = tune(model, task, resume=run_dir, progress=progress)
        except CheckpointDevice as e:   # its seeds give other z here (another device type, dtype, or generator)
            print(f"zolite: {e}; starting it again", file=sys.stderr)
    if report is None:
        # an arm is the profile's defaults and what it changes, never a task's recipe: a plan means the same on every
        # model, and its run folders are checked against exactly those options
        report = tune(model, task, run_dir=run_dir, force=True, progress=progress, lr=lr, seed=seed, recipe=False,
                      **options)
    return _row(report, lr, seed)


def _check_folder(run_dir: Path, model, task, options: dict, lr: float, seed: int) -> None:
    """Refuse a run folder that holds another run (other task, lr, seed or option): it would be read back, resumed
    or overwritten as this one. Paths are not compared (`data`; of a model folder or task file only the name): the
    same files may sit elsewhere on another machine."""
    from .tune_setup import default_eps, with_new_options

    config_file = run_dir / "config.json"
    if not config_file.is_file():
        return
    config = with_new_options(read_json(config_file, f"give zolite ablate another --out (or move {run_dir} away)"))
    config.update({k: Path(str(config[k])).name for k in ("model", "task") if k in config})
    wanted = {**{k: v for k, v in options.items() if k != "data"},
              "model": Path(str(model)).name, "task": Path(str(task)).name, "lr": lr, "seed": seed}
    if "eps" not in wanted and "mode" in config:   # left to tune, which picks it by the load mode
        wanted["eps"] = default_eps(config["mode"], wanted.get("eps_scale", "absolute"))
    mismatch = config_mismatch(config, wanted)
    if mismatch:
        key, was, want = mismatch
        raise ZoliteError(f"{run_dir} holds a run with {key} = {was!r}, not {want!r}; give zolite ablate "
                          "another --out (or move that folder away)")


def _finished_report(run_dir: Path) -> dict | None:
    report_file = run_dir / "report.json"
    return read_json(report_file, f"delete {run_dir} to run it again") if report_file.is_file() else None


def _row(report: dict, lr: float, seed: int) -> dict:
    """A run's line of the table, from its report."""
    final = report["final"]
    memory = report["memory"]
    losses = report["loss_curve"]
    test_classes = (final.get("test") or {}).get("per_class") or {}
    counts = [c["n"] for c in test_classes.values()]
    val_curve = report.get("val_curve") or []
    return {"lr": lr, "seed": seed, "steps": report["steps"], "layers": report["layers"],
            "lr_used": (report.get("lr") or {}).get("lr", lr),   # what an "auto" lr probed
            "val": final["val"]["score"] if final.get("val") else None,
            "test": final["test"]["score"] if final.get("test") else None,
            "kept_step": report.get("kept_step"),
            # references for reading the scores: always answering the test split's most common label, and the
            # untuned base model's val score (the val check at step 0)
            "test_majority": max(counts) / sum(counts) if counts else None,
            "base_val": val_curve[0][1] if val_curve and val_curve[0][0] == 0 else None,
            "micro_batch": report["config"].get("micro_batch"), "mode": report["config"].get("mode"),
            "forward_passes": report.get("forward_passes"), "wall_s": report["timing"]["total_s"],
            "diverged_at_step": report.get("diverged_at_step"),
            "peak_gib": memory.get("gpu_allocated_peak_gib", memory.get("cpu_rss_peak_gib")),
            "peak_kind": "GPU allocated" if "gpu_allocated_peak_gib" in memory else "CPU RSS",
            "loss_by_25": [statistics.mean(losses[i:i + 25]) for i in range(0, len(losses), 25)]}


def ablate(model: str = "smollm2-135m", task: str = "sst2", *, plan: str = "seed000", seeds: int = 3,
           out=None, steps: int | None = None, arms: str | None = None, progress: bool = True, jobs: int = 1,
           table_only: bool = False, **tune_options) -> dict:
    """Run (or resume) every arm of `plan` over `seeds` seeds; returns the rows and writes the tables and plots.

    The tables are rewritten after every finished run, unfinished arms marked as such, so a cut-off ablation keeps
    what it measured. jobs > 1: up to `jobs` runs at once, each in its own process (a small model leaves a GPU mostly
    idle with one): every arm's seed-0 grid first, then each arm's other seeds as soon as its grid has finished.
    table_only: run nothing, tabulate the runs already finished in `out`."""
    for option, value in (("--seeds", seeds), ("--jobs", jobs), ("--steps", steps)):
        check_at_least(option, value, 1)
    from .tune_setup import BUILTIN_DEFAULTS, TuneConfig, check_options

    plan_ = load_plan(plan)
    selected = plan_["arms"]
    if arms:
        wanted = [a.strip() for a in arms.split(",")]
        missing = set(wanted) - {a["name"] for a in selected}
        if missing:
            raise ZoliteError(f"plan {plan_['name']} has no arm(s) {', '.join(sorted(missing))}; "
                              f"its arms: {', '.join(a['name'] for a in selected)}")
        selected = [a for a in selected if a["name"] in wanted]
    out = Path(out or f"runs/ablate-{Path(model).name}-{task}-{plan_['name']}")
    facts = _model_facts(model)
    extra = {k: v for k, v in tune_options.items() if v is not None}
    results = {"model": model, "task": task, "plan": plan_["name"], "seeds": seeds, "out": str(out), "arms": []}
    entries = []
    for arm in selected:
        options, grid = arm_options(arm, plan_["defaults"], facts, steps, extra)
        for lr in grid:   # values out of range fail now, in one line, not in the middle of the ablation
            check_options(TuneConfig(model=model, task=task, lr=lr, **options))
        entries.append({"name": arm["name"], "options": options, "lr_grid": grid, "picked_lr": None, "runs": []})
    # what a run folder must hold: the options given, and tune's defaults for the rest (a run made with another
    # --batch-size must not be read back as this one); device-chosen ones (mode, dtype, micro-batch, and eps without
    # a profile's) only if given
    run_defaults = {**{f.name: f.default for f in dataclasses.fields(TuneConfig)
                       if f.default is not None and f.name not in ("model", "task", "seed")},
                    **{k: v for k, v in facts["defaults"].items() if k in BUILTIN_DEFAULTS}}

    def job(entry, lr, seed):   # (called in this process before a run starts or is read back)
        run_dir = out / entry["name"] / f"lr{lr_name(lr)}-s{seed}"
        _check_folder(run_dir, model, task, {**run_defaults, **entry["options"]}, lr, seed)
        return (model, task, run_dir, entry["options"], lr, seed)

    def tabulate():   # every arm with a finished run, in the plan's order
        for entry in entries:
            entry["runs"].sort(key=lambda r: (r["seed"], entry["lr_grid"].index(r["lr"]) if r["seed"] == 0 else 0))
        results["arms"] = [e for e in entries if e["runs"]]
        if results["arms"]:
            write_results(results, out)

    if table_only:
        _in_order(entries, job, seeds, _finished_row)
        if not any(e["runs"] for e in entries):
            raise ZoliteError(f"no finished runs of plan {plan_['name']} in {out}; run zolite ablate without "
                              "--table-only first (or give the --out it wrote to)")
        tabulate()
    elif jobs == 1:
        _in_order(entries, job, seeds, lambda args: _run(*args, progress), after=tabulate)
    else:
        _run_parallel(entries, job, seeds, jobs, tabulate)
    results["arms"] = entries
    return results


def _in_order(entries, job, seeds, get, after=lambda: None) -> None:
    """Each arm's seed-0 grid, then (once the grid is complete) its other seeds at the picked lr. get(job args) ->
    the run's row, or None for a run not there (--table-only); after() follows every row."""
    for entry in entries:
        for lr in entry["lr_grid"]:
            _add(entry, get(job(entry, lr, 0)), after)
        if len(entry["runs"]) < len(entry["lr_grid"]):
            continue
        entry["picked_lr"] = _pick(entry["runs"])
        for seed in range(1, seeds):
            _add(entry, get(job(entry, entry["picked_lr"], seed)), after)


def _add(entry, row, after) -> None:
    if row is not None:
        entry["runs"].append(row)
        after()


def _finished_row(args) -> dict | None:
    """The row of a finished run (job args: model, task, run_dir, options, lr, seed); None if it has not finished."""
    _, _, run_dir, _, lr, seed = args
    report = _finished_report(run_dir)
    return _row(report, lr, seed) if report is not None else None


def _pick(runs: list[dict]) -> float:
    """The grid's lr with the best seed-0 val score (the smaller lr on a tie)."""
    return max(runs, key=lambda r: (r["val"] if r["val"] is not None else float("-inf"),
                                    -r["lr"] if r["lr"] != "auto" else 0.0))["lr"]


def lr_name(lr) -> str:
    """An lr as run folders and tables name it: 3e-04 -> 0.0003, "auto" -> auto."""
    return lr if lr == "auto" else f"{lr:g}"


def _init_worker(threads: int, progress_bars: bool, verbosity: int) -> None:
    """A spawned worker: its share of the cores, and transformers' progress bars / logging as in the parent (the
    CLI's --quiet turns them off there; a fresh interpreter would show them again)."""
    import torch
    from transformers.utils import logging

    torch.set_num_threads(threads)
    if not progress_bars:
        logging.disable_progress_bar()
    logging.set_verbosity(verbosity)


def _visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as CUDA_VISIBLE_DEVICES entries (empty without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in listed.split(",") if d.strip()] if listed else []
    return ids[:torch.cuda.device_count()] or [str(i) for i in range(torch.cuda.device_count())]


def _gpu_is_free_to_pick(entries) -> bool:
    """Runs may be dealt over the GPUs unless an arm names its device (--device cuda:1, or cpu)."""
    return all(e["options"].get("device") in (None, "cuda") for e in entries)


def _gpu_tokens(jobs: int, gpus: list[str]) -> list[str | None]:
    """One token per worker, dealt round the GPUs (None for each when there is no choice to make)."""
    return [gpus[i % len(gpus)] if len(gpus) > 1 else None for i in range(jobs)]


def _run_on_a_gpu(gpus, *args) -> dict:
    """_run on the GPU taken from the `gpus` queue (None: as visible), handed back when the run ends. Each run is a
    fresh process (max_tasks_per_child=1), so CUDA_VISIBLE_DEVICES still takes effect here."""
    gpu = gpus.get()
    try:
        if gpu is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = gpu
        return _run(*args)
    finally:
        gpus.put(gpu)


def _forwards(options: dict) -> int:
    """A run's cost in forward passes, to start the long runs first: SPSA 2 per z, residual 1, backprop ~3."""
    per_step = {"fo": 3, "residual": 1}.get(options.get("estimator"), 2 * options.get("n_z", 1))
    return options["steps"] * per_step


def _longest_first(ready: list) -> list:
    """(entry, lr, seed) runs, the most forward passes first (plan order among equals)."""
    return sorted(ready, key=lambda run: -_forwards(run[0]["options"]))


def _run_parallel(entries, job, seeds, jobs, tabulate) -> None:
    """Seed-0 grids of every arm at once, then each arm's other seeds once its grid is in (an arm with one lr: all its
    seeds at once); one process per run, the processes spread evenly over the visible GPUs (each run on one). Of the
    runs ready to start, the longest starts first (so the long arms, and their seeds once their grid is in, do not
    finish last)."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from transformers.utils import logging

    context = multiprocessing.get_context("spawn")   # fresh interpreters: no forked CUDA or torch thread state
    fresh = {"max_tasks_per_child": 1} if sys.version_info >= (3, 11) else {}   # one run per process: clean peaks
    threads = max(1, (os.cpu_count() or 1) // jobs)   # share the cores: torch would give each process all of them
    # one token per worker: a run takes a GPU's token and returns it, so each GPU has jobs/len(gpus) runs at a time
    manager = context.Manager()
    tokens = manager.Queue()
    for token in _gpu_tokens(jobs, _visible_gpus() if fresh and _gpu_is_free_to_pick(entries) else []):
        tokens.put(token)   # (a reused worker, Python 3.10, could not change its GPU)
    ready, waiting = [], {}   # waiting: grid runs still out, then seed runs still out
    for e in entries:
        if len(e["lr_grid"]) == 1:   # nothing to pick: every seed starts now, not after seed 0
            e["picked_lr"] = e["lr_grid"][0]
            ready += [(e, e["picked_lr"], s) for s in range(seeds)]
            waiting[id(e)] = seeds
        else:
            ready += [(e, lr, 0) for lr in e["lr_grid"]]
            waiting[id(e)] = len(e["lr_grid"])
    running = {}
    settings = (threads, logging.is_progress_bar_enabled(), logging.get_verbosity())
    with manager, ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker, initargs=settings,
                                      **fresh) as pool:

        new_rows = False

        def finished(entry, row) -> None:
            nonlocal ready, new_rows
            new_rows = True
            entry["runs"].append(row)
            waiting[id(entry)] -= 1
            if not waiting[id(entry)] and entry["picked_lr"] is None:   # its grid is in: pick, then its seeds
                entry["picked_lr"] = _pick(entry["runs"])
                waiting[id(entry)] = seeds - 1
                ready += [(entry, entry["picked_lr"], s) for s in range(1, seeds)]

        while ready or running:
            ready = _longest_first(ready)
            while ready and len(running) < jobs:   # only `jobs` submitted: the pool's own queue would be FIFO
                entry, lr, seed = ready.pop(0)
                args = job(entry, lr, seed)   # (checks the run folder)
                row = _finished_row(args)
                if row is not None:   # read back here: no process (and no GPU slot) for a run already done
                    finished(entry, row)
                    ready = _longest_first(ready)
                    continue
                running[pool.submit(_run_on_a_gpu, tokens, *args, False)] = entry
            if new_rows:   # once a pass (the runs read back above: one table and plot, not one each)
                tabulate()
                new_rows = False
            if not running:
                continue
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                entry = running.pop(future)
                try:
                    row = future.result()
                except BaseException:
                    for f in running:
                        f.cancel()
                    raise
                finished(entry, row)
        if new_rows:
            tabulate()


def _summary(arm: dict, seeds: int) -> dict:
    """An arm's row: its picked lr's seeds (while its grid is still running, the best lr so far)."""
    grid_runs = [r for r in arm["runs"] if r["seed"] == 0]
    lr = arm["picked_lr"] if arm["picked_lr"] is not None else _pick(grid_runs)
    rs = [r for r in arm["runs"] if r["lr"] == lr]
    tests = [r["test"] for r in rs if r["test"] is not None]
    vals = [r["val"] for r in rs if r["val"] is not None]
    kept = [r["kept_step"] for r in rs if r.get("kept_step") is not None]
    if len(grid_runs) < len(arm["lr_grid"]):
        status = f"lr grid {len(grid_runs)}/{len(arm['lr_grid'])}"
    else:
        status = "done" if len(rs) == seeds else f"seeds {len(rs)}/{seeds}"
    used = sorted({r.get("lr_used", lr) for r in rs})
    lr_text = lr_name(lr) if lr != "auto" else f"auto ({', '.join(f'{u:.3g}' for u in used)})"
    return {"arm": arm["name"], "lr": lr, "lr_text": lr_text, "seeds": len(rs), "status": status,
            "steps": rs[0]["steps"],
            "layers": rs[0]["layers"],
            "test_mean": statistics.mean(tests) if tests else None,
            "test_std": statistics.stdev(tests) if len(tests) > 1 else None,   # one seed: no spread to show
            "val_mean": statistics.mean(vals) if vals else None,
            "kept_step_mean": statistics.mean(kept) if kept else None,
            "forward_passes": rs[0]["forward_passes"], "peak_gib": max(r["peak_gib"] for r in rs),
            # seeds of one arm must have run alike: a differing micro-batch or mode would show here
            "micro_batch": "/".join(sorted({str(r.get("micro_batch")) for r in rs})),
            "mode": "/".join(sorted({str(r.get("mode")) for r in rs})),
            "peak_kind": rs[0]["peak_kind"], "wall_s": statistics.mean(r["wall_s"] for r in rs),
            "diverged": sum(r.get("diverged_at_step") is not None for r in rs)}


def write_results(results: dict, out: Path) -> None:
    from .io import write_json

    out.mkdir(parents=True, exist_ok=True)
    rows = [_summary(a, results["seeds"]) for a in results["arms"]]
    write_json(out / "results.json", results)
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text(out / "results.csv", table.getvalue())
    fmt = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
    majority, base_val = _reference("test_majority", results), _reference("base_val", results)
    lines = [f"# Ablation {results['plan']}: {results['model']} on {results['task']}", "",
             f"References: always answering the test split's most common label scores {fmt(majority)}; the untuned "
             f"base model scores {fmt(base_val)} on val.", "",
             f"Test score mean ± std over seeds at each arm's lr (picked by seed 0's val score from its grid; one "
             f"seed: no ±); forward passes per run (MeZO's count: 2 per z; backprop runs: forwards only, each also "
             f"has a backward pass); diverged = seeds whose loss became inf/nan (their "
             f"patch keeps the best val weights); kept step = the step whose weights the patch keeps (best val "
             f"score; 0 = no val check beat the base model, so the patch is the base); status: done, or how much of "
             f"the arm's lr grid / seeds has finished; peak memory = {rows[0]['peak_kind']}.", "",
             "| arm | layers | lr | steps | forward passes | test (mean ± std) | seeds | status | diverged | val (mean) "
             "| kept step (mean) | peak GiB | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kept = "-" if r["kept_step_mean"] is None else f"{r['kept_step_mean']:.0f}"
        test = fmt(r["test_mean"]) + ("" if r["test_std"] is None else f" ± {r['test_std']:.4f}")
        lines.append(f"| {r['arm']} | {r['layers']} | {r['lr_text']} | {r['steps']} | {r['forward_passes']} | "
                     f"{test} | {r['seeds']} | {r['status']} | {r['diverged']} | "
                     f"{fmt(r['val_mean'])} | {kept} | {r['peak_gib']:.2f} | {r['wall_s']:.0f} |")
    lines += ["", "lr grids (seed 0's val score):", ""]
    for a in results["arms"]:
        seed0 = ", ".join(f"{lr_name(r['lr'])}: {fmt(r['val'])}" for r in a["runs"] if r["seed"] == 0)
        lines.append(f"- {a['name']}: {seed0}; options {json.dumps(a['options'], sort_keys=True)}")
    write_text(out / "results.md", "\n".join(lines) + "\n")
    _plot(results, rows, out)


def _reference(key: str, results: dict) -> float | None:
    """A run-independent figure (same data, same base model), read from the first run that has it."""
    return next((r[key] for a in results["arms"] for r in a["runs"] if r.get(key) is not None), None)


def _plot(results: dict, rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows)), 4))
    ax.bar(range(len(rows)), [r["test_mean"] or 0 for r in rows], yerr=[r["test_std"] or 0 for r in rows], capsize=3)
    majority = _reference("test_majority", results)
    if majority is not None:
        ax.axhline(majority, color="grey", linestyle="--", linewidth=1, label="most common label")
        ax.legend(fontsize=8, loc="lower right")
    labels = [r["arm"] + ("" if r["status"] == "done" else f" ({r['status']})") for r in rows]
    ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=8)
    ax.set(ylabel="test score (mean ± std)", title=f"{results['model']} / {results['task']}: {results['plan']}")
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for i, (a, row) in enumerate(zip(results["arms"], rows)):
        curves = [r["loss_by_25"] for r in a["runs"] if r["lr"] == row["lr"]]
        n = min(len(c) for c in curves)
        # ten colours x three line styles: every arm of a 24-arm plan tells apart from the others
        ax.plot([25 * i for i in range(n)], [statistics.mean(c[i] for c in curves) for i in range(n)], label=a["name"],
                color=f"C{i % 10}", linestyle=("-", "--", ":")[i // 10 % 3])
    ax.set(xlabel="step", ylabel="training loss (25-step means; ZO: at W ± eps z)",
           title=f"{results['model']} / {results['task']}: loss curves (mean over the picked lr's seeds)")
    ax.legend(fontsize=6, ncol=1 + len(rows) // 16, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)
