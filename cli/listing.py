"""`zolite models`, `zolite tasks`: what there is to choose from."""
from __future__ import annotations

import click


@click.command()
def models():
    """List the model profiles."""
    from zolite.loading import known_models
    from zolite.tune_setup import recipe_text

    profiles = known_models()
    width = max(len(p.name) for p in profiles)
    for p in profiles:
        layer = f"dominant layer {p.dominant_layer}" if p.dominant_layer is not None else "dominant layer unknown"
        click.echo(f"{p.name:<{width}}  {p.num_layers} layers, {layer:<22} {p.description}")
        for task, recipe in p.tasks.items():   # what `zolite tune --task TASK` starts from on this model
            click.echo(f"{'':<{width}}  recipe for {task}: {recipe_text(recipe)}")


@click.command()
def tasks():
    """List the tasks."""
    from zolite.tasks import TASKS

    for t in TASKS.values():
        click.echo(f"{t.name:<8} {t.description}")
        click.echo(f"{'':<8} fields: {', '.join(t.fields)}")
