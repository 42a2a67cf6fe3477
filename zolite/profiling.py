"""`zolite profile`: where a ZO run's memory and time go for a model, mode and batch shape, without task data.

Loads the model as `tune` would (same mode, same kept layer, same plan under --gpu-memory), then runs ZO steps
on random token sequences of the given shape (two single-token candidates per example, cross-entropy), lr 0 so the
weights stay as loaded. The first step is a warm-up; step time is the median of the others.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from .errors import ZoliteError
from .io import refuse_used_folder, write_json
from .layers import decoder_layers, format_layers
from .loading import resolve_device
from .memory import MemoryProfiler, weight_breakdown, write_memory_report
from .scoring import EncodedExample, collate, pad_token_id
from .optim import Stepper
from .plan import record_measured
from .scan import folder_identity
from .tune_setup import TuneConfig, check_options, load_for_tuning
from .zo import TunedLayers


def random_examples(vocab: int, batch_size: int, seq_len: int, seed: int = 0) -> list[EncodedExample]:
    """batch_size sequences of seq_len tokens, each scored on two one-token candidates at its last position."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch_size, seq_len + 1), generator=gen).tolist()
    return [EncodedExample(sequences=(tuple(row[:seq_len]),) * 2, answers=((row[seq_len],), (row[0],)), label=0,
                           accepted=(0,), context=tuple(row[:seq_len])) for row in ids]


def profile_memory(model: str = "smollm2-135m", *, mode: str | None = None, batch_size: int = 16, seq_len: int = 256,
                   steps: int = 5, layer: str | None = None, micro_batch: int | None = None, eps: float = 1e-3,
                   device=None, dtype=None, int8_threshold: float | None = None, gpu_memory: str | None = None,
                   out=None, force: bool = False, snapshot: bool = False) -> dict:
    """Profile `steps` ZO steps; writes report.json, report.md and memory.png to `out` when given."""
    if steps < 2:
        raise ZoliteError(f"--steps must be at least 2 (the first is a warm-up), got {steps}")
    if batch_size < 1 or seq_len < 2:
        raise ZoliteError("--batch-size must be at least 1 and --seq-len at least 2")
    if out is not None:
        refuse_used_folder(out, force)
    config = TuneConfig(model=model, layer=layer, mode=mode, batch_size=batch_size, max_length=seq_len + 1,
                        micro_batch=micro_batch, device=device, dtype=dtype, gpu_memory=gpu_memory, eps=eps,
                        **({"int8_threshold": int8_threshold} if int8_threshold is not None else {}))
    check_options(config)
    run_device = resolve_device(device)
    if snapshot and run_device.type != "cuda":
        raise ZoliteError("--snapshot records torch's CUDA memory history, and this run is on the CPU: drop --snapshot")
    t_start = time.perf_counter()
    with MemoryProfiler(run_device) as profiler:
        with profiler.phase("load"):
            loaded, indices, source, plan = load_for_tuning(config)
        net = loaded.model
        tuned = TunedLayers(net, indices)
        static = weight_breakdown(net, tuned)
        examples = random_examples(net.config.vocab_size, batch_size, seq_len)
        pad, device_ = pad_token_id(loaded.tokenizer), loaded.device
        micro = micro_batch or (plan.micro_batch if plan else None)
        # tune's step, lr 0: the weights stay as loaded
        stepper = Stepper(net, tuned, eps=eps, micro_batch=micro, phase=profiler.phase, lr=0.0,
                          collate_to_device=lambda c: collate(c, pad).to(device_))
        recording = snapshot and profiler.cuda
        if recording:
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        times = []
        with profiler.phase("train"):
            for step in range(steps):
                t0 = time.perf_counter()
                stepper.step(step, examples)
                times.append(time.perf_counter() - t0)
        step_ms = 1000 * statistics.median(times[1:])
        result = {
            "model": model, "mode": loaded.mode, "dtype": str(loaded.dtype).removeprefix("torch."),
            "layers": format_layers(indices, len(decoder_layers(net)[1])),
            "layer_source": source, "batch_size": batch_size, "micro_batch": micro or batch_size, "seq_len": seq_len,
            "steps": steps, "tuned_params": tuned.numel(), "total_s": round(time.perf_counter() - t_start, 2),
            "plan": plan.as_dict() if plan else None,
        }
        result["memory_profile"] = report = profiler.report(static, extra={
            "step_ms": round(step_ms, 2), "tokens_per_s": round(batch_size * seq_len / (step_ms / 1000), 1),
            "plan": plan.reason if plan else None})
        activations = report["breakdown"].get("activations_and_temporaries_gib")
        if activations is not None and len(indices) < len(decoder_layers(net)[1]):
            # measured on a GPU: the planner uses it for this model and mode from now on
            per_token = activations * 2**30 / (2 * (micro or batch_size) * seq_len)
            record_measured(folder_identity(loaded.path), loaded.mode, loaded.dtype, per_token,
                            {"batch": micro or batch_size, "seq_len": seq_len, "gpu": report["gpu"]})
            result["activation_bytes_per_token"] = round(per_token, 1)
        if out is not None:
            out = Path(out)
            out.mkdir(parents=True, exist_ok=True)
            if recording:
                torch.cuda.memory._dump_snapshot(str(out / "memory_snapshot.pickle"))
                torch.cuda.memory._record_memory_history(enabled=None)
                result["snapshot"] = str(out / "memory_snapshot.pickle")
            write_json(out / "report.json", result)
            title = (f"zolite profile {model}: mode {loaded.mode}, {result['dtype']}, layers {result['layers']}, "
                     f"batch {batch_size} x {seq_len}")
            summary = (f"{steps} ZO steps (first = warm-up), micro-batch {result['micro_batch']}: {step_ms:.1f} ms/step, "
                       f"{result['memory_profile']['tokens_per_s']:.0f} tokens/s (input tokens; the forward doubles the "
                       "batch from the tuned layer on).")
            write_memory_report(result["memory_profile"], out, title, summary)
        return result
