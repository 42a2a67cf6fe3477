"""Options several commands share, and where their output goes by default."""
from __future__ import annotations

from pathlib import Path

import click


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


class LrType(click.ParamType):
    """--lr: a number, or auto."""
    name = "LR|auto"

    def convert(self, value, param, ctx):
        if isinstance(value, float) or value == "auto":
            return value
        try:
            return float(value)
        except ValueError:
            self.fail(f"{value!r} is neither a number nor auto", param, ctx)


LR = LrType()

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
