"""`zolite serve`: one loaded base, several patches, an OpenAI-style completions endpoint on HTTP.

POST /v1/completions {"prompt": "...", "max_tokens": 32, "patch": "sst2"}  (patch null or absent: the base)
GET  /health
Requests wait in a bounded queue; one worker takes everything waiting, groups it by patch and swaps once per group
(the active patch's group first), so a burst of mixed requests costs one swap per patch, not one per request.
Errors: 400 bad JSON or fields, 404 unknown patch or path, 503 queue full, 504 timed out waiting.
"""
from __future__ import annotations

import json
import queue
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .errors import ZoliteError
from .predict import complete
from .swap import PatchSet

MAX_TOKENS_LIMIT = 512


class _HTTPServer(ThreadingHTTPServer):
    request_queue_size = 256   # the listen backlog (5 by default): a burst of clients must not be reset
    daemon_threads = True


@dataclass
class Request:
    prompt: str
    max_tokens: int
    patch: str | None
    done: threading.Event = field(default_factory=threading.Event)
    text: str | None = None
    finish_reason: str | None = None   # "stop" | "length"
    error: str | None = None
    cancelled: bool = False   # its client timed out: the worker skips it


class PatchServer:
    def __init__(self, loaded, patches: PatchSet, *, host: str = "127.0.0.1", port: int = 8000,
                 max_queue: int = 64, timeout: float = 60.0):
        self.loaded, self.patches, self.timeout = loaded, patches, timeout
        self.queue: queue.Queue[Request] = queue.Queue(maxsize=max_queue)
        self.swaps = 0
        self._stop = threading.Event()
        try:
            self.httpd = _HTTPServer((host, port), self._handler())
        except OSError as e:
            raise ZoliteError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port or --host") from None
        self.worker = threading.Thread(target=self._work, daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        return self.httpd.server_address[:2]

    def start(self) -> None:
        self.worker.start()
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def serve_forever(self) -> None:
        self.worker.start()
        self.httpd.serve_forever()

    def stop(self) -> None:
        self._stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    # --- the worker: everything waiting, grouped by patch ---
    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                first = self.queue.get(timeout=0.1)
            except queue.Empty:
                continue
            waiting = [first]
            while True:
                try:
                    waiting.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            groups: dict[str | None, list[Request]] = {}
            for r in waiting:
                if not r.cancelled:
                    groups.setdefault(r.patch, []).append(r)
            order = sorted(groups, key=lambda name: name != self.patches.active)   # no swap for the active group
            for name in order:
                try:
                    if name != self.patches.active:
                        self.patches.swap(name)
                        self.swaps += 1
                except Exception as e:   # the group cannot run; the server goes on
                    for r in groups[name]:
                        r.error = f"patch '{name}' could not be swapped in: {e}"
                        r.done.set()
                    continue
                for r in groups[name]:
                    if r.cancelled:
                        continue
                    try:
                        r.text, r.finish_reason = complete(self.loaded.model, self.loaded.tokenizer, r.prompt,
                                                           max_new_tokens=r.max_tokens)
                    except Exception as e:   # this request only
                        r.error = f"{type(e).__name__}: {e}"
                    r.done.set()

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):   # quiet: the CLI prints one line per request instead
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _error(self, code: int, message: str) -> None:
                self._send(code, {"error": {"message": message, "code": code}})

            def _route(self) -> str:
                return urllib.parse.urlsplit(self.path).path   # without a query string

            def do_GET(self):
                if self._route() == "/health":
                    return self._send(200, {"status": "ok", "patches": server.patches.names(),
                                            "active": server.patches.active, "queued": server.queue.qsize()})
                self._error(404, f"no such path {self.path}; use POST /v1/completions or GET /health")

            def do_POST(self):
                if self._route() != "/v1/completions":
                    return self._error(404, f"no such path {self.path}; use POST /v1/completions")
                try:
                    length = int(self.headers.get("Content-Length", 0))
                    if length < 0:
                        raise ValueError(length)
                    body = json.loads(self.rfile.read(length) or b"null")
                except (ValueError, json.JSONDecodeError):
                    return self._error(400, "the body is not valid JSON")
                if not isinstance(body, dict) or not isinstance(body.get("prompt"), str) or not body["prompt"]:
                    return self._error(400, 'the body needs "prompt": a non-empty string')
                max_tokens = body.get("max_tokens", 32)
                if type(max_tokens) is not int or not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
                    return self._error(400, f'"max_tokens" must be an integer from 1 to {MAX_TOKENS_LIMIT}')
                patch = body.get("patch")
                if patch is not None and not isinstance(patch, str):
                    return self._error(400, '"patch" must be a patch name (a string), or null for the base')
                if patch is not None and patch not in server.patches.names():
                    return self._error(404, f"unknown patch '{patch}'; served: {', '.join(server.patches.names())}")
                request = Request(body["prompt"], max_tokens, patch)
                try:
                    server.queue.put_nowait(request)
                except queue.Full:
                    return self._error(503, "the queue is full; retry later")
                if not request.done.wait(server.timeout):
                    request.cancelled = True
                    return self._error(504, f"no answer within {server.timeout:g} s")
                if request.error:
                    return self._error(500, request.error)
                self._send(200, {"id": f"cmpl-{uuid.uuid4().hex[:12]}", "object": "text_completion",
                                 "created": int(time.time()), "model": server.loaded.name, "patch": patch,
                                 "choices": [{"index": 0, "text": request.text,
                                              "finish_reason": request.finish_reason}]})

        return Handler


def parse_named(specs: list[str]) -> dict[str, str]:
    """['boolq=a.safetensors', 'b.safetensors'] -> {'boolq': 'a.safetensors', 'b': 'b.safetensors'}."""
    named = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = spec.rsplit("/", 1)[-1].removesuffix(".safetensors"), spec
        if not name or name in named:
            raise ZoliteError(f"patch name '{name}' is empty or given twice; write NAME=PATH with distinct names")
        named[name] = path
    return named
