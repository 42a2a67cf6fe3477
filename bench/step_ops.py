"""Host work of one ZO step, counted: the aten calls (each a kernel launch or more on a GPU) of one perturbed doubled
forward plus the update, on every layer of a small random Llama (bench/memory_modes.py's "tiny": 4 layers, width
64) in fp32 and fp16, on the CPU. A GPU runs small models' steps at
the pace of these calls (bench/results/step_speed_h100: host CPU time per step equals its wall time), so fewer calls
is a faster step there; compare two versions with --baseline DIR (a zolite package, as in step_speed.py).

    python bench/step_ops.py [--baseline /tmp/zolite-base]
"""
from __future__ import annotations

import argparse
import collections
from pathlib import Path

import torch


def count(zo, model, layers: int) -> tuple[collections.Counter, int]:
    """(aten calls of one step by name, tuned tensors)."""
    tuned = zo.TunedLayers(model, list(range(layers)))
    ids = torch.randint(0, 100, (4, 16))

    def step():
        with tuned.perturbed(123, 1e-3):
            model.base_model(input_ids=torch.cat([ids, ids]), use_cache=False)
        tuned.sgd_update(123, 0.5, 1e-4)
    step()   # warm: the first call of each op initialises things
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    return collections.Counter(e.name for e in prof.events() if e.name.startswith("aten::")), len(tuned.params)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", help="a folder holding an older zolite package, counted beside this one")
    args = ap.parse_args()
    import tempfile

    import zolite
    import zolite.zo
    from memory_modes import SHAPES, build_model

    versions = {"zolite": zolite.zo}
    if args.baseline:
        from step_speed import load_baseline
        versions["base"] = load_baseline(Path(args.baseline)).zo
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m"
        build_model(path, "tiny")
        layers = SHAPES["tiny"]["num_hidden_layers"]
        print("| dtype | version | tuned tensors | aten calls per step |\n|---|---|---|---|")
        for dtype in ("float32", "float16"):
            model = zolite.load_model(str(path), device="cpu", dtype=dtype).model
            for name, zo in versions.items():
                calls, tensors = count(zo, model, layers)
                print(f"| {dtype} | {name} | {tensors} | {sum(calls.values())} |")


if __name__ == "__main__":
    main()
