"""The `zolite` command: parse, call zolite.*, print. No logic lives here.

One module per command group: tuning (tune, eval, apply), inspection (scan, profile), ablation (ablate), patches
(patch, export, serve), listing (models, tasks); options holds the options they share."""
from __future__ import annotations

import os
import sys

import click

from zolite.errors import ZoliteError

from . import ablation, inspection, listing, patches, tuning


class ZoliteGroup(click.Group):
    """Turn a ZoliteError, or the GPU running out of memory, into one line on stderr and exit code 2, with no
    traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ZoliteError as e:
            if not getattr(e, "quiet", False):   # (quiet: one process of a distributed run; rank 0 says it)
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


for command in (tuning.tune, tuning.eval_, tuning.apply, inspection.scan, inspection.profile, ablation.ablate,
                patches.patch, patches.export, patches.serve, listing.models, listing.tasks):
    main.add_command(command)
