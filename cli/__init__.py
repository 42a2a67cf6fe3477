"""The `zolite` command: parse, call zolite.*, print. No logic lives here."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from zolite.errors import ZoliteError, check_at_least


class ZoliteGroup(click.Group):
    """Turn a ZoliteError, or the GPU running out of memory, into one line on stderr and exit code 2, with no
    traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ZoliteError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except Exception as e:
            torch = sys.modules.get("torch")   # not imported at the top: `zolite --help` stays quick
            if torch is None or not isinstance(e, torch.OutOfMemoryError):
                raise
            first = str(e).splitlines()[0] if str(e) else "CUDA out of memory"
            click.echo(f"error: the GPU ran out of memory ({first[:160]}); lower --batch-size, --micro-batch or "
                       "--max-length where the command has them, or let tune / profile plan for a budget with "
                       "--gpu-memory", err=True)
            sys.exit(2)


def custom_task_options(command):
    """--template/--candidates/--label-field/--answer-field: a custom task from `--task FILE.jsonl`."""
    for option in reversed([
        click.option("--template", help="Custom task: prompt with {field} slots, e.g. \"Review: {text} Sentiment:\"."),
        click.option("--candidates", help="Custom classification task: comma-separated answers, e.g. \"negative,positive\"."),
        click.option("--label-field", help="Custom task: the field holding the gold candidate (text or index).  [default: label]"),
        click.option("--answer-field", help="Custom generation task: the field holding the answer (string or list)."),
    ]):
        command = option(command)
    return command


mode_option = click.option(
    "--mode", metavar="fp16|int8|nf4|offload",
    help="fp16: no quantization (weights in --dtype); nf4 / int8: bitsandbytes (int8 rounds activations too, which "
         "swamps ZO's signal below eps 1e-2); offload: weights in CPU memory, streamed to the GPU. The tuned / "
         "patched layers stay unquantized on the GPU.  [default: nf4 on a GPU unless the profile says otherwise; "
         "fp16 on the CPU]")


def report_options(files: str, default: str):
    """--out/--force/--device/--dtype/--json of the commands that write a report folder."""
    def add(command):
        for option in reversed([
            click.option("--out", type=click.Path(), help=f"Folder for {files}.  [default: {default}]"),
            click.option("--force", is_flag=True, help="Overwrite an existing --out folder."),
            click.option("--device"),
            click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"])),
            click.option("--json", "as_json", is_flag=True, help="Print the result as JSON."),
        ]):
            command = option(command)
        return command
    return add


def default_out(kind: str, model: str, suffix: str = "") -> str:
    import re

    return f"runs/{kind}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', Path(model).name)}{suffix}"


def _quiet_transformers():
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


@click.group(cls=ZoliteGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="zolite")
def main():
    """Zeroth-order fine-tuning of one dominant decoder layer. Layer indices are 0-based everywhere."""
    _quiet_transformers()


@main.command()
@click.option("--model", default="smollm2-135m", show_default=True,
              help="Profile name (see `zolite models`), local HF folder, .gguf file or hub id.")
@click.option("--task", default="sst2", show_default=True,
              help="Task name (see `zolite tasks`), or your own FILE.jsonl (with --template) or TASK.toml.")
@custom_task_options
@click.option("--layer", "--layers", "layer", default=None,
              help="Decoder layer(s) to tune, 0-based: N, N,M, 'all' (full-model MeZO) or 'auto' (the default: the "
                   "dominant layer from this model's cached `zolite scan`, else its profile, else a scan now).")
@click.option("--steps", type=int, help="ZO steps. Default: the profile's.")
@click.option("--lr", type=float, help="Learning rate. Default: the profile's.")
@click.option("--eps", type=float, help="Perturbation scale (absolute). Default: the profile's.")
@click.option("--batch-size", type=int, help="Examples per step. Default: the profile's.")
@click.option("--weight-decay", type=float, help="MeZO weight decay on matrices.  [default: 0]")
@click.option("--estimator", type=click.Choice(["spsa", "residual", "fo"]),
              help="spsa: MeZO's two-point estimate; residual: one-point residual feedback (one forward per step); "
                   "fo: backprop into the tuned layers (the first-order baseline).  [default: spsa]")
@click.option("--n-z", type=int, help="Perturbations per step (spsa), averaged.  [default: 1]")
@click.option("--eps-scale", type=click.Choice(["absolute", "relative"]),
              help="absolute: W + eps z, z ~ N(0, 1) per weight; relative: each tensor's eps times the RMS of its "
                   "base weights (the update follows the same scaling).  [default: absolute]")
@click.option("--optimizer", type=click.Choice(["sgd", "momentum", "adam", "sign"]), help="[default: sgd]")
@click.option("--momentum", type=float, help="Momentum of --optimizer momentum.  [default: 0.9]")
@click.option("--layerwise/--no-layerwise", default=None,
              help="Scale each tensor's step by ||W|| / ||update|| (lr becomes a relative step).  [default: off]")
@click.option("--eval-every", type=int, help="Score val and checkpoint every N steps (0: never).")
@click.option("--seed", type=int, help="Seed of the perturbations and batch order.  [default: 0]")
@click.option("--data-seed", type=int, help="Seed of the train/val/test split (keep it fixed to compare runs).  [default: 0]")
@click.option("--objective", type=click.Choice(["ce", "lm", "accuracy", "f1"]),
              help="ce: cross-entropy over candidates; lm: gold-answer LM loss; accuracy (classification) / f1 "
                   "(generation): minus the batch's metric, non-differentiable.  [default: ce; lm for generation tasks]")
@click.option("--keep", type=click.Choice(["best", "last"]), help="Patch the best-val weights or the last.  [default: best]")
@click.option("--max-length", type=int, help="Longest prompt+answer in tokens (prompts are cut from the left).")
@mode_option
@click.option("--int8-threshold", type=float, help="LLM.int8 outlier threshold (0: no fp16 outlier path).  [default: 6.0]")
@click.option("--gpu-memory", help="Fit the run in this much GPU memory (e.g. 8GiB): picks --mode and --micro-batch, "
              "says why, and caps the allocator there.  [default: as asked; a smaller micro-batch (or offload) only where "
              "the run would not fit the GPU's free memory]")
@click.option("--micro-batch", type=int, help="Examples per forward; the batch's losses are the same, memory is lower.  [default: the batch]")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), help="Model dtype. Default: fp32 on CPU, the profile's on GPU.")
@click.option("--device", help="cpu, cuda, cuda:1... Default: cuda when available.")
@click.option("--data", help="Folder holding TASK/train.jsonl(.gz) or TASK.jsonl, or one JSONL file.")
@click.option("--test", "eval_test", is_flag=True, default=None, help="Also score the held-out test rows at the end.")
@click.option("--run-dir", type=click.Path(), help="Run folder (config, checkpoint, report). Default: runs/MODEL-TASK-LLAYER-sSEED.")
@click.option("--out", type=click.Path(), help="Patch path. Default: RUN_DIR/patch.safetensors.")
@click.option("--resume", type=click.Path(), help="Continue the run in this folder from its last checkpoint.")
@click.option("--force", is_flag=True, help="Overwrite an existing run folder or patch.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def tune(ctx, model, task, run_dir, out, resume, force, as_json, quiet, **options):
    """Tune one decoder layer with MeZO and write a patch."""
    import zolite

    if resume is not None:  # model/task/options must match the folder's; only those typed are checked
        given = lambda name: ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE
        model = model if given("model") else None
        task = task if given("task") else None
    report = zolite.tune(model, task, run_dir=run_dir, out=out, force=force, resume=resume,
                         progress=not quiet, **options)
    summary = {k: report[k] for k in ("patch", "run_dir", "layers", "steps", "kept_step", "tuned_params", "timing", "memory")}
    summary["metric"] = (report["final"]["val"] or {}).get("metric")
    summary["val_score"] = report["final"]["val"]["score"] if report["final"]["val"] else None
    if "test" in report["final"]:
        summary["test_score"] = report["final"]["test"]["score"]
    if as_json:
        click.echo(json.dumps(summary))
    else:
        click.echo(f"patch: {summary['patch']} (layer {summary['layers']}, {summary['tuned_params']:,} params, "
                   f"{summary['steps']} steps, kept step {summary['kept_step']})")
        for part in ("val", "test"):
            if report["final"].get(part):
                r = report["final"][part]
                click.echo(f"{part} {r['metric']}: {r['score']:.4f} on {r['n']} rows")
        click.echo(f"report: {report['run_dir']}/report.json")


def _print_eval(result: dict):
    rows = [("zero-shot", result["zero_shot"])] + ([("patched", result["patched"])] if "patched" in result else [])
    click.echo(f"{result['task']} {result['split']}: {result['rows']} rows from {result['source']}")
    for name, r in rows:
        lo, hi = r["ci95"]
        counts = f"{r['correct']}/{r['n']}" if "correct" in r else f"EM {r['em']:.4f}, n={r['n']}"
        click.echo(f"  {name:<9} {r['metric']} {r['score']:.4f}  (95% CI {lo:.4f}-{hi:.4f}, {counts})")


@main.command("eval")
@click.option("--model", default="smollm2-135m", show_default=True, help="Profile, local folder, .gguf or hub id.")
@click.option("--task", default="sst2", show_default=True, help="Task name, or FILE.jsonl (with --template) or TASK.toml.")
@custom_task_options
@click.option("--patch", type=click.Path(), help="Also score this patch on the same rows.")
@click.option("--split", type=click.Choice(["test", "val", "train"]), default="test", show_default=True)
@click.option("--data", help="Folder holding TASK/train.jsonl(.gz) or TASK.jsonl, or one JSONL file.")
@click.option("--data-seed", type=int, help="Seed of the train/val/test split.  [default: the patch's, else 0]")
@click.option("--limit", type=int, help="Score only the first N rows of the split.")
@click.option("--max-length", type=int, default=512, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True, help="Sequences per forward (lower it on a small GPU).")
@click.option("--device")
@mode_option
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]))
@click.option("--json", "as_json", is_flag=True)
def eval_(model, task, patch, split, data, data_seed, limit, max_length, batch_size, device, dtype, mode, as_json,
          **task_options):
    """Zero-shot vs patched score (accuracy, or F1/EM) on the same rows."""
    import zolite

    result = zolite.evaluate(model, task, patch=patch, split=split, data=data, data_seed=data_seed, limit=limit,
                             max_length=max_length, batch_size=batch_size, device=device, dtype=dtype, mode=mode,
                             **task_options)
    click.echo(json.dumps(result)) if as_json else _print_eval(result)


@main.command()
@click.argument("patches", nargs=-1, required=True)
@click.option("--model", default=None, help="Base model. Default: the one named in the patch.")
@click.option("--prompt", help="Generate a continuation of this text.")
@click.option("--chat", is_flag=True, help="Wrap --prompt in the model's chat template.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--eval", "eval_task", help="Score this task's test rows, zero-shot and patched.")
@click.option("--input", "input_file", type=click.Path(), help="Classify each row of this JSONL file with the patch's task.")
@click.option("--route-field", default="patch", show_default=True,
              help="With several NAME=PATH patches and --input: the row field naming the patch to use.")
@click.option("--data", help="Data folder for --eval.")
@click.option("--limit", type=int, help="With --eval: only the first N test rows.")
@click.option("--device")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]))
def apply(patches, model, prompt, chat, max_new_tokens, eval_task, input_file, route_field, data, limit, device, dtype):
    """Load the base, check the patch(es) fit, then generate, evaluate or classify.

    Several patches (NAME=PATH ...) are attached to one loaded base and each --input row is routed to the patch its
    --route-field names, with one swap per patch."""
    import zolite
    from zolite.tasks import get_task

    if sum(x is not None for x in (prompt, eval_task, input_file)) != 1:
        raise ZoliteError("pass exactly one of --prompt TEXT, --eval TASK or --input FILE.jsonl")
    check_at_least("--max-new-tokens", max_new_tokens, 1)   # before the model loads
    if len(patches) > 1 or "=" in patches[0]:
        if input_file is None:
            raise ZoliteError("several patches need --input FILE.jsonl, each row naming its patch in --route-field")
        return _apply_routed(patches, model, input_file, route_field, device, dtype)
    patch = patches[0]
    p = zolite.load_patch(patch)
    model = model or p.metadata.get("zolite.model")
    if eval_task is not None:
        return _print_eval(zolite.evaluate(model, eval_task, patch=patch, data=data, limit=limit,
                                           device=device, dtype=dtype))
    task = get_task(p.task, need_data=False, **p.task_options()) if input_file is not None else None
    loaded = zolite.load_model(model, device=device, dtype=dtype, keep_layers=p.layers)   # the patched layers unquantized
    zolite.apply_patch(loaded.model, p)
    if prompt is not None:
        click.echo(zolite.generate(loaded.model, loaded.tokenizer, prompt, max_new_tokens=max_new_tokens, chat=chat))
        return
    for prediction in zolite.classify_file(loaded.model, loaded.tokenizer, task, input_file):
        click.echo(json.dumps(prediction))


def _apply_routed(patches, model, input_file, route_field, device, dtype):
    """Classify each row with the patch it names; rows grouped by patch, printed in file order."""
    from zolite.data import iter_rows
    from zolite.predict import classify_rows, task_row
    from zolite.serve import parse_named
    from zolite.swap import load_with_patches
    from zolite.tasks import get_task

    loaded, patch_set = load_with_patches(model, parse_named(list(patches)), device=device, dtype=dtype)
    groups: dict[str, list[dict]] = {}
    for row in iter_rows(input_file):
        name = row.get(route_field)
        if name not in patch_set.names():
            raise ZoliteError(f"{input_file} line {row['_line']}: {route_field}={name!r} is not one of the patches "
                              f"({', '.join(patch_set.names())})")
        groups.setdefault(name, []).append(row)
    predictions = []
    for name, rows in groups.items():
        p = patch_set.patches[name]["patch"]
        task = get_task(p.task, need_data=False, **p.task_options())
        rows = [task_row(task, row, input_file) for row in rows]
        patch_set.swap(name)
        predictions += [dict(pred, patch=name) for pred in classify_rows(loaded.model, loaded.tokenizer, task, rows)]
    for prediction in sorted(predictions, key=lambda r: r["line"]):
        click.echo(json.dumps(prediction))


@main.command()
@click.option("--model", default="smollm2-135m", show_default=True, help="Profile, local folder, .gguf or hub id.")
@mode_option
@click.option("--prompts", type=int, default=32, show_default=True, help="Calibration prompts to run.")
@click.option("--text", help="Calibration text: a task name (its train prompts) or a .txt file (one prompt per line).  [default: bundled generic text]")
@click.option("--magnitude", type=float, default=100.0, show_default=True, help="Outlier rule: max |h| at least this.")
@click.option("--ratio", type=float, default=1000.0, show_default=True, help="Outlier rule: max |h| at least this times the layer's median |h|.")
@click.option("--share", type=float, default=0.5, show_default=True, help="Outlier rule: in at least this fraction of the prompts (0: any one).")
@click.option("--seeds", type=int, default=3, show_default=True, help="Seeds of the per-layer sensitivity probe (0: skip it).")
@click.option("--eps", type=float, default=1e-3, show_default=True, help="Perturbation scale of the sensitivity probe.")
@report_options("report.json, report.md and scan.png", "runs/scan-MODEL")
def scan(model, out, as_json, **options):
    """Find the dominant layer by inference only (0-based layer indices); cached for `tune --layer auto`."""
    from zolite.scan import markdown, scan as run_scan

    out = out or default_out("scan", model)
    result = run_scan(model, out=out, **options)
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(markdown(result))
    click.echo(f"report: {out}/report.md, {out}/report.json, {out}/scan.png")


@main.command()
@click.option("--model", default="smollm2-135m", show_default=True, help="Profile, local folder, .gguf or hub id.")
@mode_option
@click.option("--batch-size", "--batch", "batch_size", type=int, default=16, show_default=True, help="Examples per step.")
@click.option("--seq-len", type=int, default=256, show_default=True, help="Tokens per example (random tokens).")
@click.option("--steps", type=int, default=5, show_default=True, help="ZO steps to run (the first is a warm-up).")
@click.option("--layer", "--layers", "layer", help="Layer(s) to tune, 0-based, or all.  [default: the dominant layer]")
@click.option("--micro-batch", type=int, help="Examples per forward.  [default: the batch, or the plan's]")
@click.option("--gpu-memory", help="Plan mode and micro-batch for this budget (e.g. 8GiB), as tune does.")
@click.option("--int8-threshold", type=float, help="LLM.int8 outlier threshold.  [default: 6.0]")
@click.option("--snapshot", is_flag=True, help="Also write a torch CUDA memory snapshot (memory_snapshot.pickle).")
@report_options("report.json, report.md and memory.png", "runs/profile-MODEL-MODE")
def profile(model, out, as_json, **options):
    """Where the memory and time of a ZO step go: per phase, by part, for a batch shape (random tokens)."""
    import zolite

    out = out or default_out("profile", model, f"-{options['mode'] or 'default'}")
    result = zolite.profile_memory(model, out=out, **options)
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(Path(out, "report.md").read_text())
    click.echo(f"report: {out}/report.md, {out}/report.json, {out}/memory.png")


@main.command()
@click.option("--model", default="smollm2-135m", show_default=True, help="Profile, local folder, .gguf or hub id.")
@click.option("--task", default="sst2", show_default=True, help="Task name (see `zolite tasks`).")
@click.option("--plan", default="seed000", show_default=True, help="A built-in plan (zolite/plans/) or a TOML file.")
@click.option("--seeds", type=int, default=3, show_default=True, help="Seeds per arm (0..N-1).")
@click.option("--arms", help="Only these arms of the plan, comma-separated.")
@click.option("--steps", type=int, help="Steps of a run before each arm's steps_factor.  [default: the profile's]")
@click.option("--out", type=click.Path(), help="Folder of the runs and tables.  [default: runs/ablate-MODEL-TASK-PLAN]")
@click.option("--data", help="Folder holding TASK/train.jsonl(.gz) or TASK.jsonl.")
@click.option("--batch-size", type=int, help="Examples per step.  [default: the profile's]")
@click.option("--eval-every", type=int, help="Score val every N steps.  [default: the profile's]")
@mode_option
@click.option("--device")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]))
@click.option("--jobs", type=int, default=1, show_default=True,
              help="Runs at once, each in its own process (a small model leaves a GPU mostly idle with one), spread evenly over the visible GPUs.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--table-only", is_flag=True, help="Run nothing: tabulate the runs already finished in --out.")
def ablate(model, task, plan, seeds, arms, steps, out, jobs, quiet, table_only, **tune_options):
    """Run a plan of tune variants over seeds (resuming finished and cut-off runs); writes CSV, markdown and plots."""
    import zolite

    result = zolite.ablate(model, task, plan=plan, seeds=seeds, arms=arms, steps=steps, out=out, jobs=jobs,
                           progress=not quiet and jobs == 1, table_only=table_only, **tune_options)
    out = result["out"]
    click.echo(Path(out, "results.md").read_text())
    click.echo(f"results: {out}/results.md, {out}/results.csv, {out}/accuracy.png, {out}/loss.png")


@main.group()
def patch():
    """Inspect and convert patch files (dense weights or a seed trajectory)."""


@patch.command("info")
@click.argument("file", type=click.Path())
@click.option("--json", "as_json", is_flag=True)
def patch_info(file, as_json):
    """Metadata, size, kind and the base a patch fits."""
    from zolite.patch import load_patch

    p = load_patch(file)
    info = {"file": str(file), "bytes": Path(file).stat().st_size, "kind": p.metadata.get("zolite.kind", "dense"),
            "model": p.metadata.get("zolite.model"), "arch": p.metadata.get("zolite.arch"),
            "layers": p.metadata.get("zolite.layer"), "base_sha256": p.metadata.get("zolite.base_sha256"),
            "task": p.metadata.get("zolite.task"), "steps": p.metadata.get("zolite.steps"),
            "tensors": len(p.tensors), "metadata": p.metadata}
    if as_json:
        click.echo(json.dumps(info))
        return
    click.echo(f"{file}: {info['kind']} patch, {info['bytes']:,} bytes")
    click.echo(f"  fits: {info['model']} ({info['arch']}), layer(s) {info['layers']} (0-based), base fingerprint "
               f"{info['base_sha256'][:16]}...")
    click.echo(f"  task {info['task']}, {info['steps']} steps; metric {p.metadata.get('zolite.metric')}")
    if info["kind"] == "trajectory":
        click.echo(f"  {p.metadata['zolite.trajectory_steps']} seeded steps; trained on {p.metadata.get('zolite.trained_on')}")


@patch.command("convert")
@click.argument("file", type=click.Path())
@click.option("--to", "to", type=click.Choice(["dense"]), default="dense", show_default=True,
              help="dense: replay a trajectory into weights. (A dense patch cannot become seeds: tune writes "
                   "the trajectory beside it, PATCH.trajectory.safetensors.)")
@click.option("--out", type=click.Path(), required=True)
@click.option("--model", help="Base model.  [default: the one named in the patch]")
@click.option("--force", is_flag=True)
@click.option("--device")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]))
def patch_convert(file, to, out, model, force, device, dtype):
    """Replay a seed-trajectory patch into a dense one (bit for bit on the device and dtype it trained with)."""
    import zolite
    from zolite.io import refuse_clobber
    from zolite.patch import save_patch
    from zolite.trajectory import is_trajectory, replay

    p = zolite.load_patch(file)
    if not is_trajectory(p):
        raise ZoliteError(f"{file} is already dense; a dense patch cannot be turned into seeds (tune writes the "
                          "trajectory beside the dense patch)")
    refuse_clobber(out, force)
    loaded = zolite.load_model(model or p.metadata.get("zolite.model"), device=device, dtype=dtype,
                               keep_layers=p.layers)
    dense = replay(loaded.model, p)
    save_patch(out, dense.tensors, dense.metadata, force=force)
    click.echo(f"{out}: dense patch replayed from {p.metadata['zolite.trajectory_steps']} steps on "
               f"{p.metadata['zolite.trained_on']}; bit-identical to the run's dense patch (checked)")


@main.command()
@click.option("--model", help="Base model.  [default: the one named in the patch]")
@click.option("--patch", "patch_file", type=click.Path(), required=True)
@click.option("--out", type=click.Path(), required=True,
              help="Folder for the merged Hugging Face checkpoint (--format hf), or the .gguf file (--format gguf).")
@click.option("--format", "fmt", type=click.Choice(["hf", "gguf"]), default="hf", show_default=True,
              help="hf: merged checkpoint folder; gguf: one file for llama.cpp / Ollama (a GGUF base keeps every "
                   "untouched tensor as it was).")
@click.option("--quant", help="--format gguf: the tuned tensors' type (f16, q8_0, ...; the whole model's for a Hugging "
                              "Face base).  [default: f16]")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float16", show_default=True,
              help="--format hf: the checkpoint's dtype.")
@click.option("--force", is_flag=True, help="Overwrite an existing --out.")
@click.option("--device")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def export(model, patch_file, out, fmt, quant, dtype, force, device, as_json):
    """Merge a patch into its base and write a HF checkpoint or a GGUF file (verified by reloading it and comparing
    logits with the patched model)."""
    from zolite.export import export as run_export

    result = run_export(model, patch_file, out, format=fmt, dtype=dtype, quant=quant, force=force, device=device)
    if as_json:
        click.echo(json.dumps(result, indent=1))
    elif fmt == "hf":
        click.echo(f"{result['out']}: {', '.join(result['files'])}; reloaded logits match the patched model exactly")
    else:
        mib, v = (lambda n: f"{n / 2**20:.1f} MiB"), result["verify"]
        size = f"{mib(result['bytes'])}" + (f" (source {mib(result['source_bytes'])})" if result["source_bytes"] else "")
        kept = f", {result['copied']} copied byte for byte" if result["source_kind"] == "gguf" else ""
        types = ", ".join(f"{n} {t}" for t, n in result["encoded_types"].items())
        click.echo(f"{result['out']}: {size}; {result['encoded']} tensors written ({types}){kept}")
        click.echo(f"verified: reloads through transformers, written tensors read back exactly; max |logit diff| vs the "
                   f"patched model {v['max_logit_diff']:.3g} (the tuned layer's {result['quant']} encoding: "
                   f"{v['encoding_logit_diff']:.3g}), top-1 agreement {v['top1_agreement']:.1%} over {v['tokens']} "
                   f"tokens of {v['prompts']} prompts")
        for note in result["notes"]:
            click.echo(f"note: {note}", err=True)


@main.command()
@click.option("--model", help="Base model.  [default: the one named in the first patch]")
@click.option("--patch", "patches", multiple=True, required=True, help="NAME=PATH (repeatable).")
@click.option("--where", type=click.Choice(["device", "pinned", "disk"]), default="device", show_default=True,
              help="Keep patches resident on the device, in pinned CPU memory, or memory-mapped from disk.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--max-queue", type=int, default=64, show_default=True)
@click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds a request may wait.")
@mode_option
@click.option("--device")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]))
def serve(model, patches, where, host, port, max_queue, timeout, mode, device, dtype):
    """Serve one base with several patches: POST /v1/completions {"prompt", "max_tokens", "patch"}, GET /health."""
    from zolite.serve import PatchServer, parse_named
    from zolite.swap import load_with_patches

    loaded, patch_set = load_with_patches(model, parse_named(list(patches)), where=where, mode=mode, device=device,
                                          dtype=dtype)
    server = PatchServer(loaded, patch_set, host=host, port=port, max_queue=max_queue, timeout=timeout)
    h, p = server.address
    click.echo(f"serving {loaded.name} with patches {', '.join(patch_set.names())} on http://{h}:{p}", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.stop()


@main.command()
def models():
    """List the model profiles."""
    from zolite.loading import known_models

    for p in known_models():
        layer = f"dominant layer {p.dominant_layer}" if p.dominant_layer is not None else "dominant layer unknown"
        click.echo(f"{p.name:<14} {p.num_layers} layers, {layer:<22} {p.description}")


@main.command()
def tasks():
    """List the tasks."""
    from zolite.tasks import TASKS

    for t in TASKS.values():
        click.echo(f"{t.name:<8} {t.description}")
        click.echo(f"{'':<8} fields: {', '.join(t.fields)}")


if __name__ == "__main__":
    main()
