"""Serving throughput (issue 27): requests/s and p50/p95 latency of `zolite serve` for 1, 8 and 32 concurrent clients
over 3 patches, batched (up to --max-batch rows per forward) next to the one-request-at-a-time worker (max batch 1),
measured in the same run on the same loaded model.

    python bench/serve_bench.py --model smollm2-135m --device cpu --out bench/results/serve_cpu
    python bench/serve_bench.py --model smollm2-135m --device cuda --mode fp16 --out OUT
    python bench/serve_bench.py --model /path/to/Qwen2.5-Coder-1.5B-Instruct --layer 1 --device cuda --mode nf4 --out OUT

It needs no prepared files: the 3 patches are the tuned layer (--layer; default: the profile's dominant layer)
plus seeded noise (--noise times each tensor's RMS), attached resident on the device. The server runs in this
process (the real PatchServer on loopback); the clients run in a separate process (stdlib http.client, one
kept-alive connection each, closed loop: a client sends its next request when the last one is answered), so they
do not take the server's interpreter lock. Request i goes to patch i mod 3 with prompt i (SST-2 sentences, a few
to a few dozen tokens), greedy, --max-tokens new tokens at most (an end-of-sequence token ends it sooner).
For each client count the two workers run back to back, so a change in the machine's load hits both alike.
"""
from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

NAMES = ("p0", "p1", "p2")
WORKERS = [  # (name, batched, patches share a batch, newcomers join a running batch)
    ("one-at-a-time", False, False, False),   # the worker before issue 27: grouped by patch, each request alone
    ("per-patch", True, False, False),        # one batch per patch group, one swap per group
    ("mixed", True, True, False),             # all patches in one batch (RowRouter), static
    ("continuous", True, True, True),         # mixed, and waiting requests join between steps (the default)
]


def clients_run(url: str, bodies: list[dict], clients: int, queue) -> None:
    """Closed-loop load from `clients` threads sharing the list of requests; puts (latencies, seconds, tokens)."""
    import threading
    from urllib.parse import urlsplit

    host, port = urlsplit(url).hostname, urlsplit(url).port
    lock, latencies, tokens, errors = threading.Lock(), [], [], []
    todo = iter(range(len(bodies)))

    def client():
        conn = http.client.HTTPConnection(host, port, timeout=3600)
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                break
            t0 = time.perf_counter()
            conn.request("POST", "/v1/completions", json.dumps(bodies[i]), {"Content-Type": "application/json"})
            response = conn.getresponse()
            body = json.loads(response.read())
            with lock:
                if response.status != 200:
                    errors.append(body)
                else:
                    latencies.append(time.perf_counter() - t0)
                    tokens.append(body["usage"]["completion_tokens"])
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    queue.put((latencies, time.perf_counter() - start, tokens, errors[:3]))


def measure(server, bodies, clients):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    swaps, batches, rows, joined = server.swaps, server.batches, server.rows, server.joined
    proc = ctx.Process(target=clients_run, args=(server.url, bodies, clients, queue))
    proc.start()
    latencies, seconds, tokens, errors = queue.get()
    proc.join()
    if errors:
        raise SystemExit(f"the server answered errors: {errors}")
    lat = sorted(latencies)
    return {"requests": len(lat), "seconds": round(seconds, 3), "requests_per_s": round(len(lat) / seconds, 3),
            "p50_s": round(statistics.median(lat), 3), "p95_s": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 3),
            "completion_tokens_per_s": round(sum(tokens) / seconds, 1), "swaps": server.swaps - swaps,
            "batches": server.batches - batches,
            "rows_per_batch": round((server.rows - rows + server.joined - joined) / max(1, server.batches - batches), 2),
            "joined": server.joined - joined}


def make_patches(loaded, layer: int, noise: float):
    import torch

    from zolite.patch import Patch, fingerprint
    from zolite.swap import PatchSet

    prefix = f"layers.{layer}."
    base = {n: p.detach() for n, p in loaded.model.named_parameters() if prefix in n and n.split(prefix)[0].endswith(".")}
    if not base:
        raise SystemExit(f"the model has no parameters of layer {layer}")
    meta = {"zolite.model": loaded.name, "zolite.arch": loaded.model.config.model_type, "zolite.layer": str(layer),
            "zolite.task": "bench", "zolite.base_sha256": fingerprint(base), "zolite.kind": "dense"}
    patches = PatchSet(loaded.model)
    for k, name in enumerate(NAMES):
        gen = torch.Generator(device="cpu").manual_seed(k)
        tensors = {}
        for n, t in base.items():
            z = torch.randn(t.shape, generator=gen).to(t.device, torch.float32)
            tensors[n] = (t.float() + noise * t.float().pow(2).mean().sqrt() * z).to(t.dtype)
        patches.attach(name, Patch(tensors, meta), "device")
    return patches


def prompts(count: int) -> list[str]:
    from zolite.data import bundled_file, iter_rows

    rows = [r for r, _ in zip(iter_rows(bundled_file("sst2")), range(count))]
    return [f"Review: {r['sentence']}\nWas the review positive or negative? Answer:" for r in rows]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="Profile, local HF folder, .gguf or hub id.")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ...  [default: cuda when available]")
    ap.add_argument("--mode", default=None, help="fp16 | int8 | nf4 (as zolite's --mode).  [default: zolite's]")
    ap.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--layer", type=int, default=None, help="The patched layer.  [default: the profile's dominant "
                                                            "layer, else 1]")
    ap.add_argument("--out", type=Path, required=True, help="Folder for results.json and results.md.")
    ap.add_argument("--clients", default="1,8,32", help="Concurrent client counts.  [default: 1,8,32]")
    ap.add_argument("--requests", type=int, default=128,
                    help="Requests per measurement (at least the client count).  [default: 128]")
    ap.add_argument("--max-tokens", type=int, default=32, help="New tokens per request at most.  [default: 32]")
    ap.add_argument("--max-batch", type=int, default=32, help="The batched worker's rows per forward.  [default: 32]")
    ap.add_argument("--noise", type=float, default=0.05, help="Patch noise, times each tensor's RMS.  [default: 0.05]")
    ap.add_argument("--workers", default=",".join(w[0] for w in WORKERS),
                    help="Which workers to compare, comma-separated.  [default: all: %(default)s]")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads.  [default: torch's]")
    args = ap.parse_args()

    import torch
    import transformers

    import zolite
    from zolite.serve import PatchServer

    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args.out.mkdir(parents=True, exist_ok=True)
    from zolite.profile import find_profile

    profile = find_profile(args.model)
    layer = args.layer if args.layer is not None else (profile.dominant_layer if profile and
                                                       profile.dominant_layer is not None else 1)
    loaded = zolite.load_model(args.model, device=args.device, mode=args.mode, dtype=args.dtype, keep_layers=[layer])
    patches = make_patches(loaded, layer, args.noise)
    texts = prompts(256)
    levels = [int(c) for c in args.clients.split(",")]
    names = args.workers.split(",")
    workers = [w for w in WORKERS if w[0] in names]
    unknown = set(names) - {w[0] for w in WORKERS}
    if unknown or not workers:
        sys.exit(f"error: unknown worker(s) {', '.join(sorted(unknown)) or '(none given)'}; "
                 f"choose from {', '.join(w[0] for w in WORKERS)}")

    def bodies(n):
        return [{"model": NAMES[i % 3], "prompt": texts[i % len(texts)], "max_tokens": args.max_tokens,
                 "temperature": 0} for i in range(n)]

    def save(rows) -> dict:
        device = loaded.device
        env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
               "device_type": device.type, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
               "load_average": os.getloadavg(), "python": platform.python_version(), "torch": torch.__version__,
               "transformers": transformers.__version__, "model": args.model, "mode": loaded.mode,
               "dtype": str(loaded.dtype).removeprefix("torch."), "layer": layer}
        command = "python bench/serve_bench.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        result = {"command": command, "env": env, "max_tokens": args.max_tokens, "requests": args.requests,
                  "rows": rows}
        (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.out / "results.md").write_text(markdown(result))
        return result

    rows = []
    for clients in levels:
        for label, batched, mix, continuous in workers:
            max_batch = args.max_batch if batched else 1
            server = PatchServer(loaded, patches, port=0, max_batch=max_batch, max_queue=1024, timeout=3600, mix=mix,
                                 continuous=continuous).start()
            try:
                measure(server, bodies(3), 1)   # warm-up: each patch once
                result = measure(server, bodies(max(args.requests, clients)), clients)
            finally:
                server.stop()
            rows.append({"clients": clients, "worker": label, "max_batch": max_batch, "mix": server.mix,
                         "continuous": server.continuous, **result})
            print(json.dumps(rows[-1]), flush=True)
            saved = save(rows)   # after every cell: a run cut off (device time) keeps what it measured

    print(markdown(saved))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def markdown(result: dict) -> str:
    env = result["env"]
    lines = [f"# zolite serve: {env['model']} ({env['mode']}, {env['dtype']}, patched layer {env['layer']}) on "
             f"{env['device']}",
             "",
             f"3 patches, requests round-robin over them, greedy, at most {result['max_tokens']} new tokens each; "
             f"closed-loop clients. torch {env['torch']}, transformers {env['transformers']}, "
             f"{env['torch_threads']} torch threads, {env['cpu_count']} CPUs, load average at the end "
             f"{', '.join(f'{x:.1f}' for x in env['load_average'])}.",
             "",
             f"Command: `{result['command']}`",
             "",
             "| clients | worker | requests | req/s | p50 s | p95 s | tokens/s | swaps | batches | rows/batch | joined | req/s vs one-at-a-time |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    single = {r["clients"]: r["requests_per_s"] for r in result["rows"] if r["worker"] == "one-at-a-time"}
    for r in result["rows"]:
        gain = r["requests_per_s"] / single[r["clients"]] if r["clients"] in single else float("nan")
        lines.append(f"| {r['clients']} | {r['worker']} | {r['requests']} | {r['requests_per_s']:.2f} | "
                     f"{r['p50_s']:.2f} | {r['p95_s']:.2f} | {r['completion_tokens_per_s']:.1f} | {r['swaps']} | "
                     f"{r['batches']} | {r['rows_per_batch']:.1f} | {r['joined']} | {gain:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--table":   # rewrite results.md from results.json
        path = Path(sys.argv[2])
        path.with_name("results.md").write_text(markdown(json.loads(path.read_text())))
    else:
        main()
