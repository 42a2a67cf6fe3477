"""CUDA graphs of a ZO step's doubled forward (issue 23).

A step of a small model (SmolLM2: ~600 kernels on 16 x 34 tokens) is bound by launching kernels from Python, not by
arithmetic. So the perturbed doubled forward (zo.TunedLayers.perturbed around scoring.last_hidden) is recorded once
per shape and replayed: one launch instead of hundreds.

- Static shapes: each batch's sequences are right-padded to a multiple of BUCKET tokens. Under causal attention a
  token never sees the padding after it, and scoring reads real positions only, so the padding changes no score
  (the matmuls' shapes change, which may move the forward's last bits: tests/test_graphs.py).
- z cannot be drawn inside a graph (its seed changes every step): each step draws it as always, into fixed buffers
  (TunedLayers.use_z_buffers), before the replay; the recorded kernels read them. The perturbed weights have the
  eager path's bits.
- One graph per (sequences, padded length, eps); all share one memory pool. They are replayed one at a time and
  each output is read before the next replay, which is what sharing a pool requires.
- Only the fused path (layers of small tensors: the launch-bound case) is graphed; a layer on the per-half path, a
  CPU model, or a forward that cannot be captured (the first failure is printed once) runs eagerly.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from .zo import TunedLayers

BUCKET = 32        # tokens: a BoolQ batch of up to 512 tokens has at most 16 shapes
MAX_GRAPHS = 48    # beyond this many shapes, new ones run eagerly (each graph keeps its output alive on the GPU:
                   # 2 x sequences x padded length x hidden values, 50 MiB for Qwen-1.5B at 16 x 512 tokens)


@dataclass
class Recorded:
    replay: object             # () -> None: run the recorded kernels again
    input_ids: torch.Tensor    # [sequences, padded length]: copy a batch in before replay
    hidden: torch.Tensor       # [2 * sequences, padded length, hidden]: the output of the last replay


def record(forward, input_ids: torch.Tensor, pool) -> tuple[Recorded, object]:
    """Capture forward(input_ids) -> hidden as a CUDA graph: warmed up on a side stream first (lazy
    initialisations, cuBLAS workspaces), as torch.cuda.graph requires. Returns the recording and its memory pool."""
    device = input_ids.device
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        forward(input_ids)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        hidden = forward(input_ids)
    return Recorded(graph.replay, input_ids, hidden), graph.pool()


class ForwardGraphs:
    """hidden(input_ids, seed, eps): the last hidden states of the batch doubled, rows [0, B) at W + eps z and
    [B, 2B) at W - eps z (as `with tuned.perturbed(seed, eps): last_hidden(model, input_ids)`), from a replayed
    CUDA graph; padded positions past the batch's length hold whatever the padding gives."""

    def __init__(self, model, tuned: TunedLayers, recorder=record):
        self.model, self.tuned, self.recorder = model, tuned, recorder
        self.recorded: dict[tuple, Recorded] = {}
        self.pool = None
        self.failed = False

    def summary(self) -> dict:
        """For the report: how many shapes were recorded, and whether capture failed (the steps then ran eagerly)."""
        return {"recorded_shapes": len(self.recorded), "capture_failed": self.failed}

    def usable(self, input_ids: torch.Tensor) -> bool:
        return self.tuned.fused and not self.failed and (input_ids.device.type == "cuda" or self.recorder is not record)

    def hidden(self, input_ids: torch.Tensor, seed: int, eps: float) -> torch.Tensor | None:
        """None when this batch runs eagerly (too many shapes, or capture failed)."""
        rows, length = input_ids.shape
        key = (rows, -(-length // BUCKET) * BUCKET, eps)
        self.tuned.fill_z(seed)
        recorded = self.recorded.get(key)
        if recorded is None:
            if len(self.recorded) >= MAX_GRAPHS:
                return None
            recorded = self._record(key, input_ids)
            if recorded is None:
                return None
        recorded.input_ids[:, :length].copy_(input_ids)
        recorded.replay()
        return recorded.hidden

    def _record(self, key: tuple, input_ids: torch.Tensor) -> Recorded | None:
        from .scoring import last_hidden

        rows, padded, eps = key
        static_ids = torch.zeros((rows, padded), dtype=input_ids.dtype, device=input_ids.device)

        def forward(ids):
            # the batch doubled from the first layer: under capture transformers builds an explicit causal mask
            # for the batch it is given, which the layers after a doubling one could not take
            with torch.inference_mode(), self.tuned.perturbed(None, eps, doubled_input=True):
                return last_hidden(self.model, torch.cat([ids, ids]))
        try:
            recorded, self.pool = self.recorder(forward, static_ids, self.pool)
        except Exception as e:   # noqa: BLE001 - any capture failure: the eager step is always there
            self.failed = True
            print(f"zolite: CUDA graphs are off for this run (capturing the forward failed: {type(e).__name__}: "
                  f"{str(e).splitlines()[0] if str(e) else ''}); the step runs eagerly", file=sys.stderr)
            return None
        self.recorded[key] = recorded
        return recorded
