"""GGUF export of a real patch (issue 25): the exported file's size next to the source GGUF's and the merged
checkpoint's, the time each export takes on this machine, and the verification figures `zolite export` reports.

    python bench/export_gguf.py --patch PATCH --name NAME [--quants f16,q8_0] [--no-merged] \
        [--out bench/results/export_gguf]

Writes OUT/NAME.json (one row per export) and rewrites OUT/results.md from every OUT/*.json. The exports go to a
temporary folder and are deleted afterwards. When llama-cpp-python is importable, each GGUF is also run through
llama.cpp: a greedy completion, its speed, and its next-token logits on the same token ids against the patched model's
(transformers, as `zolite apply` loads it).
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "Question: What is the capital of France?\nAnswer:"


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def main():
    import zolite
    from zolite.export_gguf import llama_cpp_check

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patch", type=Path, required=True)
    ap.add_argument("--name", required=True, help="Row label and file name, e.g. smollm2-135m.")
    ap.add_argument("--model", help="Base model.  [default: the patch's]")
    ap.add_argument("--quants", default="f16,q8_0")
    ap.add_argument("--no-merged", action="store_true", help="Skip the merged HF checkpoint (fp16) export.")
    ap.add_argument("--out", type=Path, default=Path("bench/results/export_gguf"))
    args = ap.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="export-gguf-") as tmp:
        for quant in args.quants.split(","):
            path = Path(tmp) / f"{args.name}-{quant}.gguf"
            t0 = time.monotonic()
            r = zolite.export(args.model, args.patch, path, format="gguf", quant=quant)
            row = {"kind": f"gguf {quant}", "seconds": round(time.monotonic() - t0, 1), **{
                k: r[k] for k in ("bytes", "source_bytes", "source", "encoded", "encoded_types", "copied", "verify",
                                  "notes", "layers")}}
            check = llama_cpp_check(path, args.model or zolite.load_patch(args.patch).metadata["zolite.model"],
                                    args.patch, PROMPT)
            if check is not None:
                row["llama_cpp"] = check
            rows.append(row)
            path.unlink()
            print(json.dumps(row), flush=True)
        if not args.no_merged:
            t0 = time.monotonic()
            r = zolite.export(args.model, args.patch, Path(tmp) / "merged", format="hf", dtype="float16")
            rows.append({"kind": "merged hf float16", "seconds": round(time.monotonic() - t0, 1),
                         "bytes": folder_bytes(Path(tmp) / "merged"), "max_logit_diff": r["max_logit_diff"]})
            print(json.dumps(rows[-1]), flush=True)
    import torch
    import transformers

    result = {"name": args.name, "patch": str(args.patch),
              "command": "python bench/export_gguf.py " + shlex.join(sys.argv[1:]),
              "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, CPU only",
              "versions": {"zolite": zolite.__version__, "torch": torch.__version__,
                           "transformers": transformers.__version__, "gguf": _version("gguf"),
                           "llama_cpp_python": _version("llama_cpp_python")},
              "date": time.strftime("%Y-%m-%d"), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    write_markdown(args.out)


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def write_markdown(out: Path) -> None:
    mib = lambda n: f"{n / 2**20:,.1f}"   # noqa: E731
    lines = ["# GGUF export: sizes, time, verification", "",
             "Made by `bench/export_gguf.py` (the command of each model is below); sizes in MiB (2^20 bytes). "
             "`max |Δlogit|`: the exported file reloaded by transformers' GGUF loader against the patched model as "
             "`zolite apply` loads it (fp32 on the CPU), over every position of 4 prompts; `of which encoding`: the part "
             "due to the tuned layer's re-encoding (0 for F16: the patch is fp16). The rest comes from the converted "
             "base `zolite apply` uses, which stores the de-quantized GGUF weights in fp16.", ""]
    for f in sorted(out.glob("*.json")):
        r = json.loads(f.read_text())
        lines += [f"## {r['name']}", "", f"`{r['command']}`  ", f"{r['machine']}; {r['date']}; "
                  + ", ".join(f"{k} {v}" for k, v in r["versions"].items() if v), ""]
        src = next((row for row in r["rows"] if row.get("source_bytes")), None)
        if src:
            lines.append(f"source GGUF: `{Path(src['source']).name}`, {mib(src['source_bytes'])} MiB; tuned layer(s) "
                         f"{','.join(map(str, src['layers']))}")
            lines.append("")
        lines += ["| export | MiB | vs source | seconds | tensors re-encoded / copied | max abs logit diff | of which "
                  "encoding | top-1 agreement | llama.cpp |", "|---|---|---|---|---|---|---|---|---|"]
        for row in r["rows"]:
            v = row.get("verify", {})
            ratio = f"{row['bytes'] / src['source_bytes']:.3f}x" if src else ""
            if "verify" in row:
                types = "+".join(f"{n} {t}" for t, n in row["encoded_types"].items())
                cpp = row.get("llama_cpp")
                cpp = (f"top-1 {cpp['top1_agreement']:.0%}, max abs logit diff {cpp['max_logit_diff']:.3g}, "
                       f"{cpp['tokens_per_s']:.1f} tok/s: {cpp['completion']!r}" if cpp else "not installed")
                lines.append(f"| {row['kind']} | {mib(row['bytes'])} | {ratio} | {row['seconds']} | {types} / "
                             f"{row['copied']} | {v['max_logit_diff']:.3g} | {v['encoding_logit_diff']:.3g} | "
                             f"{v['top1_agreement']:.1%} of {v['tokens']} | {cpp} |")
            else:
                diff = "" if row["max_logit_diff"] is None else f"{row['max_logit_diff']:.3g} (exact reload)"
                lines.append(f"| {row['kind']} | {mib(row['bytes'])} | {ratio} | {row['seconds'] or ''} | | {diff} | | | |")
        if r.get("incomplete"):
            lines += ["", f"Incomplete: {r['incomplete']}."]
        lines.append("")
    (out / "results.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
