"""Host work of one ZO step, counted: the aten calls (each a kernel launch or more on a GPU) of one perturbed doubled
forward plus the update, on every layer of a small random Llama (bench/memory_modes.py's "tiny": 4 layers, width
64) in fp32 and fp16, and on the tensors of Qwen's BoolQ recipe (every layer's q/k/v biases and two norms, 140
tensors) of a random Qwen2 of Qwen2.5-1.5B's depth (28 layers, width 64) in fp16, on the CPU. A GPU runs small
models' steps at
the pace of these calls (bench/results/step_speed_h100: host CPU time per step equals its wall time), so fewer calls
is a faster step there; compare two versions with --baseline DIR (a zolite package, as in step_speed.py).

    python bench/step_ops.py [--baseline /tmp/zolite-base]
"""
from __future__ import annotations

import argparse
import collections
from pathlib import Path

import torch


def count(zo, model, layers: int, params: str | None = None) -> tuple[collections.Counter, int]:
    """(aten calls of one step by name, tuned tensors)."""
    tuned = zo.TunedLayers(model, list(range(layers)), params=params)
    ids = torch.randint(0, 100, (4, 16))

    def step():
        with tuned.perturbed(123, 1e-3):
            model.base_model(input_ids=torch.cat([ids, ids]), use_cache=False)
        tuned.sgd_update(123, 0.5, 1e-4)
    return aten_calls(step), len(tuned.params)


def aten_calls(fn) -> collections.Counter:
    """aten calls of one fn() by name, after a first call (the first call of each op initialises things)."""
    fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return collections.Counter(e.name for e in prof.events() if e.name.startswith("aten::"))


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
    print("\n| Qwen's BoolQ recipe (fp16) | version | tuned tensors | aten calls per step |\n|---|---|---|---|")
    model = recipe_model()
    for name, zo in versions.items():
        calls, tensors = count(zo, model, RECIPE_LAYERS, params="bias,layernorm")
        print(f"| every bias and norm | {name} | {tensors} | {sum(calls.values())} |")
    print(f"| one doubled forward, nothing perturbed (the floor) | | 0 | {sum(forward_calls(model).values())} |")


def forward_calls(model) -> collections.Counter:
    """aten calls of the step's doubled forward alone."""
    ids = torch.randint(0, 100, (8, 16))
    return aten_calls(lambda: model.base_model(input_ids=ids, use_cache=False))


RECIPE_LAYERS = 28   # Qwen2.5-Coder-1.5B's


def recipe_model():
    """A random fp16 Qwen2 of Qwen2.5-1.5B's depth, narrow: its tuned tensors are the recipe's 140, its matmuls tiny."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=RECIPE_LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)
    return Qwen2ForCausalLM(config).to(torch.float16).eval()


if __name__ == "__main__":
    main()
