"""`zolite tune`, `zolite eval`, `zolite apply`: tune a layer, score it, use it."""
from __future__ import annotations

import json

import click

from zolite.errors import ZoliteError, check_at_least

from .options import LR, custom_task_options, mode_option


@click.command()
@click.option("--model", default="smollm2-135m", show_default=True,
              help="Profile name (see `zolite models`), local HF folder, .gguf file or hub id.")
@click.option("--task", default="sst2", show_default=True,
              help="Task name (see `zolite tasks`), or your own FILE.jsonl (with --template) or TASK.toml.")
@custom_task_options
@click.option("--recipe/--no-recipe", default=None,
              help="Start from the model profile's recipe for this task (the options that scored best on it; "
                   "`zolite models` lists them); options given win.  [default: on where the profile has one]")
@click.option("--layer", "--layers", "layer", default=None,
              help="Decoder layer(s) to tune, 0-based: N, N,M, 'all' (full-model MeZO) or 'auto' (the default: the "
                   "dominant layer from this model's cached `zolite scan`, else its profile, else a scan now).")
@click.option("--steps", type=int, help="ZO steps. Default: the profile's.")
@click.option("--lr", type=LR, help="Step size, or auto: probed from the model's curvature before the run "
              "(docs/guide.md, step size).  [default: the profile's, else auto]")
@click.option("--lr-schedule", type=click.Choice(["constant", "linear", "cosine"]),
              help="The lr over the run: constant (MeZO's), or decaying linearly or along a cosine from the lr at "
                   "the first step towards 0 at the last (ZO-SGD and momentum).  [default: constant]")
@click.option("--guard/--no-guard", default=None,
              help="Halve the step when the training loss turns up (ZO-SGD / momentum), and in plain MeZO go back "
                   "to the weights of the lowest loss so far.  [default: on]")
@click.option("--eps", type=float, help="Perturbation scale (absolute). Default: the profile's, else 1e-2 on a "
                                        "quantized base (nf4, int8) and 1e-3 (MeZO's) on an unquantized one.")
@click.option("--batch-size", type=int, help="Examples per step. Default: the profile's.")
@click.option("--weight-decay", type=float, help="MeZO weight decay on matrices.  [default: 0]")
@click.option("--estimator", type=click.Choice(["spsa", "residual", "fo"]),
              help="spsa: MeZO's two-point estimate; residual: one-point residual feedback (one forward per step); "
                   "fo: backprop into the tuned layers (the first-order baseline).  [default: spsa]")
@click.option("--n-z", type=int, help="Perturbations per step (spsa), averaged.  [default: 1]")
@click.option("--params", help="Perturb and update only the tuned layers' tensors whose name holds one of these "
                                "comma-separated parts, e.g. v_proj,o_proj,down_proj (fewer weights: less ZO noise "
                                "per step).  [default: all]")
@click.option("--eps-scale", type=click.Choice(["absolute", "relative", "activation", "sparse"]),
              help="absolute: W + eps z, z ~ N(0, 1) per weight; relative: each tensor's eps times the RMS of its "
                   "base weights; activation: each matrix column's z, and each norm weight's, scaled down by the "
                   "energy of the input channel it weighs, measured on training batches; sparse: z only on each "
                   "tensor's quarter of smallest base weights (Sparse MeZO). The update follows the same scaling.  [default: absolute]")
@click.option("--optimizer", type=click.Choice(["sgd", "momentum", "adam", "sign"]), help="[default: sgd]")
@click.option("--momentum", type=float, help="Momentum of --optimizer momentum.  [default: 0.9]")
@click.option("--layerwise/--no-layerwise", default=None,
              help="Scale each tensor's step by ||W|| / ||update|| (lr becomes a relative step).  [default: off]")
@click.option("--cuda-graphs/--no-cuda-graphs", default=None,
              help="Replay each step's two perturbed forwards from CUDA graphs (GPU; layers of small tensors), each "
                   "batch padded to a multiple of 8 tokens: fewer kernel launches for a small model.  [default: on a GPU "
                   "where the model's profile says so (SmolLM2's), else off]")
@click.option("--tf32/--no-tf32", default=None,
              help="fp32 matmuls on the GPU's TF32 tensor cores: several times faster for an fp32 model, inputs "
                   "rounded to 10 mantissa bits.  [default: as --cuda-graphs]")
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
@click.option("--nproc", type=int, help="Processes on this machine (one per GPU), each taking a slice of every step's "
              "batch; they exchange only the losses (docs/guide.md, several GPUs). Several machines: torchrun.  "
              "[default: 1]")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def tune(ctx, model, task, run_dir, out, resume, force, nproc, as_json, quiet, **options):
    """Tune one decoder layer with MeZO and write a patch."""
    import zolite
    from zolite.tune_setup import recipe_text

    if resume is not None:  # model/task/options must match the folder's; only those typed are checked
        given = lambda name: ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE
        model = model if given("model") else None
        task = task if given("task") else None
    report = zolite.tune(model, task, run_dir=run_dir, out=out, force=force, resume=resume,
                         progress=not quiet, nproc=nproc, **options)
    if report is None:   # one of torchrun's processes other than rank 0, which prints the run's summary
        return
    summary = {k: report[k] for k in ("patch", "run_dir", "layers", "steps", "kept_step", "tuned_params", "lr", "recipe",
                                      "timing", "memory")}
    summary["metric"] = (report["final"]["val"] or {}).get("metric")
    summary["val_score"] = report["final"]["val"]["score"] if report["final"]["val"] else None
    if "test" in report["final"]:
        summary["test_score"] = report["final"]["test"]["score"]
    if as_json:
        click.echo(json.dumps(summary))
    else:
        click.echo(f"patch: {summary['patch']} (layer {summary['layers']}, {summary['tuned_params']:,} params, "
                   f"{summary['steps']} steps, kept step {summary['kept_step']})")
        lr = report["lr"]
        if report.get("recipe"):
            hint = "" if resume else " (--no-recipe: the profile's defaults)"
            click.echo(f"recipe: {report['config']['model']}'s for {report['config']['task']}: "
                       f"{recipe_text(report['recipe'])}{hint}")
        how = {"probe": "probed from the model's curvature", "profile": "the model profile's",
               "recipe": "the recipe's"}.get(lr["source"], "as given")
        halved = f"; halved at steps {', '.join(str(b[0]) for b in lr['backoffs'])}" if lr.get("backoffs") else ""
        if lr.get("returned"):
            halved += "; each time the weights went back to where the lowest-loss block started"
        decay = f", {lr['schedule']} decay to 0" if lr.get("schedule", "constant") != "constant" else ""
        click.echo(f"lr: {lr['lr']:.3g} ({how}{decay}{halved})")
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


@click.command("eval")
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


@click.command()
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
    # the patched tensors' Linears unquantized
    loaded = zolite.load_model(model, device=device, dtype=dtype, keep_layers=p.layers, keep_params=p.unquantized_params)
    zolite.apply_patch(loaded.model, p)
    if prompt is not None:
        click.echo(zolite.generate(loaded.model, loaded.tokenizer, prompt, max_new_tokens=max_new_tokens, chat=chat))
        return
    for prediction in zolite.classify_file(loaded.model, loaded.tokenizer, task, input_file):
        click.echo(json.dumps(prediction))


def _apply_routed(patches, model, input_file, route_field, device, dtype):
    """Classify each row with the patch it names; printed in file order."""
    from zolite.predict import classify_routed
    from zolite.serve import parse_named
    from zolite.swap import load_with_patches

    loaded, patch_set = load_with_patches(model, parse_named(list(patches)), device=device, dtype=dtype)
    for prediction in classify_routed(loaded.model, loaded.tokenizer, patch_set, input_file, route_field):
        click.echo(json.dumps(prediction))
