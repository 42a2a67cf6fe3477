"""`zolite patch info|convert`, `zolite export`, `zolite serve`: patch files inspected, converted, merged into their
base, served."""
from __future__ import annotations

import json

import click

from zolite.errors import check_at_least

from .options import mode_option


@click.group()
def patch():
    """Inspect and convert patch files (dense weights or a seed trajectory)."""


@patch.command("info")
@click.argument("file", type=click.Path())
@click.option("--json", "as_json", is_flag=True)
def patch_info(file, as_json):
    """Metadata, size, kind and the base a patch fits."""
    from zolite.patch import patch_summary

    info = patch_summary(file)
    meta = info["metadata"]
    if as_json:
        click.echo(json.dumps(info))
        return
    click.echo(f"{file}: {info['kind']} patch, {info['bytes']:,} bytes")
    click.echo(f"  fits: {info['model']} ({info['arch']}), layer(s) {info['layers']} (0-based), base fingerprint "
               f"{info['base_sha256'][:16]}...")
    click.echo(f"  task {info['task']}, {info['steps']} steps; metric {meta.get('zolite.metric')}")
    if info["kind"] == "trajectory":
        click.echo(f"  {meta['zolite.trajectory_steps']} seeded steps; trained on {meta.get('zolite.trained_on')}")


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
    from zolite.apply import convert_to_dense

    p = convert_to_dense(file, out, model=model, force=force, device=device, dtype=dtype)
    click.echo(f"{out}: dense patch replayed from {p.metadata['zolite.trajectory_steps']} steps on "
               f"{p.metadata['zolite.trained_on']}; bit-identical to the run's dense patch (checked)")


@click.command()
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


@click.command()
@click.option("--model", help="Base model.  [default: the one named in the first patch]")
@click.option("--patch", "patches", multiple=True, required=True,
              help="NAME=PATH (repeatable); requests pick it with \"model\": NAME.")
@click.option("--where", type=click.Choice(["device", "pinned", "disk"]), default="device", show_default=True,
              help="Keep patches resident on the device, in pinned CPU memory, or memory-mapped from disk.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--max-queue", type=int, default=64, show_default=True, help="Requests waiting at most (503 beyond).")
@click.option("--max-batch", type=int, default=32, show_default=True,
              help="Rows (prompts x n) generated together; 1: one request at a time.")
@click.option("--batching", type=click.Choice(["continuous", "mixed", "per-patch"]), default="continuous",
              show_default=True,
              help="continuous: requests of every patch share a batch and join it between steps; mixed: share a "
                   "batch, no joining; per-patch: a batch per patch, one swap per group (always so with --where "
                   "pinned or disk).")
@click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds a request may wait.")
@mode_option
@click.option("--device")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]))
def serve(model, patches, where, host, port, max_queue, max_batch, batching, timeout, mode, device, dtype):
    """Serve one base with several patches, OpenAI-compatible: POST /v1/completions and /v1/chat/completions
    ("model": a patch NAME or the base), GET /v1/models, GET /health. See docs/serve.md."""
    import zolite

    check_at_least("--max-batch", max_batch, 1)
    check_at_least("--max-queue", max_queue, 1)
    server = zolite.serve(model, list(patches), where=where, host=host, port=port, max_queue=max_queue,
                          timeout=timeout, max_batch=max_batch, batching=batching, mode=mode, device=device,
                          dtype=dtype)
    click.echo(f"serving {server.loaded.name} with patches {', '.join(server.patches.names())} on {server.url} "
               f"(OpenAI-compatible: {server.url}/v1)", err=True)
    try:
        server.wait()
    except KeyboardInterrupt:
        server.stop()
