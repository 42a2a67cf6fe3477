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
- The graph ends at the answer tokens' hidden states (scoring.answer_hidden: [2, K, hidden]), so a recorded shape
  keeps only that small output alive. One graph per (sequences, padded length, answer tokens, eps), every shape
  recorded (whether a batch is graphed depends on nothing but its shape: a resumed run replays what the
  uninterrupted one did); all share one memory pool. They are replayed one at a time and each output is read
  before the next replay, which is what sharing a pool requires.
- Only the fused path (layers of small tensors: the launch-bound case) on the GPU is graphed, at the run's own eps
  (the lr probe's other eps run eagerly); a layer on the per-half path, an offloaded model, or a forward that cannot
  be captured (the first failure is printed once) runs eagerly. The z buffers are made on the first graphed batch.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from .zo import TunedLayers

# tokens: a shape per 8 tokens of length (a BoolQ batch of up to 512 tokens: at most 64 shapes, one memory pool).
# Where arithmetic bounds the step, padding costs in proportion: 32 padded SST-2's 34-token batch to 64 (1.9x)
BUCKET = 8


@dataclass
class Recorded:
    replay: object             # () -> None: run the recorded kernels again
    inputs: tuple              # (input ids [sequences, padded length], rows [K], positions [K]): copy a batch in
    answers: torch.Tensor      # [2, K, hidden]: answer_hidden of the last replay
    mask: object = None        # the attention mask(s) the kernels read: kept alive as long as they are


def record(forward, inputs: tuple, pool) -> tuple[Recorded, object]:
    """Capture forward(*inputs) as a CUDA graph: warmed up on a side stream first (lazy initialisations, cuBLAS
    workspaces), as torch.cuda.graph requires. Returns the recording and its memory pool."""
    device = inputs[0].device
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        forward(*inputs)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        answers = forward(*inputs)
    return Recorded(graph.replay, inputs, answers), graph.pool()


class ForwardGraphs:
    """answer_hidden(batch, seed, eps): scoring.answer_hidden of the batch doubled, copy 0 at W + eps z and copy 1 at
    W - eps z (as under `tuned.perturbed(seed, eps)`), from a replayed CUDA graph."""

    def __init__(self, model, tuned: TunedLayers, recorder=record):
        self.model, self.tuned, self.recorder = model, tuned, recorder
        self.recorded: dict[tuple, Recorded] = {}
        self.pool = None
        self.failed = False
        self.max_length = getattr(model.config, "max_position_embeddings", None)

    def summary(self) -> dict:
        """For the report: how many shapes were recorded, and whether capture failed (the steps then ran eagerly)."""
        return {"recorded_shapes": len(self.recorded), "capture_failed": self.failed}

    def usable(self, input_ids: torch.Tensor) -> bool:
        return (self.tuned.fused and not self.failed and getattr(self.model, "zolite_streamer", None) is None
                and (input_ids.device.type == "cuda" or self.recorder is not record))

    def answer_hidden(self, batch, seed: int, eps: float) -> torch.Tensor | None:
        """None when this batch runs eagerly (capture failed, or the model's layer types are not known here)."""
        rows, length = batch.input_ids.shape
        padded = -(-length // BUCKET) * BUCKET
        if self.max_length:   # not past the positions the model has (a learned position table would fault)
            padded = max(length, min(padded, self.max_length))
        key = (rows, padded, batch.rows.numel(), eps)
        self.tuned.use_z_buffers()
        self.tuned.fill_z(seed)
        recorded = self.recorded.get(key) or self._record(key, batch.input_ids.device)
        if recorded is None:
            return None
        ids, answer_rows, positions = recorded.inputs
        ids[:, :length].copy_(batch.input_ids)
        ids[:, length:].zero_()   # the same padding whatever came before (it is never attended to)
        answer_rows.copy_(batch.rows)
        positions.copy_(batch.positions)
        recorded.replay()
        return recorded.answers

    def _record(self, key: tuple, device: torch.device) -> Recorded | None:
        from .scoring import answer_hidden, batch_one_mask, last_hidden

        rows, padded, answers, eps = key
        inputs = (torch.zeros((rows, padded), dtype=torch.long, device=device),
                  torch.zeros(answers, dtype=torch.long, device=device),
                  torch.zeros(answers, dtype=torch.long, device=device))
        # Under capture transformers builds an explicit causal mask for the batch it is given (it cannot check the
        # inputs for padding), which the layers after the tuned one, on the doubled batch, could not take. A mask
        # given in 4D is used as is, and one of batch 1 broadcasts: B rows before the tuned layer, 2B after.
        mask = batch_one_mask(self.model, padded, device)
        if mask is None:
            return None

        def forward(ids, answer_rows, positions):
            with torch.inference_mode(), self.tuned.perturbed(None, eps):
                hidden = last_hidden(self.model, ids, attention_mask=mask)
            return answer_hidden(SimpleNamespace(input_ids=ids, rows=answer_rows, positions=positions), hidden)
        try:
            recorded, self.pool = self.recorder(forward, inputs, self.pool)
            recorded.mask = mask
        except Exception as e:   # noqa: BLE001 - any capture failure: the eager step is always there
            self.failed = True
            print(f"zolite: CUDA graphs are off for this run (capturing the forward failed: {type(e).__name__}: "
                  f"{str(e).splitlines()[0] if str(e) else ''}); the step runs eagerly", file=sys.stderr)
            return None
        self.recorded[key] = recorded
        return recorded
