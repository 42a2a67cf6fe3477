"""`zolite ablate`: a plan of tune variants over seeds, tabulated."""
from __future__ import annotations

from pathlib import Path

import click

from .options import mode_option


@click.command()
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
