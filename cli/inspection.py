"""`zolite scan`, `zolite profile`: a model's dominant layer, and where a ZO step's memory and time go."""
from __future__ import annotations

import json
from pathlib import Path

import click

from .options import default_out, mode_option, report_options


@click.command()
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


@click.command()
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
