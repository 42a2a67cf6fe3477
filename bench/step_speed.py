"""ms per ZO step (issue 23): zolite's own step, a plain eager MeZO loop, and the forward-only floor, side by side.

    python bench/step_speed.py --out OUT                         # every config, on the GPU
    python bench/step_speed.py --out OUT --configs smollm2-L11,smollm2-all --steps 300
    python bench/step_speed.py --out OUT --device cpu --configs smollm2-L11 --steps 3 --warmup 1   # CPU smoke
    python bench/step_speed.py ... --profile graphs-bare          # also where 10 of that method's steps spend time
                                                                 # (--profile-steps N: N of them)
    python bench/step_speed.py ... --baseline DIR                # also the step of DIR/zolite (another version,
                                                                 # imported beside this one): before / after

For each config, in one process, on the same model and the same batch (step 0's rows of the run seed 0):
- `zolite`: tune's step, `zolite.tune.train_step` on a Stepper built as tune builds it, its phases measured by a
  MemoryProfiler as in `zolite tune` (each phase synchronises the GPU to time itself and sample memory);
- `zolite-bare`: the same step without the profiler's phases (the step's own cost);
- `base`, `base-bare`: the same two for the zolite package in --baseline DIR (imported as `zolite_baseline`, its
  own TunedLayers, Stepper and train_step on the same model), in the same rounds;
- `graphs`, `graphs-bare`: the same two with `--cuda-graphs` (zolite.graphs: the ±eps forward replayed from a CUDA
  graph, the batch padded to its 32-token bucket; on the CPU they run eagerly);
- `eager`: MeZO written plainly here: one generator per step, z drawn in the weight's dtype tensor by tensor,
  W += eps z in place, forward, W -= 2 eps z, forward, W += eps z, W -= lr g z (the same tuned tensors);
- `backprop` (only when --only names it): tune's first-order step on the same tensors (`--estimator fo
  --optimizer adam`: forward, backward, AdamW; the matrix's ceiling row), in micro-batches of
  --backprop-micro-batch (8, as those runs);
- `floor-2x`: two plain forwards of the batch; `floor-2b`: one forward of the batch doubled (zolite's form: the
  layers before the first tuned one run on B rows, the rest on 2B, so zolite's floor lies between the two on one
  layer and is floor-2b on all layers).
Every forward is the same scoring: hidden states, the head at the answer tokens only, cross-entropy over the
candidates (zolite.scoring), under inference_mode, no KV cache. Methods alternate in rounds (--rounds), each round
a warm-up then timed steps; ms/step = wall time of the round's timed steps / steps, with the device synchronised
at both ends (steps overlap as in a training loop), pooled over rounds; per-step medians (synchronised each step)
are reported beside it.

Configs: SmolLM2-135M layer 11 and all layers in the profile's dtype (fp32 on CUDA; what `zolite tune` runs) and in
fp16, and every layer's norms; Qwen2.5-Coder-1.5B on BoolQ: layer 1 in nf4 and fp16, layer 27 and every layer's
biases and norms in nf4, every layer (full-model MeZO) in fp16; the Llama-2-7B shape (random weights from its config,
built once into --model-dir as bench/memory_modes.py builds it) layer 1 in nf4 on random tokens, batch 16 x 256
(the shape of the 238.5 ms figure). Batch 16, eps 1e-3, SST-2 unless said.
Writes OUT/results.json and OUT/results.md (rewritten after each config).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

BENCH = Path(__file__).resolve().parent

CONFIGS = {
    "smollm2-L11": dict(model="smollm2-135m", layer="11", mode="fp16", task="sst2"),
    "smollm2-all": dict(model="smollm2-135m", layer="all", mode="fp16", task="sst2"),
    "smollm2-L11-f16": dict(model="smollm2-135m", layer="11", mode="fp16", dtype="float16", task="sst2"),
    "smollm2-all-f16": dict(model="smollm2-135m", layer="all", mode="fp16", dtype="float16", task="sst2"),
    # fp32 weights, matmuls on TF32 tensor cores (zolite tune --tf32); every method of the config alike
    "smollm2-L11-tf32": dict(model="smollm2-135m", layer="11", mode="fp16", task="sst2", tf32=True),
    "smollm2-all-tf32": dict(model="smollm2-135m", layer="all", mode="fp16", task="sst2", tf32=True),
    "qwen-L1-nf4": dict(model="qwen2.5-coder-1.5b", layer="1", mode="nf4", task="boolq"),
    "qwen-L1-fp16": dict(model="qwen2.5-coder-1.5b", layer="1", mode="fp16", task="boolq"),
    "qwen-L27-nf4": dict(model="qwen2.5-coder-1.5b", layer="27", mode="nf4", task="boolq"),   # the graphs' doubled
                                                                                            # prefix at its largest
    # the matrix's other ZO arms alone on the GPU (issue 22): BoolQ's recipe weights (every layer's biases and norms;
    # its activation-scaled z is left out: one multiply per small tensor) and full-model MeZO
    "qwen-bitfit-nf4": dict(model="qwen2.5-coder-1.5b", layer="all", params="bias,layernorm", mode="nf4", task="boolq"),
    "qwen-all-fp16": dict(model="qwen2.5-coder-1.5b", layer="all", mode="fp16", task="boolq"),
    "smollm2-norms": dict(model="smollm2-135m", layer="all", params="norm", mode="fp16", task="sst2"),
    "llama7b-L1-nf4": dict(model="llama7b-random", layer="1", mode="nf4", random_len=256),
    # SmolLM2's depth at a width where arithmetic costs nothing: on the CPU, a stand-in for the GPU's launch-bound
    # regime (the step's Python and per-kernel overhead); random weights and tokens, built into --model-dir's sibling
    "launch-L11": dict(model="launch-random", layer="11", mode="fp16", random_len=32),
    "launch-all": dict(model="launch-random", layer="all", mode="fp16", random_len=32),
    "launch-all-f16": dict(model="launch-random", layer="all", mode="fp16", dtype="float16", random_len=32),
    "launch-norms": dict(model="launch-random", layer="all", params="norm", mode="fp16", random_len=32),
}
RANDOM_SHAPES = {"llama7b-random": "7b",
                 "launch-random": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=30,
                                       num_attention_heads=4, num_key_value_heads=4, vocab_size=1000)}
DEFAULT_CONFIGS = "smollm2-L11,smollm2-all,smollm2-L11-f16,smollm2-all-f16,qwen-L1-nf4,qwen-L1-fp16,llama7b-L1-nf4"
METHODS = ("zolite", "base", "zolite-bare", "base-bare", "graphs", "graphs-bare", "eager", "floor-2x",
           "floor-2b", "backprop")   # one round's order
DEFAULT_METHODS = METHODS[:-1]   # backprop: on request
LR = 1e-7   # small, so many timed steps leave the weights (and so the forwards' cost) as they were


def environment(device: torch.device) -> dict:
    import transformers

    import zolite

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "zolite": str(Path(zolite.__file__).resolve().parent), "device": str(device)}
    try:
        env["zolite_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                              cwd=Path(zolite.__file__).parent).stdout.strip() or None
    except OSError:
        env["zolite_commit"] = None
    try:
        import bitsandbytes

        env["bitsandbytes"] = bitsandbytes.__version__
    except Exception:   # noqa: BLE001  (bnb prints and raises odd things without a GPU)
        env["bitsandbytes"] = None
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    else:
        env["cpu_threads"] = torch.get_num_threads()
    return env


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batch_examples(loaded, spec: dict, data: str | None, batch_size: int) -> list:
    """Step 0's rows (run seed 0) of the task's train split, encoded as tune encodes them; or random tokens."""
    from zolite.data import batches_for_step, sample_splits
    from zolite.evaluate import encode_rows
    from zolite.tasks import get_task, task_data

    if spec.get("random_len"):
        from zolite.profiling import random_examples

        return random_examples(loaded.model.config.vocab_size, batch_size, spec["random_len"])
    task = get_task(spec["task"])
    splits = sample_splits(task_data(task, data), seed=0, validate=task.validate, expand=task.expand)
    rows = [splits.train[i] for i in batches_for_step(len(splits.train), batch_size, 0, 0)]
    return encode_rows(loaded.tokenizer, task, rows, 512)


def eager_mezo(model, params: list[torch.Tensor], batch, loss_of, eps: float, lr: float):
    """One plain MeZO step (Malladi et al. 2023, Algorithm 1), in place, returned as a function of the step."""
    device = params[0].device

    def perturb(seed: int, scale: float) -> None:
        gen = torch.Generator(device=device).manual_seed(seed)
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen, device=device, dtype=p.dtype), alpha=scale)

    @torch.inference_mode()
    def step(n: int) -> None:
        seed = 1_000_003 * n + 17
        perturb(seed, eps)
        plus = loss_of(batch)
        perturb(seed, -2 * eps)
        minus = loss_of(batch)
        perturb(seed, eps)
        g = (plus - minus).item() / (2 * eps)
        perturb(seed, -lr * g)
    return step


def measure(spec: dict, args, device: torch.device, methods: tuple[str, ...], baseline=None, config_name: str = "") -> dict:
    from zolite.graphs import ForwardGraphs
    from zolite.memory import MemoryProfiler
    from zolite.optim import Stepper
    from zolite.scoring import candidate_scores, collate, last_hidden, losses, pad_token_id
    from zolite.tune import train_step
    from zolite.tune_setup import TuneConfig, load_for_tuning
    from zolite.zo import TunedLayers

    model = spec["model"]
    if model in RANDOM_SHAPES:   # random weights from a config, built once (bench/memory_modes.py's builder)
        sys.path.insert(0, str(BENCH))
        from memory_modes import SHAPES, build_model

        shape = RANDOM_SHAPES[model]
        if isinstance(shape, dict):
            SHAPES[model] = shape
            shape = model
        folder = args.model_dir if model == "llama7b-random" else args.model_dir.with_name(model)
        build_model(folder, shape)
        model = str(folder)
    config = TuneConfig(model=model, layer=spec["layer"], mode=spec["mode"] if device.type == "cuda" else None,
                        dtype=spec.get("dtype") if device.type == "cuda" or spec.get("random_len") else None, device=str(device),
                        batch_size=args.batch_size, eps=args.eps, params=spec.get("params"))
    t0 = time.perf_counter()
    loaded, indices, _, plan = load_for_tuning(config)
    load_s = time.perf_counter() - t0
    net, pad = loaded.model, pad_token_id(loaded.tokenizer)
    examples = batch_examples(loaded, spec, args.data, args.batch_size)
    batch = collate(examples, pad).to(device)
    tuned = TunedLayers(net, indices, params=spec.get("params"))
    micro = plan.micro_batch if plan else None

    def loss_of(b):
        return losses(candidate_scores(net, b, last_hidden(net, b.input_ids)), b, "ce")

    @torch.inference_mode()
    def floor_2x(_n):
        plus, minus = loss_of(batch), loss_of(batch)
        torch.stack([plus[0], minus[0]]).tolist()

    doubled = SimpleNamespace(**{k: getattr(batch, k) for k in ("rows", "positions", "targets", "owners", "counts",
                                                                "labels", "accepted", "n_candidates")},
                              input_ids=batch.input_ids)
    ids_2b = torch.cat([batch.input_ids, batch.input_ids])

    @torch.inference_mode()
    def floor_2b(_n):
        hidden = last_hidden(net, ids_2b)
        losses(candidate_scores(net, doubled, hidden), doubled, "ce").tolist()

    paths, graph_paths = same_step_check(net, tuned, batch, args.eps), None
    profiler_cm = MemoryProfiler(device)
    profiler = profiler_cm.__enter__()
    versions = {"zolite": (Stepper, train_step, tuned)}
    if any(m.startswith("graphs") for m in methods):   # --cuda-graphs: the same step, its forward replayed
        versions["graphs"] = (Stepper, train_step, tuned)
        if device.type == "cuda":
            graph_paths = graphs_check(net, tuned, batch, args.eps)
    if baseline is not None:   # its own tuned layers (hooks, residuals) on the same parameters
        versions["base"] = (baseline.optim.Stepper, baseline.tune.train_step,
                            baseline.zo.TunedLayers(net, indices, params=spec.get("params")))
    fns = {}
    for version, (stepper_class, train_step_of, tuned_of) in versions.items():
        for name, phase in ((version, profiler.phase), (f"{version}-bare", None)):
            stepper = stepper_class(net, tuned_of, eps=args.eps, objective="ce", micro_batch=micro, seed=0,
                                    phase=phase, collate_to_device=lambda c: collate(c, pad).to(device), lr=LR)
            if version == "graphs":
                stepper.graphs = ForwardGraphs(net, tuned_of)
            fns[name] = _tune_step(train_step_of, _one_process_run(stepper, examples, args.batch_size))

    if "backprop" in methods:   # tune's --estimator fo --optimizer adam step
        stepper = Stepper(net, tuned, estimator="fo", objective="ce", micro_batch=args.backprop_micro_batch,
                          seed=0, collate_to_device=lambda c: collate(c, pad).to(device), name="adam", lr=LR)
        fns["backprop"] = _tune_step(train_step, _one_process_run(stepper, examples, args.batch_size))
    saved = [p.detach().clone() for p in tuned.params]   # eager perturbs in place: its weights go back after it
    fns.update({"eager": eager_mezo(net, [p.detach() for p in tuned.params], batch, loss_of, args.eps, LR),
                "floor-2x": floor_2x, "floor-2b": floor_2b})
    wall = {m: [0.0, 0] for m in methods}
    host = {m: 0.0 for m in methods}   # this process's CPU time: on a shared CPU, less moved by other processes
    per_step = {m: [] for m in methods}
    n = 0
    try:
        train_phase = profiler.phase("train")   # tune's loop runs in it; the step's own phases nest inside
        train_phase.__enter__()
        for _ in range(args.rounds):
            for m in methods:
                for _ in range(args.warmup):
                    fns[m](n)
                    n += 1
                sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(args.steps):
                    fns[m](n)
                    n += 1
                sync(device)
                wall[m][0] += time.perf_counter() - t0
                wall[m][1] += args.steps
                host[m] += time.process_time() - c0
                for _ in range(args.step_samples):   # synchronised each step: a per-step spread
                    sync(device)
                    t1 = time.perf_counter()
                    fns[m](n)
                    n += 1
                    sync(device)
                    per_step[m].append(time.perf_counter() - t1)
                if m == "eager":
                    with torch.no_grad():
                        for p, s in zip(tuned.params, saved):
                            p.copy_(s)
        if args.profile in fns:   # where the step's time goes, op by op (the host's time and the GPU's)
            profile_steps(fns[args.profile], n, device, args.out / f"profile-{config_name}-{args.profile}.txt",
                          args.profile_steps)
        train_phase.__exit__(None, None, None)
    finally:
        profiler_cm.__exit__(None, None, None)
    layers = spec["layer"] + (f" ({spec['params']})" if spec.get("params") else "")
    out = {"model": spec["model"], "layers": layers, "mode": loaded.mode,
           "dtype": str(loaded.dtype).removeprefix("torch."), "task": spec.get("task", "random tokens"),
           "batch": args.batch_size, "micro_batch": micro, "seq_len": int(batch.input_ids.shape[1]),
           "tuned_params": tuned.numel(), "load_s": round(load_s, 1), "steps": wall[methods[0]][1],
           "ms": {m: round(1000 * w / k, 3) for m, (w, k) in wall.items()},
           "ms_median_synced": {m: round(1000 * statistics.median(v), 3) for m, v in per_step.items() if v},
           "host_cpu_ms": {m: round(1000 * host[m] / wall[m][1], 3) for m in methods}}
    if paths:
        out["fused_vs_per_half"] = paths
    if graph_paths:
        out["graphs_vs_eager"] = graph_paths
    if device.type == "cuda":
        out["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    del fns, versions, tuned, net, loaded
    return out


def same_step_check(net, tuned, batch, eps: float) -> dict | None:
    """l+ and l- of one z from the fused doubled forward (the default for small layers) and from the per-half path,
    on this device: they differ only by the forward's rounding (batched vs separate matmuls)."""
    from zolite.zo import spsa_losses

    if not getattr(tuned, "fused", False):   # zolite before issue 23, or a layer too large for the fused path
        return None
    out = {}
    for fused in (True, False):
        tuned.fused = fused
        out["fused" if fused else "per_half"] = spsa_losses(net, tuned, batch, 1, eps, "ce")
    tuned.fused = True
    out["max_abs_diff"] = max(abs(a - b) for a, b in zip(out["fused"], out["per_half"]))
    out["slope_fused"], out["slope_per_half"] = ((p - m) / (2 * eps) for p, m in (out["fused"], out["per_half"]))
    return out


def profile_steps(fn, n: int, device: torch.device, out: Path, steps: int = 10) -> None:
    """torch.profiler over `steps` steps of one method: the ops by their own host time, and by GPU time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for k in range(steps):
            fn(n + k)
        sync(device)
    averages = prof.key_averages()
    text = [f"{steps} steps", averages.table(sort_by="self_cpu_time_total", row_limit=40)]
    if device.type == "cuda":
        text.append(averages.table(sort_by="self_cuda_time_total", row_limit=25))
    out.write_text("\n\n".join(text))


def graphs_check(net, tuned, batch, eps: float) -> dict:
    """l+ and l- of three z from the eager fused forward and from its CUDA graph (the batch padded to its bucket):
    they differ by the padded matmuls' rounding only."""
    from zolite.graphs import ForwardGraphs
    from zolite.zo import spsa_losses

    forward_graphs = ForwardGraphs(net, tuned)
    pairs = [(spsa_losses(net, tuned, batch, seed, eps, "ce"),
              spsa_losses(net, tuned, batch, seed, eps, "ce", graphs=forward_graphs)) for seed in (1, 2, 3)]
    return {"eager": [e for e, _ in pairs], "graphs": [g for _, g in pairs], "recorded": len(forward_graphs.recorded),
            "capture_failed": forward_graphs.failed,
            "max_abs_diff": max(abs(a - b) for e, g in pairs for a, b in zip(e, g))}


def _one_process_run(stepper, examples: list, batch_size: int):
    """What tune's train_step reads of a Run, for one process (its loop counts no exchanged bytes); the config is a
    real TuneConfig, so every option train_step reads has its default."""
    from zolite.distributed import World
    from zolite.tune_setup import TuneConfig

    return SimpleNamespace(config=TuneConfig(batch_size=batch_size, objective="ce", seed=0), train=examples,
                           splits=None, stepper=stepper, guard=None, world=World(), exchange=[0, 0, 0])


def _tune_step(train_step, run):
    """One step of tune's loop (which runs inside the profiler's "train" phase, as the timing loop here does)."""
    state = {"step": 0, "losses": [], "tokens": 0, "train_s": 0.0}
    return lambda _n: train_step(run, state)


def ratios(row: dict) -> dict:
    ms = row["ms"]
    out = {}
    for step in (k for k in ms if k.startswith(("zolite", "base", "graphs", "backprop"))):
        for ref in ("eager", "floor-2x", "floor-2b"):
            if ms.get(ref):
                out[f"{step}/{ref}"] = round(ms[step] / ms[ref], 3)
    return out


def table(results: dict) -> str:
    env = results["env"]
    where = env.get("gpu") or f"CPU ({env.get('cpu_threads')} threads)"
    lines = [f"# ZO step speed: {where}", "",
             f"Command: `python {results['argv']}`", "",
             f"torch {env['torch']}, transformers {env['transformers']}, bitsandbytes {env.get('bitsandbytes')}; "
             f"zolite from {env['zolite']} ({env.get('zolite_commit')}).", ""]
    if "gpu" not in env:
        lines += ["**CPU smoke run**: these numbers check that the script works and compare code on the CPU; they "
                  "are not GPU figures.", ""]
    lines += ["ms per step (wall time of consecutive steps, device synchronised at both ends, pooled over rounds). "
              "`zolite`: tune's train_step with its memory phases; `zolite-bare`: without them; `base` / `base-bare`: "
              f"the same for the zolite in {results['settings'].get('baseline')}; `eager`: plain in-place MeZO; "
              "`floor-2x`: two forwards of the batch; `floor-2b`: one forward of the doubled batch.", "",
              "| config | model | layers | mode | dtype | batch x len | step | ms/step | / eager | / floor-2x "
              "| / floor-2b |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in results["configs"].items():
        if "error" in row:
            lines.append(f"| {name} | | | | | | failed: {row['error']} | | | | |")
            continue
        ms = row["ms"]
        for m, v in ms.items():
            r = row["ratios"]
            cells = [f"{r[f'{m}/{ref}']}" if f"{m}/{ref}" in r else "" for ref in ("eager", "floor-2x", "floor-2b")]
            lines.append(f"| {name} | {row['model']} | {row['layers']} | {row['mode']} | {row['dtype']} | "
                         f"{row['batch']} x {row['seq_len']} | {m} | {v:.2f} | {' | '.join(cells)} |")
    checks = [(name, row["fused_vs_per_half"]) for name, row in results["configs"].items()
              if row.get("fused_vs_per_half")]
    if checks:
        lines += ["", "The fused doubled forward against the per-half one, one z (seed 1), same batch: l+ and l- "
                  "differ by the forward's rounding only.", ""]
        lines += [f"- {name}: max |l(fused) - l(per-half)| {c['max_abs_diff']:.3g}; slope (l+ - l-) / 2eps "
                  f"{c['slope_fused']:.6g} fused, {c['slope_per_half']:.6g} per half" for name, c in checks]
    if "gpu" not in env:
        lines += ["", "The same steps in this process's CPU time (ms/step; less moved than wall time by other "
                  "processes on a shared CPU):", "", "| config | " + " | ".join(METHODS) + " |",
                  "|---|" + "---|" * len(METHODS)]
        for name, row in results["configs"].items():
            if "host_cpu_ms" in row:
                lines.append(f"| {name} | " + " | ".join(f"{row['host_cpu_ms'][m]:.1f}" if m in row["host_cpu_ms"]
                                                         else "" for m in METHODS) + " |")
    lines += ["", "Per-step medians (synchronised every step) are in results.json (`ms_median_synced`); host CPU "
              "time per step in `host_cpu_ms`."]
    return "\n".join(lines) + "\n"


def load_baseline(source: Path):
    """DIR/zolite imported as the package `zolite_baseline` (zolite's modules import each other relatively), so two
    versions of the step run in one process on one model."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("zolite_baseline", source / "zolite" / "__init__.py",
                                                  submodule_search_locations=[str(source / "zolite")])
    package = importlib.util.module_from_spec(spec)
    sys.modules["zolite_baseline"] = package
    spec.loader.exec_module(package)
    import importlib

    return SimpleNamespace(zo=importlib.import_module("zolite_baseline.zo"),
                           optim=importlib.import_module("zolite_baseline.optim"),
                           tune=importlib.import_module("zolite_baseline.tune"), source=str(source))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma-separated, of: {', '.join(CONFIGS)}")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=50, help="timed steps per method per round")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps per method per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--step-samples", type=int, default=5, help="synchronised single steps per method per round")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--backprop-micro-batch", type=int, default=8)
    ap.add_argument("--data", help="task data folder (DIR/sst2/train.jsonl.gz, ...); default: the bundled samples")
    ap.add_argument("--model-dir", type=Path, default=Path("/root/llama7b-random"),
                    help="where the Llama-2-7B-shaped model is built (once)")
    ap.add_argument("--only", default=",".join(DEFAULT_METHODS),
                    help=f"methods to time (default: all but backprop), of: {', '.join(METHODS)}")
    ap.add_argument("--profile-steps", type=int, default=10, help="how many steps --profile records (default 10)")
    ap.add_argument("--profile", metavar="METHOD",
                    help="also profile --profile-steps steps of this method (torch.profiler): OUT/profile-CONFIG-METHOD.txt")
    ap.add_argument("--baseline", type=Path,
                    help="a source tree holding another zolite package (DIR/zolite): its step is timed too")
    args = ap.parse_args()
    device = torch.device(args.device)
    baseline = load_baseline(args.baseline) if args.baseline else None
    methods = tuple(m for m in METHODS if m in args.only.split(",") and (baseline or not m.startswith("base")))
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"argv": shlex.join(sys.argv), "env": environment(device),
               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                            if k != "out"} | {"lr": LR},
               "configs": {}}

    def save():
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
        (args.out / "results.md").write_text(table(results))

    from zolite.tune_setup import fp32_matmuls

    for name in args.configs.split(","):
        spec = CONFIGS[name]
        print(f"{name}: {spec}", flush=True)
        try:
            with fp32_matmuls(spec.get("tf32", False)):
                row = measure(spec, args, device, methods, baseline, name)
            row["tf32"] = spec.get("tf32", False)
        except Exception as e:   # noqa: BLE001  (a failed config is recorded; the others still run)
            row = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
        gc.collect()   # the config's model goes before the next one loads
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if "error" not in row:
            row["ratios"] = ratios(row)
        results["configs"][name] = row
        print(json.dumps(row), flush=True)
        save()
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
