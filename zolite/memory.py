"""Where the memory went: peak GPU allocated / reserved and CPU RSS per phase of a run, a timeline, and a
breakdown of the static part (frozen weights by dtype, tuned layer, master copy), written as JSON, markdown and a plot.

Phases nest (`train` holds its `forward ±eps`, `update` and `eval` phases); a phase that runs many times (one
per step) is aggregated: count, total seconds and the worst peak. GPU figures come from torch's caching allocator
(`max_memory_allocated` / `max_memory_reserved`, reset at each phase start), CPU RSS from psutil, sampled every
`interval` seconds by a background thread for the timeline.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import torch

from .io import write_text

GIB = 2**30


class MemoryProfiler:
    def __init__(self, device, interval: float = 0.05):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self.t0 = time.perf_counter()
        self.process = psutil.Process()
        self.phases: dict[str, dict] = {}     # name -> {start, end, seconds, count, gpu_*_peak, cpu_rss_peak, top}
        self.samples: list[tuple] = []        # (t, gpu allocated, gpu reserved, cpu rss), bytes
        self.rss_peak = 0
        self._stack: list[list] = []          # [name, running peak allocated, running peak reserved]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_loop, args=(interval,), daemon=True)
        self._thread.start()

    def _now(self) -> float:
        return time.perf_counter() - self.t0

    def _sample(self) -> tuple:
        alloc = torch.cuda.memory_allocated(self.device) if self.cuda else 0
        reserved = torch.cuda.memory_reserved(self.device) if self.cuda else 0
        sample = (self._now(), alloc, reserved, self.process.memory_info().rss)
        self.samples.append(sample)
        self.rss_peak = max(self.rss_peak, sample[3])
        return sample

    def _sample_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self._sample()

    def _gpu_peaks(self) -> tuple[int, int]:
        if not self.cuda:
            return 0, 0
        return torch.cuda.max_memory_allocated(self.device), torch.cuda.max_memory_reserved(self.device)

    @contextmanager
    def phase(self, name: str):
        """Measure the block as phase `name` (repeated blocks of one name are aggregated)."""
        if self._stack:   # the enclosing phase keeps the peak it reached so far
            alloc, reserved = self._gpu_peaks()
            self._stack[-1][1], self._stack[-1][2] = max(self._stack[-1][1], alloc), max(self._stack[-1][2], reserved)
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        first = len(self.samples)   # this phase's samples come after: no rescan of the whole run at its end
        start = self._sample()[0]
        self.phases.setdefault(name, {"start": start, "seconds": 0.0, "count": 0, "gpu_allocated_peak": 0,
                                      "gpu_reserved_peak": 0, "cpu_rss_peak": 0, "top": not self._stack})
        self._stack.append([name, 0, 0])
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize(self.device)
            end = self._sample()[0]
            _, own_alloc, own_reserved = self._stack.pop()
            alloc, reserved = self._gpu_peaks()
            alloc, reserved = max(alloc, own_alloc), max(reserved, own_reserved)
            if self._stack:
                self._stack[-1][1], self._stack[-1][2] = max(self._stack[-1][1], alloc), max(self._stack[-1][2], reserved)
            rss = max(s[3] for s in self.samples[first:] if start <= s[0] <= end)
            entry = self.phases[name]
            entry["end"] = end
            entry["seconds"] += end - start
            entry["count"] += 1
            entry["gpu_allocated_peak"] = max(entry["gpu_allocated_peak"], alloc)
            entry["gpu_reserved_peak"] = max(entry["gpu_reserved_peak"], reserved)
            entry["cpu_rss_peak"] = max(entry["cpu_rss_peak"], rss)

    def stop(self) -> None:
        """End the sampling thread (again: no-op)."""
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join()
            self._sample()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:   # a run that fails must not leave its sampler running
        self.stop()

    def peaks(self) -> dict:
        """The run's peaks so far, over every phase (each phase resets torch's own peak counters): GiB."""
        out = {"cpu_rss_peak_gib": _gib(self.rss_peak)}
        if self.cuda:
            alloc, reserved = self._gpu_peaks()
            for p in self.phases.values():
                alloc, reserved = max(alloc, p["gpu_allocated_peak"]), max(reserved, p["gpu_reserved_peak"])
            out["gpu_allocated_peak_gib"] = _gib(alloc)
            out["gpu_reserved_peak_gib"] = _gib(reserved)
        return out

    def report(self, static: dict, activations_from: str = "train", extra: dict | None = None) -> dict:
        """The profile as plain numbers (GiB, seconds): phases, static breakdown, activations, allocator slack."""
        self.stop()
        phases = {name: {"seconds": round(p["seconds"], 3), "count": p["count"], "top_level": p["top"],
                         "start_s": round(p["start"], 3), "end_s": round(p["end"], 3),
                         "gpu_allocated_peak_gib": _gib(p["gpu_allocated_peak"]),
                         "gpu_reserved_peak_gib": _gib(p["gpu_reserved_peak"]),
                         "cpu_rss_peak_gib": _gib(p["cpu_rss_peak"])} for name, p in self.phases.items()}
        breakdown = dict(static)
        peak = self.phases.get(activations_from)
        if peak is not None and self.cuda:
            resident = static["gpu_resident_bytes"]
            breakdown["activations_and_temporaries_gib"] = _gib(max(0, peak["gpu_allocated_peak"] - resident))
            breakdown["allocator_slack_gib"] = _gib(peak["gpu_reserved_peak"] - peak["gpu_allocated_peak"])
        return {"device": str(self.device), "gpu": torch.cuda.get_device_name(self.device) if self.cuda else None,
                "phases": phases, "breakdown": breakdown, **(extra or {}),
                "timeline": _downsample(self.samples, 2000)}


def _downsample(samples: list[tuple], points: int) -> list[list]:
    """At most `points` rows: each the bucket's first time and its largest memory values (peaks survive)."""
    k = max(1, -(-len(samples) // points))
    rows = []
    for i in range(0, len(samples), k):
        bucket = samples[i:i + k]
        rows.append([round(bucket[0][0], 3), *(_gib(max(s[j] for s in bucket)) for j in (1, 2, 3))])
    return rows


def weight_breakdown(model: torch.nn.Module, tuned) -> dict:
    """Bytes of the frozen weights by dtype and place, the quantization statistics bitsandbytes keeps beside them
    (NF4 block absmax, LLM.int8 row scales: not parameters, so not counted as weights), the tuned layers, and their
    compensation residuals (the master copy's share beyond the weights themselves)."""
    tuned_ids = {id(p) for p in tuned.params}
    frozen: dict[str, int] = {}
    gpu_resident = 0
    seen = set()

    def count(tensor, label: str) -> None:
        nonlocal gpu_resident
        # one memory counted once (LLM.int8's CB is its weight's data); meta and empty tensors all have data_ptr 0,
        # and offload packs many tensors into one pinned slab (one storage), so the key is the tensor's own bytes
        real = tensor.numel() and tensor.device.type != "meta"
        key = (tensor.device, tensor.data_ptr(), tensor.numel() * tensor.element_size()) if real else (id(tensor),)
        if key in seen:
            return
        seen.add(key)
        size = tensor.numel() * tensor.element_size()
        gpu_resident += size if tensor.device.type == "cuda" else 0
        if id(tensor) not in tuned_ids:
            name = f"{label}{str(tensor.dtype).removeprefix('torch.')} on {tensor.device.type}"
            frozen[name] = frozen.get(name, 0) + size

    for tensor in [*model.parameters(), *model.buffers()]:
        count(tensor, "")
    for param in model.parameters():
        for tensor in _quantization_state(param):
            count(tensor, "quantization statistics, ")
    tuned_bytes = sum(p.numel() * p.element_size() for p in tuned.params)
    master_bytes = sum(r.numel() * r.element_size() for r in tuned.residuals if r is not None)
    on_gpu = any(p.device.type == "cuda" for p in tuned.params)
    return {"frozen_weights_gib": {k: _gib(v) for k, v in sorted(frozen.items())},
            "tuned_layers_gib": _gib(tuned_bytes), "master_copy_gib": _gib(master_bytes),
            "gpu_resident_bytes": gpu_resident + (master_bytes if on_gpu else 0)}


def _quantization_state(param) -> list[torch.Tensor]:
    """Tensors bitsandbytes hangs on a quantized parameter: Int8Params' CB/SCB, Params4bit's quant_state (absmax,
    code, and the nested state of double quantization)."""
    found = [v for v in vars(param).values() if isinstance(v, torch.Tensor)]
    state = getattr(param, "quant_state", None)
    while state is not None:
        found += [v for v in vars(state).values() if isinstance(v, torch.Tensor)]
        state = getattr(state, "state2", None)
    return found


def _gib(n: int) -> float:
    return round(n / GIB, 4)


def markdown(profile: dict, title: str) -> str:
    b = profile["breakdown"]
    gpu = profile["gpu"] is not None
    lines = [f"# {title}", "", f"Device: {profile['gpu'] or profile['device']}.", "",
             "| phase | runs | seconds |" + (" GPU allocated peak GiB | GPU reserved peak GiB |" if gpu else "")
             + " CPU RSS peak GiB |", "|---|---|---|" + ("---|---|" if gpu else "") + "---|"]
    for name, p in profile["phases"].items():
        label = name if p["top_level"] else f"  - {name}"
        cells = [label, p["count"], f"{p['seconds']:.2f}"]
        cells += [f"{p['gpu_allocated_peak_gib']:.3f}", f"{p['gpu_reserved_peak_gib']:.3f}"] if gpu else []
        lines.append("| " + " | ".join(map(str, cells + [f"{p['cpu_rss_peak_gib']:.3f}"])) + " |")
    lines += ["", "Where it went:", ""]
    for key, gib in b["frozen_weights_gib"].items():
        lines.append(f"- frozen weights, {key}: {gib:.3f} GiB")
    lines.append(f"- tuned layer(s): {b['tuned_layers_gib']:.3f} GiB; master copy beyond them (residuals): "
                 f"{b['master_copy_gib']:.3f} GiB")
    if "activations_and_temporaries_gib" in b:
        lines.append(f"- activations, optimiser state and temporaries (peak during training minus resident weights): "
                     f"{b['activations_and_temporaries_gib']:.3f} GiB")
        lines.append(f"- allocator slack (reserved peak minus allocated peak during training): "
                     f"{b['allocator_slack_gib']:.3f} GiB")
    for key in ("step_ms", "tokens_per_s", "plan"):
        if key in profile:
            lines.append(f"- {key.replace('_', ' ')}: {profile[key]}")
    return "\n".join(lines) + "\n"


def plot(profile: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s[0] for s in profile["timeline"]]
    fig, ax = plt.subplots(figsize=(10, 4))
    if profile["gpu"]:
        ax.plot(t, [s[1] for s in profile["timeline"]], label="GPU allocated")
        ax.plot(t, [s[2] for s in profile["timeline"]], label="GPU reserved")
    ax.plot(t, [s[3] for s in profile["timeline"]], label="CPU RSS")
    colors = ["#eeeeee", "#dde8f5"]
    for k, (name, p) in enumerate((n, p) for n, p in profile["phases"].items() if p["top_level"]):
        ax.axvspan(p["start_s"], p["end_s"], color=colors[k % 2], zorder=0)
        ax.text((p["start_s"] + p["end_s"]) / 2, 0.98, name, transform=ax.get_xaxis_transform(), ha="center",
                va="top", fontsize=8)
    ax.set(xlabel="seconds", ylabel="GiB", title=title)
    ax.legend(loc="center right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_memory_report(profile: dict, out_dir: Path, title: str, summary: str = "") -> None:
    """report.md (`summary`, then the memory tables) and memory.png in out_dir; the JSON is the caller's."""
    write_text(out_dir / "report.md", (summary + "\n" if summary else "") + markdown(profile, title))
    plot(profile, out_dir / "memory.png", title)
