"""Data-parallel tune over torch.distributed on the CPU (gloo), tiny model: two processes write the one-process patch
bit for bit, eval counts are gathered, a killed process stops the run with one line and the run resumes with another
world size (either way), and two "machines" (two torchrun agents, c10d rendezvous on 127.0.0.1) give the same patch."""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import zolite
from conftest import one_cpu_thread, run_cli
from test_errors import assert_user_error
from zolite.distributed import World
from zolite.optim import weighted_mean

# batch 4 over 2 processes: slices of 2; the one-process reference evaluates micro-batches of 2, the same forwards
COMMON = ["--task", "sst2", "--layer", "1", "--steps", "6", "--eval-every", "3", "--batch-size", "4", "--lr", "auto",
          "--test", "--quiet"]
REFERENCE = dict(layer="1", steps=6, eval_every=3, batch_size=4, lr="auto", eval_test=True, micro_batch=2,
                 progress=False)


# Bit for bit needs the same kernels: on the CPU the same thread count (a reduction split over 2 threads rounds
# differently from one over 1). Every process here, and the one-process references, run on one thread.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture
def one_thread():
    with one_cpu_thread():
        yield


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def zolite_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "zolite.cli", *map(str, args)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def odd_data(tmp_path_factory) -> str:
    """95 SST-2 rows: 38 train, 19 val (odd: the slices differ by a row), 38 test."""
    from zolite.data import bundled_file, iter_rows

    root = tmp_path_factory.mktemp("odd") / "sst2"
    root.mkdir()
    with gzip.open(root / "train.jsonl.gz", "wt") as f:
        for row, _ in zip(iter_rows(bundled_file("sst2")), range(95)):
            row.pop("_line")
            f.write(json.dumps(row) + "\n")
    return str(root.parent)


@pytest.fixture(scope="module")
def one_process(sharp_tiny_model, odd_data, tmp_path_factory) -> dict:
    """The one-process run with the same global batch, in micro-batches of one process's slice (on one thread)."""
    with one_cpu_thread():
        return zolite.tune(sharp_tiny_model, "sst2", data=odd_data, run_dir=tmp_path_factory.mktemp("one") / "run",
                           **REFERENCE)


def test_shards_cover_the_batch_in_order_and_sums_do_not_depend_on_the_split():
    items = list(range(11))
    for size in range(1, 6):
        parts = [World(rank, size).shard(items) for rank in range(size)]
        assert sum(parts, []) == items and max(map(len, parts)) - min(map(len, parts)) <= 1
    # float32 losses times their rows, summed in float64: exact, so any grouping of the ranks gives the same bits
    losses = torch.rand(8, generator=torch.Generator().manual_seed(0)).tolist()
    losses = [float(torch.tensor(x, dtype=torch.float32)) for x in losses]
    pairs = lambda chunk: [float(torch.tensor([losses[i] for i in chunk]).mean())]   # noqa: E731  as a forward gives
    whole = weighted_mean(list(range(8)), 2, pairs)
    by_rank = [sum(pairs(c)[0] * len(c) for c in (r[:2], r[2:]) if c) for r in (list(range(4)), list(range(4, 8)))]
    assert whole == [(by_rank[1] + by_rank[0]) / 8]


class Recording(World):
    """A rank whose all_reduce is done by hand: it records what it would send and returns it unsummed."""
    def sum(self, values):
        self.sent = list(values)
        return list(values)


def test_uneven_slices_are_weighted_by_their_rows():
    """3 ranks over a batch of 8: slices of 3, 3 and 2 rows; the summed (l+ sums, l- sums, rows) give the batch's
    mean loss (within float rounding: the micro-batches differ from one process's)."""
    values = torch.rand(8, 2, generator=torch.Generator().manual_seed(1)).tolist()
    chunk_means = lambda chunk: torch.tensor([values[i] for i in chunk]).mean(0).tolist()   # noqa: E731
    ranks = [Recording(rank, 3) for rank in range(3)]
    for world in ranks:
        weighted_mean(list(range(8)), 2, chunk_means, world)
    assert [w.sent[-1] for w in ranks] == [3, 3, 2]
    totals = [sum(w.sent[k] for w in ranks) for k in range(3)]
    assert [t / totals[2] for t in totals[:2]] == pytest.approx(weighted_mean(list(range(8)), 8, chunk_means), rel=1e-6)


@pytest.mark.distributed
def test_two_processes_write_the_one_process_patch(sharp_tiny_model, odd_data, one_process, tmp_path):
    """Bit for bit: the same patch, trajectory, losses, probed lr and val curve; val (19 rows) and test scores
    gathered over the two processes' slices count every row once."""
    run = tmp_path / "two"
    done = subprocess.run(zolite_cmd("tune", "--model", sharp_tiny_model, "--data", odd_data, "--run-dir", run,
                                     "--nproc", 2, *COMMON), capture_output=True, text=True, timeout=300,
                          env=ONE_THREAD)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("patch: ") == 1   # rank 0 alone prints
    report = json.loads((run / "report.json").read_text())
    assert sha(run / "patch.safetensors") == sha(one_process["patch"])
    assert sha(run / "patch.trajectory.safetensors") == sha(Path(one_process["patch"]).with_suffix(".trajectory.safetensors"))
    assert report["loss_curve"] == one_process["loss_curve"] and report["lr"] == one_process["lr"]
    assert report["val_curve"] == one_process["val_curve"]
    for split, rows in (("val", 19), ("test", 38)):
        assert report["final"][split]["n"] == rows
        assert report["final"][split]["correct"] == one_process["final"][split]["correct"]
        assert report["final"][split]["per_class"] == one_process["final"][split]["per_class"]
    assert report["distributed"] == {"world_size": 2, "world_sizes": [2], "backend": "gloo", "bytes_per_step": 24,
                                     "all_reduces_per_step": 1}
    assert one_process["distributed"]["world_size"] == 1 and one_process["distributed"]["bytes_per_step"] == 0
    assert json.loads((run / "config.json").read_text())["micro_batch"] == 2   # a process's slice


def _workers(launcher: subprocess.Popen) -> list:
    """The launcher's worker processes, in the order they were started (rank order)."""
    import psutil

    children = psutil.Process(launcher.pid).children(recursive=True)
    workers = [c for c in children if "spawn_main" in " ".join(c.cmdline())]
    return sorted(workers, key=lambda c: (c.create_time(), c.pid))


# a run long enough to be cut off after its first checkpoint
LONG = ["--layer", "1", "--steps", "100", "--eval-every", "10", "--batch-size", "4", "--lr", "1e-2", "--quiet"]


@pytest.fixture(scope="module")
def uninterrupted(sharp_tiny_model, small_data, tmp_path_factory) -> dict:
    """LONG in one process, on one thread, in micro-batches of one of two processes' slices."""
    with one_cpu_thread():
        return zolite.tune(sharp_tiny_model, "sst2", data=small_data, run_dir=tmp_path_factory.mktemp("whole") / "run",
                           layer="1", steps=100, eval_every=10, batch_size=4, lr=1e-2, micro_batch=2, progress=False)


def _wait_for_checkpoint(run: Path, process: subprocess.Popen) -> None:
    deadline = time.time() + 120
    while not (run / "checkpoint.safetensors").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)


@pytest.mark.distributed
def test_a_killed_process_stops_the_run_in_one_line_and_it_resumes_in_one_process(sharp_tiny_model, small_data,
                                                                                    uninterrupted, tmp_path,
                                                                                    one_thread):
    """SIGKILL one of two processes after a checkpoint: the run stops with one line (no traceback) and a non-zero
    exit; resumed by one process, it ends bit for bit as an uninterrupted one-process run."""
    options = LONG
    killed = tmp_path / "killed"
    launcher = subprocess.Popen(zolite_cmd("tune", "--model", sharp_tiny_model, "--data", small_data, "--run-dir",
                                           killed, "--nproc", 2, *options),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ONE_THREAD)
    _wait_for_checkpoint(killed, launcher)
    workers = _workers(launcher)
    assert len(workers) == 2, "the run finished or failed before it could be killed"
    os.kill(workers[1].pid, signal.SIGKILL)
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "resume it with" in lines[0], err
    assert not (killed / "patch.safetensors").exists()

    resumed = zolite.tune(sharp_tiny_model, "sst2", resume=killed, progress=False)
    assert sha(resumed["patch"]) == sha(uninterrupted["patch"])
    assert resumed["loss_curve"] == uninterrupted["loss_curve"]
    assert resumed["distributed"]["world_sizes"] == [2, 1]


@pytest.mark.distributed
def test_a_one_process_run_resumes_in_two(sharp_tiny_model, small_data, uninterrupted, tmp_path):
    """The other way round: a one-process run cut off after a checkpoint goes on in two processes, bit for bit."""
    cut = tmp_path / "cut"
    alone = subprocess.Popen(zolite_cmd("tune", "--model", sharp_tiny_model, "--data", small_data, "--run-dir", cut,
                                        "--micro-batch", 2, *LONG),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ONE_THREAD)
    _wait_for_checkpoint(cut, alone)
    assert alone.poll() is None, "the run finished or failed before it could be cut off"
    alone.kill()
    alone.wait(timeout=60)
    assert not (cut / "patch.safetensors").exists()
    done = subprocess.run(zolite_cmd("tune", "--resume", cut, "--nproc", 2, "--quiet"), capture_output=True,
                          text=True, timeout=300, env=ONE_THREAD)
    assert done.returncode == 0, done.stderr
    report = json.loads((cut / "report.json").read_text())
    assert sha(cut / "patch.safetensors") == sha(uninterrupted["patch"])
    assert report["loss_curve"] == uninterrupted["loss_curve"]
    assert report["distributed"]["world_sizes"] == [1, 2]


@pytest.mark.distributed
def test_two_machines_on_loopback(sharp_tiny_model, odd_data, one_process, tmp_path):
    """Two torchrun agents, one process each, meeting through the c10d rendezvous on 127.0.0.1: as two machines
    would. The patch is the one-process run's."""
    endpoint = f"127.0.0.1:{free_port()}"
    run = tmp_path / "nodes"
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank",
                               str(node), "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                               endpoint, "--rdzv-id", "zolite-test", "-m", "zolite.cli", "tune", "--model",
                               sharp_tiny_model, "--data", odd_data, "--run-dir", str(run), *COMMON],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ONE_THREAD)
             for node in (0, 1)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert sum(out.count("patch: ") for out, _ in outputs) == 1   # rank 0 alone prints
    assert sha(run / "patch.safetensors") == sha(one_process["patch"])
    assert json.loads((run / "report.json").read_text())["distributed"]["world_size"] == 2


def test_bad_process_counts_are_one_line_errors(tiny_model, small_data, tmp_path):
    """Refused before any process starts: no process, more processes than rows in a step, backprop."""
    base = ["tune", "--model", tiny_model, "--data", small_data, "--run-dir", tmp_path / "run", "--quiet"]
    assert_user_error(run_cli(*base, "--nproc", "0"), "--nproc must be at least 1")
    assert_user_error(run_cli(*base, "--nproc", "3", "--batch-size", "2"), "raise --batch-size to at least 3")
    assert_user_error(run_cli(*base, "--nproc", "2", "--estimator", "fo"), "would exchange gradients")
    assert not (tmp_path / "run").exists()


@pytest.mark.distributed
def test_two_processes_tune_with_the_f1_objective(tiny_model, tmp_path, one_thread):
    """The non-differentiable objective: each process generates answers for its slice under W + eps z and W - eps z,
    and the F1 losses go through the same weighted sum; val / test F1 gathered. The one-process run's patch."""
    from test_tasks import DROP_FIXTURE

    one = zolite.tune(tiny_model, "drop", data=str(DROP_FIXTURE), run_dir=tmp_path / "one", layer="1", steps=2,
                      eval_every=1, batch_size=2, objective="f1", eps=1e-1, lr=1e-6, eval_test=True, micro_batch=1,
                      progress=False)
    done = subprocess.run(zolite_cmd("tune", "--model", tiny_model, "--task", "drop", "--data", DROP_FIXTURE,
                                     "--run-dir", tmp_path / "two", "--layer", 1, "--steps", 2, "--eval-every", 1,
                                     "--batch-size", 2, "--objective", "f1", "--eps", 1e-1, "--lr", 1e-6, "--test",
                                     "--nproc", 2, "--quiet"),
                          capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert sha(tmp_path / "two" / "patch.safetensors") == sha(one["patch"])
    assert report["loss_curve"] == one["loss_curve"]
    for split in ("val", "test"):
        assert report["final"][split]["n"] == one["final"][split]["n"]
        assert report["final"][split]["f1"] == one["final"][split]["f1"]


@pytest.mark.distributed
def test_two_processes_run_the_residual_feedback_estimator(sharp_tiny_model, small_data, tmp_path, one_thread):
    """One forward a step (l(W + eps z) against the previous step's): the same weighted sum, the same patch."""
    one = zolite.tune(sharp_tiny_model, "sst2", data=small_data, run_dir=tmp_path / "one", layer="1", steps=6,
                      eval_every=3, batch_size=4, estimator="residual", lr=1e-3, micro_batch=2, keep="last",
                      progress=False)
    done = subprocess.run(zolite_cmd("tune", "--model", sharp_tiny_model, "--task", "sst2", "--data", small_data,
                                     "--run-dir", tmp_path / "two", "--layer", 1, "--steps", 6, "--eval-every", 3,
                                     "--batch-size", 4, "--estimator", "residual", "--lr", 1e-3, "--keep", "last",
                                     "--nproc", 2, "--quiet"),
                          capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert sha(tmp_path / "two" / "patch.safetensors") == sha(one["patch"])
    assert report["loss_curve"] == one["loss_curve"] and report["val_curve"] == one["val_curve"]
    assert one["kept_step"] == 6   # --keep last: the patch holds six steps' updates, not the base
