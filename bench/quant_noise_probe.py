"""Why ZO tuning degrades in int8 and not in nf4: how much of the two-point estimate survives quantization (issue 5).

    python bench/quant_noise_probe.py --out OUT [--model smollm2-135m] [--layer 11] [--draws 32] [--eps 1e-3,1e-2]

One SST-2 training batch, the same seeded z draws in every mode; for each mode and eps the projected gradient
g = (l+ - l-) / (2 eps) of each draw is compared with the unquantized model's (the reference, in the device's
default dtype): correlation over the draws, relative error ||g - g_ref|| / ||g_ref||, and the sign agreement
(MeZO's step follows g's sign per draw). The tuned layer is unquantized in every mode; only the frozen layers differ.
Writes OUT/quant_noise.json and OUT/quant_noise.md.
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
from pathlib import Path

import torch

from zolite.evaluate import encode_rows
from zolite.loading import load_model
from zolite.scoring import collate, pad_token_id
from zolite.tasks import get_task, task_data
from zolite.data import sample_splits
from zolite.zo import TunedLayers, spsa_losses

MODES = {"reference": dict(mode="fp16"), "int8 (threshold 6)": dict(mode="int8", int8_threshold=6.0),
         "int8 (threshold 0)": dict(mode="int8", int8_threshold=0.0), "nf4": dict(mode="nf4"),
         # the dtype's own rounding (issue 22: fp16 or bf16 for Qwen2.5?), against a float32 reference
         "fp16 float16": dict(mode="fp16", dtype="float16"), "fp16 bfloat16": dict(mode="fp16", dtype="bfloat16"),
         "nf4 float16": dict(mode="nf4", dtype="float16"), "nf4 bfloat16": dict(mode="nf4", dtype="bfloat16")}


def projected_gradients(name, options, args, rows, eps_list) -> dict:
    loaded = load_model(args.model, keep_layers=[args.layer], **options)
    tuned = TunedLayers(loaded.model, [args.layer])
    task = get_task("sst2")
    examples = encode_rows(loaded.tokenizer, task, rows, 256)
    batch = collate(examples, pad_token_id(loaded.tokenizer)).to(loaded.device)
    out = {}
    with torch.inference_mode():
        for eps in eps_list:
            gs = []
            for seed in range(args.draws):
                plus, minus = spsa_losses(loaded.model, tuned, batch, 1000 + seed, eps, "ce")
                gs.append((plus - minus) / (2 * eps))
            out[str(eps)] = gs
    print(f"{name}: done ({loaded.mode}, {loaded.dtype})", file=sys.stderr)
    del loaded
    return out


def compare(g: list[float], ref: list[float]) -> dict:
    a, b = torch.tensor(g, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64)
    corr = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    return {"corr": round(corr, 4), "rel_err": round(((a - b).norm() / b.norm()).item(), 4),
            "sign_agree": round((a.sign() == b.sign()).double().mean().item(), 4),
            "rms_g": round(a.pow(2).mean().sqrt().item(), 4)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layer", type=int, default=11)
    ap.add_argument("--draws", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--eps", default="1e-3,1e-2")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--reference-dtype", help="dtype of the unquantized reference (default: the device's)")
    args = ap.parse_args()
    if args.reference_dtype:
        MODES["reference"] = dict(mode="fp16", dtype=args.reference_dtype)
    eps_list = [float(e) for e in args.eps.split(",")]
    task = get_task("sst2")
    rows = sample_splits(task_data(task, None), seed=0).train[:args.batch]
    grads = {name: projected_gradients(name, MODES[name], args, rows, eps_list) for name in args.modes.split(",")}
    import transformers
    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"}
    table = {name: {eps: compare(g, grads["reference"][eps]) for eps, g in by_eps.items()}
             for name, by_eps in grads.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quant_noise.json").write_text(json.dumps({"argv": shlex.join(sys.argv), "env": env, "table": table,
                                                           "grads": grads}, indent=1))
    lines = [f"# Two-point ZO estimate under quantization ({args.model}, layer {args.layer} tuned, {env['device']})", "",
             f"Command: `python {shlex.join(sys.argv)}`; torch {env['torch']}, transformers {env['transformers']}.", "",
             f"{args.draws} seeded z draws on one SST-2 batch of {args.batch}; g = (l+ - l-) / (2 eps) per draw, compared "
             "with the unquantized model's g for the same draw.", "",
             "| mode | eps | corr with reference | relative error | sign agreement | RMS of g |", "|---|---|---|---|---|---|"]
    for name, by_eps in table.items():
        for eps, row in by_eps.items():
            lines.append(f"| {name} | {eps} | {row['corr']:.3f} | {row['rel_err']:.3f} | {row['sign_agree']:.2f} | {row['rms_g']:.3f} |")
    (args.out / "quant_noise.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
