"""Offload mode: the frozen weights stay in pinned CPU memory and are streamed to the GPU for each forward, each
module's copy issued one module ahead on a side CUDA stream so it overlaps the previous module's compute (ZO2's
scheme). The tuned layers, the input embedding, norms and buffers live on the GPU.

Why not accelerate's offload hooks (what this mode used first): they copy each tensor synchronously from pageable
memory and empty the CUDA cache after every one (`set_module_tensor_to_device`'s `clear_cache`), so copies never
overlap compute: on an H200 the 7B-shaped ZO step took 7.8x the fp16 one.

The streamed units are the frozen decoder layers' Linears and the output head (unless it is tied to the input
embedding). A unit's forward pre-hook makes the compute stream wait for its copy, puts the GPU copies in its
`_parameters` for this forward and issues the copy of the unit that ran after it in the first forward; its forward
hook (always called, a failed forward included) puts the pinned Parameters back.
"""
from __future__ import annotations

import sys
import weakref
from contextlib import nullcontext

import torch

from .layers import decoder_layers, is_weight_matrix


def stream_from_cpu(model: torch.nn.Module, device: torch.device, keep_layers=(), allocate=None) -> "ModuleStreamer":
    """Set up offload on a model loaded in CPU memory: stream the frozen decoder layers' Linears and the (untied)
    head from pinned memory; move everything else to `device`: the kept layers, norms, buffers and the input
    embedding (a lookup needs no streaming, and the model's first parameter on the GPU is where callers and
    `generate` put the inputs). The streamer is kept on the model (`model.zolite_streamer`).
    allocate(nbytes) -> uint8 tensor for the pinned slabs (tests pass pageable memory: pinning needs a GPU)."""
    _, layers = decoder_layers(model)
    units = []
    for i, layer in enumerate(layers):
        if i not in keep_layers:
            units += [m for m in layer.modules() if is_weight_matrix(m)]
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight is not embedding.weight:   # a head tied to the embedding stays with it
        units.append(head)
    streamed = {id(p) for unit in units for p in unit.parameters(recurse=False)}
    with torch.no_grad():
        for module in model.modules():
            for name, p in module._parameters.items():
                if p is not None and id(p) not in streamed:
                    p.data = p.data.to(device)
            for name, b in module._buffers.items():
                if b is not None:
                    module._buffers[name] = b.to(device)
    try:
        pin_parameters([p for unit in units for p in unit.parameters(recurse=False)], allocate)
    except RuntimeError as e:   # page-locked memory is limited on some systems: pageable copies still work
        print(f"zolite: offload weights not pinned ({str(e).splitlines()[0]}); copies will be slower", file=sys.stderr)
    streamer = ModuleStreamer(model, units, device)
    model.zolite_streamer = streamer   # the hooks hold it weakly: it lives and dies with the model
    return streamer


class ModuleStreamer:
    """Hooks that give each streamed unit a GPU copy of its weights for the length of its forward.

    Prefetch follows the order the units ran in during the first forward (registration order is not always
    execution order: OPT registers k, v, q). Before issuing unit k+1's copy the host waits for unit k's copy and for
    the compute of the unit before k, so whatever the host's lead, about three units' copies are alive on the GPU."""

    def __init__(self, model: torch.nn.Module, units: list[torch.nn.Module], device: torch.device):
        self.units = units
        self.device = device
        self.params = [[(name, p) for name, p in unit._parameters.items() if p is not None] for unit in units]
        self.ready: dict[int, tuple] = {}      # unit -> (its copy's CUDA event or None, {name: GPU tensor})
        self.computed: dict[int, object] = {}  # unit -> CUDA event recorded on the compute stream after it ran
        self.seen: list[int] = []              # units in the order the first forward ran them
        self.following: dict[int, int] | None = None   # learned from `seen` at the start of the second forward
        self.previous: int | None = None       # the unit that ran last in this forward
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.copies = 0                        # copies issued (for tests)
        me = weakref.ref(self)
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
        decoder.register_forward_pre_hook(lambda *_: me()._start())
        for k, unit in enumerate(units):
            unit.register_forward_pre_hook(lambda _m, _a, k=k: me()._before(k))
            unit.register_forward_hook(lambda _m, _a, _o, k=k: me()._after(k), always_call=True)

    def _start(self) -> None:
        """A new forward of the decoder: learn the order once, drop copies fetched ahead and never used (the head,
        after a forward that wanted hidden states only)."""
        if self.following is None and self.seen:
            self.following = dict(zip(self.seen, self.seen[1:]))
        self.ready.clear()
        self.previous = None

    def _fetch(self, k: int) -> None:
        if k in self.ready:
            return
        self.copies += 1
        with torch.cuda.stream(self.stream) if self.stream is not None else nullcontext():
            copies = {name: p.data.to(self.device, non_blocking=True) for name, p in self.params[k]}
            event = None
            if self.stream is not None:
                event = torch.cuda.Event()
                event.record(self.stream)
        self.ready[k] = (event, copies)

    def _before(self, k: int) -> None:
        if self.following is None:
            self.seen.append(k)
        self._fetch(k)   # fetched ahead, or (first forward, or out of the learned order) now
        event, copies = self.ready.pop(k)
        if event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(event)
            for t in copies.values():
                t.record_stream(compute)   # freed by _after, reused only once this stream is past them
            event.synchronize()            # copies in flight: this unit's and the next one's
        unit = self.units[k]
        for name, t in copies.items():
            unit._parameters[name] = t
        done = self.computed.pop(self.previous, None)
        if done is not None:
            done.synchronize()             # the host stays within two units of the GPU's compute
        self.previous = k
        upcoming = self.following.get(k) if self.following else None
        if upcoming is not None:
            self._fetch(upcoming)

    def _after(self, k: int) -> None:
        unit = self.units[k]
        for name, p in self.params[k]:
            unit._parameters[name] = p
        if self.stream is not None:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self.computed[k] = event


def pin_parameters(params: list[torch.nn.Parameter], allocate=None) -> int:
    """Move each distinct parameter's data into a few pinned slabs of one power-of-two size, one tensor at a time
    (RAM never holds two copies of the weights); returns the bytes. Slabs, not one pinned tensor each: torch's pinned
    allocator rounds every request up to a power of two, so an 86 MiB matrix alone would lock 128 MiB."""
    allocate = allocate or (lambda n: torch.empty(n, dtype=torch.uint8, pin_memory=True))
    unique = {id(p): p for p in params if p.numel() and p.device.type == "cpu"}
    nbytes = {key: p.numel() * p.element_size() for key, p in unique.items()}
    with torch.no_grad():
        for key, space in _slab_spaces(nbytes, allocate):
            p = unique[key]
            p.data = space.view(p.dtype).view(p.shape).copy_(p.data)
    return sum(nbytes.values())


def _slab_spaces(nbytes: dict, allocate, align: int = 512):
    """Yield (key, uint8 space of nbytes[key]) carved from slabs of one power-of-two size (>= 256 MiB), allocated as
    they fill, largest first."""
    if not nbytes:
        return
    padded = {k: -(-n // align) * align for k, n in nbytes.items()}
    slab_size = max(256 << 20, 1 << (max(padded.values()) - 1).bit_length())
    slab, used = None, slab_size
    for key in sorted(padded, key=padded.get, reverse=True):
        if used + padded[key] > slab_size:
            slab, used = allocate(slab_size), 0
        yield key, slab[used:used + nbytes[key]]
        used += padded[key]
