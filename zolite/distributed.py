"""Data-parallel ZO over torch.distributed: the plumbing, kept out of the tune loop.

Ranks that share a step's seed draw the same z, so they need to exchange only what the step's losses are made of:
each rank evaluates its contiguous slice of the step's global batch and one all_reduce sums (sum of l+ over its
rows, sum of l- over its rows, rows) in float64; every rank then applies the same update. Val and test scoring are
split the same way and their predictions gathered. Never gradients, never weights.

A one-process run is world size 1: `World()` reduces nothing and needs no process group, so the tune loop has one
code path. `join()` reads the rank and world size torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK) and starts the
process group: gloo for CPU tensors, NCCL for CUDA ones. `launch()` starts N workers through torch's elastic
launcher (what `zolite tune --nproc N` runs).
"""
from __future__ import annotations

import contextlib
import datetime
import os
import signal
import sys
import threading

import torch

from .errors import ZoliteError

# How long a collective waits for the other ranks: covers a slow rank's model load before the first one.
TIMEOUT = datetime.timedelta(minutes=10)
RESUME_HINT = "the run stopped at its last checkpoint: resume it with `zolite tune --resume RUN_DIR` (any --nproc)"


class Quiet(ZoliteError):
    """An error rank 0 prints for every rank: the CLI exits 2 without printing it again."""
    quiet = True


class PeerLost(ZoliteError):
    """Another process of the run stopped (died, was killed, or its machine went away)."""


class World:
    """This process's place in the run: rank, world size, and the collectives the tune loop uses.

    `exchanged` counts the payload bytes this rank put into all_reduces (what `sum` sends); a ring all_reduce moves
    about 2 (size - 1) / size times that per rank on the wire, plus headers."""

    def __init__(self, rank: int = 0, size: int = 1, local_rank: int = 0, backend: str | None = None):
        self.rank, self.size, self.local_rank, self.backend = rank, size, local_rank, backend
        self.device = torch.device("cpu")   # where the losses are reduced: set to the model's device (NCCL on CUDA)
        self.exchanged = 0
        self.reduces = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return f"rank {self.rank} of {self.size}"

    # --- the data ---
    def shard(self, items: list) -> list:
        """This rank's contiguous slice of `items`: sizes differ by at most one, the larger ones first."""
        q, r = divmod(len(items), self.size)
        start = self.rank * q + min(self.rank, r)
        return items[start:start + q + (self.rank < r)]

    # --- the collectives ---
    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over the ranks, in float64 (world size 1: the values as given)."""
        if self.size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        with self._collective("all_reduce"):
            torch.distributed.all_reduce(t)
        self.exchanged += t.numel() * t.element_size()
        self.reduces += 1
        return t.tolist()

    def gather(self, items: list) -> list:
        """Every rank's list, concatenated in rank order (with shard(): the original order)."""
        if self.size == 1:
            return list(items)
        out = [None] * self.size
        with self._collective("all_gather"):
            torch.distributed.all_gather_object(out, items)
        return [x for part in out for x in part]

    def share(self, compute):
        """compute() on rank 0 (the one that reads and writes the run folder), its result on every rank; a
        ZoliteError it raises is raised on every rank (printed by rank 0 only)."""
        if self.size == 1:
            return compute()
        message = None
        if self.main:
            try:
                box = [("ok", compute())]
            except ZoliteError as e:
                box, message = [("error", str(e))], e
        else:
            box = [None]
        with self._collective("broadcast"):
            torch.distributed.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "ok":
            return value
        if self.main:
            raise message
        raise Quiet(value)

    def agree(self, compute):
        """compute() on every rank; if it raises a ZoliteError on any, every rank raises: rank 0 prints the first
        failing rank's message (naming the rank when rank 0 did not fail), the others exit quietly."""
        if self.size == 1:
            return compute()
        try:
            result, error = compute(), None
        except ZoliteError as e:
            result, error = None, str(e)
        errors = self.gather([error])
        failed = [(r, e) for r, e in enumerate(errors) if e is not None]
        if not failed:
            return result
        rank, first = failed[0]
        if self.main:
            raise ZoliteError(first if rank == 0 else f"rank {rank} of {self.size}: {first}")
        raise Quiet(first)

    def check_same(self, what: str, value) -> None:
        """Every rank must hold the same `value` (the device that draws z, the base's fingerprint, ...)."""
        if self.size == 1:
            return
        values = self.gather([value])
        odd = [r for r, v in enumerate(values) if v != values[0]]
        if odd:
            raise (ZoliteError if self.main else Quiet)(
                f"the ranks differ in {what}: rank 0 has {values[0]!r}, rank {odd[0]} {values[odd[0]]!r}; every rank "
                "must load the same base on the same kind of device (the same z are drawn only there)")

    @contextlib.contextmanager
    def _collective(self, name: str):
        """A peer's death surfaces here as the backend's error; it becomes one line."""
        try:
            yield
        except (RuntimeError, ValueError) as e:   # DistBackendError, DistNetworkError, gloo's "Connection closed"
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise PeerLost(f"{self.describe()}: another process of this run stopped ({name} failed: {first}); "
                           f"{RESUME_HINT}") from None

    def leave(self) -> None:
        if self.size > 1:
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()


def in_worker() -> bool:
    """True inside a process started by torchrun (or `zolite tune --nproc`)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join() -> World:
    """This process's World: from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), with the
    process group started; world size 1 (no group) outside torchrun."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    # CPU tensors (object collectives, CPU runs) go through gloo, CUDA tensors (a GPU run's losses) through NCCL
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    if not torch.distributed.is_initialized():
        try:
            torch.distributed.init_process_group(backend, rank=rank, world_size=size, timeout=TIMEOUT)
        except (RuntimeError, ValueError) as e:
            raise ZoliteError(f"rank {rank} of {size} could not join the run's process group "
                              f"({str(e).strip().splitlines()[0][:200]})") from None
    world = World(rank, size, local_rank, backend)

    def stopped(signum, frame):   # torchrun stops the others when a process fails: one line, not a silent death
        raise PeerLost(f"{world.describe()}: stopped by the launcher (SIGTERM: another process of this run failed); "
                       f"{RESUME_HINT}")
    if threading.current_thread() is threading.main_thread():   # (signals can only be handled there)
        signal.signal(signal.SIGTERM, stopped)
    return world


def local_device(device: str | None, world: World) -> str | None:
    """With several processes, a CUDA run's rank uses GPU LOCAL_RANK (CUDA_VISIBLE_DEVICES picks which GPUs),
    whatever index the config recorded; other devices as given."""
    if world.size == 1 or device is None and not torch.cuda.is_available():
        return device
    if device is None or torch.device(device).type == "cuda":
        return f"cuda:{world.local_rank % max(1, torch.cuda.device_count())}"
    return device


@contextlib.contextmanager
def quiet_unless_main(world: World):
    """Rank 0 alone prints (progress bar, warnings, notes); the others' stdout and stderr are dropped meanwhile
    (an error still reaches the CLI, which prints it after this block)."""
    if world.main:
        yield
        return
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        yield


# --- launching N processes on this machine ---
PEER_LOST_EXIT = 3   # a launched process that lost another exits with this, silently: the launcher says which died


def launch(nproc: int, function, *args, **kwargs):
    """Run function(*args, **kwargs) in `nproc` processes started by torch's elastic launcher (as torchrun
    --standalone --nproc-per-node N would), each with torchrun's environment; returns rank 0's result. A failed
    process stops the others; its error is one line (the worker's own, or which process died and how)."""
    import logging
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    for name in ("torch.distributed.elastic", "torch.multiprocessing"):   # their banners are not for users
        logging.getLogger(name).setLevel(logging.CRITICAL)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0, monitor_interval=0.1,
                          start_method="spawn")
    with _worker_environment(nproc):
        try:
            results = elastic_launch(config, _worker)(function, args, kwargs)
        except ChildFailedError as e:
            if any(f.exitcode == 2 for f in e.failures.values()):
                raise Quiet("a worker's error (printed above)") from None   # it printed its own line
            # the root cause: not a process that lost another, nor one the launcher stopped (SIGTERM)
            causes = {r: f for r, f in e.failures.items() if f.exitcode not in (PEER_LOST_EXIT, -signal.SIGTERM)}
            rank, failure = min((causes or e.failures).items(), key=lambda item: item[1].timestamp)
            how = (f"was killed by {failure.signal_name()}" if failure.exitcode < 0
                   else "lost another process" if failure.exitcode == PEER_LOST_EXIT
                   else f"exited with code {failure.exitcode}")
            raise ZoliteError(f"process {rank} of {nproc} {how}; {RESUME_HINT}") from None
    return results[0]


@contextlib.contextmanager
def _worker_environment(nproc: int):
    """What the workers inherit: CPU threads shared out (as torchrun does: N processes each spinning every core's
    OpenMP threads slow a CPU run down tens of times), progress bars off if they are off here, and no warning from
    multiprocessing's resource tracker about what a killed worker left behind."""
    changes = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // nproc)),
               "PYTHONWARNINGS": ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"),
                                                         "ignore::UserWarning:multiprocessing.resource_tracker"]))}
    bars = sys.modules.get("transformers.utils.logging")
    if bars is not None and not bars.is_progress_bar_enabled():
        changes["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    before = {k: os.environ.get(k) for k in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _worker(function, args, kwargs):
    """One process of launch(): a ZoliteError is one line on stderr (exit 2), as the CLI prints it; a process that
    lost another exits quietly (the launcher names the one that died)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)   # stopped with the launcher, without a traceback
    try:
        return function(*args, **kwargs)
    except PeerLost:
        sys.exit(PEER_LOST_EXIT)
    except ZoliteError as e:
        if not getattr(e, "quiet", False):
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
