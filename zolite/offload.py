"""Offload mode, host side: the weights accelerate streams to the GPU are kept in pinned memory, and each decoder
layer's copy is issued one layer ahead on a side stream, so it overlaps the previous layer's compute (ZO2's
scheme, on top of accelerate's hooks rather than instead of them).

accelerate's offload hooks read a module's weights from a shared dict (`weights_map`) in their pre-forward and move
them to the GPU; a value already on the GPU is used as it is. The prefetcher puts layer i+1's GPU copies into that
dict while layer i runs, and puts the pinned host tensors back once layer i+1 has run.
"""
from __future__ import annotations

import sys
from contextlib import nullcontext

import torch

from .layers import decoder_layers


def stream_offloaded_layers(model: torch.nn.Module, device: torch.device) -> "LayerPrefetcher | None":
    """Pin the offloaded weights and start prefetching decoder layers (a GPU only); warns and carries on unpinned
    when page-locked memory is refused (some systems limit it): the copies then run, slower, from pageable memory."""
    if device.type != "cuda":
        return None
    try:
        pin_offloaded_weights(model)
    except RuntimeError as e:
        print(f"zolite: offload weights not pinned ({str(e).splitlines()[0]}); copies will be slower", file=sys.stderr)
    return LayerPrefetcher(model, device)


def offload_stores(model: torch.nn.Module) -> list[dict]:
    """The dicts accelerate's offload hooks read weights from (usually one, shared by every hook)."""
    stores = {}
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        for h in getattr(hook, "hooks", [hook]):
            weights_map = getattr(h, "weights_map", None) if getattr(h, "offload", False) else None
            dataset = getattr(weights_map, "dataset", None)                 # PrefixedDataset -> the shared store
            store = getattr(dataset, "state_dict", dataset)                 # OffloadedWeightsLoader keeps a dict
            if isinstance(store, dict):
                stores[id(store)] = store
    return list(stores.values())


class LayerPrefetcher:
    """Copies offloaded decoder layer i+1 to the GPU on a side stream while layer i computes.

    GPU memory: one more decoder layer than accelerate alone (the one in flight). Layers kept on the GPU (the tuned
    ones) are skipped; the first offloaded layer is fetched when the decoder starts."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        prefix, layers = decoder_layers(model)
        stores = offload_stores(model)
        self.device = device
        self.entries = {i: [(store, key) for store in stores for key in store if key.startswith(f"{prefix}.{i}.")]
                        for i in range(len(layers))}
        offloaded = [i for i in range(len(layers)) if self.entries[i]]
        self.following = dict(zip(offloaded, offloaded[1:]))
        self.host: dict[tuple[int, str], torch.Tensor] = {}   # the pinned tensors a GPU copy stands in for
        self.ready: dict[int, object] = {}                       # layer -> its copy's CUDA event (or None)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.fetched: list[int] = []                             # layers fetched ahead, in order (for tests)
        if not offloaded:
            return
        first = offloaded[0]
        decoder_owner = model.get_decoder() if hasattr(model, "get_decoder") else model
        decoder_owner.register_forward_pre_hook(lambda *_: self._fetch(first))
        for i in offloaded:
            layers[i].register_forward_pre_hook(lambda *_, i=i: self._before(i))
            layers[i].register_forward_hook(lambda *_, i=i: self._after(i))

    def _fetch(self, i: int) -> None:
        if i in self.ready:
            return
        self.fetched.append(i)
        with torch.cuda.stream(self.stream) if self.stream is not None else nullcontext():
            for store, key in self.entries[i]:
                host = store[key]
                if host.device.type != "cpu":   # still there from a forward that was cut short
                    continue
                self.host[(id(store), key)] = host
                store[key] = host.to(self.device, non_blocking=True)
            event = None
            if self.stream is not None:
                event = torch.cuda.Event()
                event.record(self.stream)
        self.ready[i] = event

    def _before(self, i: int) -> None:
        if i in self.ready:
            event = self.ready.pop(i)
            if event is not None:   # the compute stream waits for the copy; the copies are now used on it
                compute = torch.cuda.current_stream(self.device)
                compute.wait_event(event)
                for store, key in self.entries[i]:
                    store[key].record_stream(compute)
        if i in self.following:
            self._fetch(self.following[i])

    def _after(self, i: int) -> None:
        for store, key in self.entries[i]:
            host = self.host.pop((id(store), key), None)
            if host is not None:
                store[key] = host


def pin_offloaded_weights(model: torch.nn.Module, allocate=None) -> int:
    """Move the CPU copies accelerate streams from (its hooks' weights maps) into pinned memory; returns the bytes.

    A copy from pageable memory goes through a staging buffer at a fraction of PCIe bandwidth: on the H200 an offload
    step moved 12.2 GiB per forward and took 7.8x the fp16 step. The tensors are packed into a few pinned slabs of a
    power-of-two size: torch's pinned allocator rounds every request up to a power of two, so pinning an 86 MiB matrix
    on its own would lock 128 MiB. Tied tensors stay one copy. allocate(nbytes) -> uint8 tensor (tests pass a
    pageable one: pinning needs a GPU)."""
    allocate = allocate or (lambda n: torch.empty(n, dtype=torch.uint8, pin_memory=True))
    places: dict[int, list] = {}     # data_ptr -> [(store, key)]: tied entries share one copy
    for store in offload_stores(model):
        for key, tensor in store.items():
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu" and tensor.numel():
                places.setdefault(tensor.data_ptr(), []).append((store, key))

    def current(ptr):   # read through the store, so no reference to an original outlives its replacement
        store, key = places[ptr][0]
        return store[key]

    nbytes = {ptr: current(ptr).numel() * current(ptr).element_size() for ptr in places}
    for ptr, space in _slab_spaces(nbytes, allocate):   # one tensor at a time: RAM never holds two full copies
        tensor = current(ptr)
        pinned = space.view(tensor.dtype).view(tensor.shape).copy_(tensor)
        for store, key in places[ptr]:
            store[key] = pinned
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
