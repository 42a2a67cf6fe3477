"""`zolite serve`: one loaded base, several patches, an OpenAI-compatible HTTP server.

POST /v1/completions        {"model": "sst2", "prompt": "...", "max_tokens": 16, ...}
POST /v1/chat/completions   {"model": "sst2", "messages": [{"role": "user", "content": "..."}], ...}
GET  /v1/models             the base and every patch (with its task and kind); GET /v1/models/NAME: one
GET  /health                patches, active patch, queue length, swaps and batches so far

`model` names a patch, or the base model (by its name, as `GET /v1/models` lists it); `patch` is an alias of it.
`stream: true` answers with server-sent events in OpenAI's chunk format, ending with `data: [DONE]`.
Errors are OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 a bad or unsupported field (named
in `param`), 404 an unknown model or path, 503 the queue is full, 504 no answer in time.

Requests wait in a bounded queue; one worker generates. By default (every patch resident on the device) the
patches share a batch: the waiting requests, whatever their patch, form one left-padded batch of up to `max_batch`
rows, each row through its own patch (swap.RowRouter: only the patched layer's linears and norms run once more, on
the rows of other patches), and requests that arrive meanwhile join it between steps (continuous batching). With
`mix=False` (or patches pinned / on disk) the worker groups the waiting requests by patch, swaps once per group
and generates each group as one batch. `max_batch=1` is the old one-request-at-a-time worker. HTTP is the standard
library's threaded server: a thread per connection waits on its request's answer (docs/serve.md says why).
"""
from __future__ import annotations

import collections
import json
import queue
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .errors import ZoliteError
from .batching import Row, generate_rows
from .swap import PatchSet, RowRouter

MAX_TOKENS_LIMIT = 512
MAX_N = 16
MAX_STOP = 4
MAX_ROWS = 128   # prompts x n in one request
MAX_BODY = 8 << 20

_NEUTRAL = object()   # marks a field accepted only at its neutral value


class HTTPError(Exception):
    """An error answered in OpenAI's shape; `param` names the field at fault."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# --- the request fields: supported, accepted only at their neutral value, or refused -----------------------------
# field -> the values that change nothing (a request may send them; anything else is a 400 naming the field)
NEUTRAL = {
    "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
    "logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
    "function_call": (None, "none"), "parallel_tool_calls": (None,), "response_format": (None, {"type": "text"}),
}
COMMON = {"model", "patch", "max_tokens", "temperature", "top_p", "n", "seed", "stop", "stream", "stream_options",
          "user", "frequency_penalty", "presence_penalty", "logit_bias", "logprobs"}
FIELDS = {
    "completions": COMMON | {"prompt", "echo", "best_of", "suffix"},
    "chat": COMMON | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "functions",
                      "function_call", "response_format", "parallel_tool_calls"},
}


def _bad(param: str, message: str) -> HTTPError:
    return HTTPError(400, message, param=param, code="invalid_value")


def _number(body: dict, name: str, default, low, high, *, integer: bool = False, low_open: bool = False):
    value = body.get(name)
    if value is None:
        return default
    if type(value) is bool or not isinstance(value, int if integer else (int, float)):
        raise _bad(name, f"'{name}' must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not (low < value if low_open else low <= value) or value > high:
        raise _bad(name, f"'{name}' must be {'above' if low_open else 'at least'} {low} and at most {high}, "
                         f"got {value!r}")
    return value


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or not 1 <= len(stops) <= MAX_STOP
            or not all(isinstance(s, str) and s for s in stops)):
        raise _bad("stop", f"'stop' must be a non-empty string or a list of 1 to {MAX_STOP} non-empty strings")
    return tuple(stops)


def _messages(body: dict) -> list[dict]:
    """Chat messages as the tokenizer's chat template wants them: role and text content."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "the body needs 'messages': a non-empty list of {\"role\", \"content\"}")
    out = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("system", "developer", "user", "assistant"):
            raise _bad("messages", f"messages[{i}] has role {role!r}; zolite serve takes system, developer, user "
                                   "and assistant messages (no tools)")
        content = m.get("content")
        if isinstance(content, list):   # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise _bad("messages", f"messages[{i}].content has a part that is not text; only text parts are "
                                       "supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise _bad("messages", f"messages[{i}].content must be a string or a list of text parts")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


@dataclass
class Job:
    """One HTTP request on its way through the worker: its rows (n per prompt), and how the handler hears back."""
    kind: str                     # "completions" | "chat"
    target: str | None            # the patch, None for the base
    rows: list[Row]
    prompt_tokens: int
    stream: bool = False
    include_usage: bool = False
    events: queue.Queue = field(default_factory=queue.Queue)   # streaming: (choice, text, finish) ... then None
    done: threading.Event = field(default_factory=threading.Event)
    error: str | None = None
    cancelled: bool = False

    def finish(self, error: str | None = None) -> None:
        if self.done.is_set():
            return
        self.error = self.error or error
        self.done.set()
        self.events.put(None)

    def row_ended(self) -> None:
        if all(r.finish_reason is not None for r in self.rows):
            self.finish()


class PatchServer:
    def __init__(self, loaded, patches: PatchSet, *, host: str = "127.0.0.1", port: int = 8000,
                 max_queue: int = 64, timeout: float = 60.0, max_batch: int = 32,
                 max_tokens_limit: int = MAX_TOKENS_LIMIT, mix: bool = True, continuous: bool = True):
        if loaded.name in patches.names():
            raise ZoliteError(f"a patch is named '{loaded.name}', the base model's name; give it another NAME")
        if max_batch < 1 or max_queue < 1:
            raise ZoliteError("--max-batch and --max-queue must be at least 1")
        self.loaded, self.patches, self.timeout = loaded, patches, timeout
        self.max_batch, self.max_tokens_limit = max_batch, max_tokens_limit
        self.mix = mix and max_batch > 1 and patches.can_route()   # patches share a batch (no swaps)
        self.continuous = continuous and self.mix   # waiting requests join a running batch between steps
        self.max_queue = max_queue
        self.queue: queue.Queue[Job] = queue.Queue()
        self.pending: collections.deque[Job] = collections.deque()   # taken from the queue, not yet running
        self.swaps = self.batches = self.rows = self.joined = 0   # joined: rows that joined a running batch
        self.created = int(time.time())
        self.context = getattr(loaded.model.config, "max_position_embeddings", None)
        self._stop = threading.Event()
        try:
            self.httpd = _HTTPServer((host, port), _handler(self))
        except OSError as e:
            raise ZoliteError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port or --host") from None
        self.worker = threading.Thread(target=self._work, daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        return self.httpd.server_address[:2]

    @property
    def url(self) -> str:
        return "http://%s:%d" % self.address

    def start(self) -> "PatchServer":
        """Serve in background threads; returns at once."""
        self.worker.start()
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def serve_forever(self) -> None:
        self.worker.start()
        self.httpd.serve_forever()

    def wait(self) -> None:
        """Block until stop() (or Ctrl-C)."""
        while not self._stop.wait(0.5):
            pass

    def stop(self) -> None:
        self._stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    # --- the worker ---
    def _take(self, room: int | None = None) -> list[Job]:
        """Waiting jobs, oldest first (cancelled ones answered and skipped); with room: only while their rows fit."""
        while True:
            try:
                self.pending.append(self.queue.get_nowait())
            except queue.Empty:
                break
        jobs, rows = [], 0
        while self.pending and (room is None or rows + len(self.pending[0].rows) <= room):
            job = self.pending.popleft()
            if job.cancelled:
                job.finish("cancelled")
                continue
            jobs.append(job)
            rows += len(job.rows)
        return jobs

    def _work(self) -> None:
        while not self._stop.is_set():
            if not self.pending:
                try:
                    self.pending.append(self.queue.get(timeout=0.1))
                except queue.Empty:
                    continue
            if self.mix:   # every patch in one batch, each row through its own patch; newcomers join between steps
                jobs = self._take(self.max_batch)
                if not jobs and self.pending:   # a job with more rows than a batch: alone, in several batches
                    jobs = [self.pending.popleft()]
                with RowRouter(self.patches) as router:
                    self._run(jobs, router, continuous=self.continuous)
                continue
            groups: dict[str | None, list[Job]] = {}
            for job in self._take():
                groups.setdefault(job.target, []).append(job)
            for name in sorted(groups, key=lambda n: n != self.patches.active):   # no swap for the active group
                try:
                    if name != self.patches.active:
                        self.patches.swap(name)
                        self.swaps += 1
                except Exception as e:   # this group cannot run; the server goes on
                    for job in groups[name]:
                        job.finish(f"patch '{name}' could not be swapped in: {e}")
                    continue
                self._run(groups[name])

    def _run(self, jobs: list[Job], router=None, continuous: bool = False) -> None:
        """The jobs' rows in batches of up to max_batch rows; continuous: waiting jobs join the last batch as rows
        leave it. A job is answered as soon as its last row ends."""
        rows = [row for job in jobs for row in job.rows]
        for start in range(0, len(rows), self.max_batch):
            running = list(jobs)   # the jobs that may have rows in this batch (errors go to them)
            last = start + self.max_batch >= len(rows)

            def admit(room):
                joining = self._take(room)
                running.extend(joining)
                self.joined += sum(len(job.rows) for job in joining)
                return [row for job in joining for row in job.rows]

            try:
                generate_rows(self.loaded.model, self.loaded.tokenizer, rows[start:start + self.max_batch], router,
                              admit=admit if continuous and last else None, max_rows=self.max_batch)
            except Exception as e:   # these rows only
                for job in running:
                    if not job.done.is_set():
                        job.finish(f"{type(e).__name__}: {e}")
            self.batches += 1
            self.rows += len(rows[start:start + self.max_batch])

    # --- turning a request body into a Job ---
    def resolve(self, body: dict) -> str | None:
        """The patch a request names by `model` (or its alias `patch`); None: the base."""
        names = self.patches.names()
        targets = []
        for key in ("model", "patch"):
            value = body.get(key)
            if value is None:
                continue
            if not isinstance(value, str):
                raise _bad(key, f"'{key}' must be a model name (a string); GET /v1/models lists them")
            if value != self.loaded.name and value not in names:
                raise HTTPError(404, f"the model '{value}' does not exist here; served: "
                                     f"{', '.join([self.loaded.name, *names])} (GET /v1/models)",
                                param=key, code="model_not_found")
            targets.append((key, None if value == self.loaded.name else value))
        if len(targets) == 2 and targets[1][1] is not None and targets[0][1] not in (None, targets[1][1]):
            raise _bad("patch", f"'model' names the patch '{targets[0][1]}' and 'patch' names '{targets[1][1]}'; "
                                "send one of them")
        chosen = [t for _, t in targets if t is not None]
        return chosen[-1] if chosen else None

    def parse(self, kind: str, body) -> Job:
        if not isinstance(body, dict):
            raise _bad(None, "the body must be a JSON object")
        for name in body:
            if name not in FIELDS[kind]:
                raise _bad(name, f"unsupported field '{name}'; zolite serve's {kind} endpoint takes "
                                 f"{', '.join(sorted(FIELDS[kind]))}")
        for name, values in NEUTRAL.items():
            if name in body and body[name] not in values:
                allowed = " or ".join(json.dumps(v) for v in values)
                raise _bad(name, f"'{name}' is not supported by zolite serve (only {allowed}); leave it out")
        target = self.resolve(body)
        temperature = _number(body, "temperature", 1.0, 0, 2)
        top_p = _number(body, "top_p", 1.0, 0, 1, low_open=True)
        n = _number(body, "n", 1, 1, MAX_N, integer=True)
        seed = _number(body, "seed", None, -2 ** 63, 2 ** 63 - 1, integer=True)
        stop = _stop(body)
        stream = body.get("stream") or False
        if not isinstance(stream, bool):
            raise _bad("stream", "'stream' must be true or false")
        options = body.get("stream_options")
        if options is not None and (not stream or not isinstance(options, dict) or set(options) - {"include_usage"}
                                    or not isinstance(options.get("include_usage", False), bool)):
            raise _bad("stream_options", "'stream_options' is {\"include_usage\": true|false}, with 'stream': true")
        if kind == "chat":
            if "max_tokens" in body and "max_completion_tokens" in body and \
                    body["max_tokens"] != body["max_completion_tokens"]:
                raise _bad("max_completion_tokens", "'max_tokens' and 'max_completion_tokens' differ; send one")
            key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
            prompts = [self._chat_ids(_messages(body))]
            default = None   # as much as the server allows
        else:
            key, default = "max_tokens", 16   # OpenAI's default for completions
            prompt = body.get("prompt")
            texts = [prompt] if isinstance(prompt, str) else prompt
            if not isinstance(texts, list) or not texts or not all(isinstance(p, str) and p for p in texts):
                raise _bad("prompt", "the body needs 'prompt': a non-empty string or a list of them (token ids are "
                                     "not supported)")
            prompts = [self.loaded.tokenizer(p)["input_ids"] for p in texts]
        max_tokens = _number(body, key, default, 1, self.max_tokens_limit, integer=True)
        if len(prompts) * n > MAX_ROWS:
            raise _bad("prompt", f"{len(prompts)} prompts x n={n} is more than {MAX_ROWS} answers in one request; "
                                 "send fewer prompts per request")
        rows = []
        for ids in prompts:
            room = self.context - len(ids) if self.context else self.max_tokens_limit
            if room < 1:
                raise _bad("messages" if kind == "chat" else "prompt",
                           f"the prompt has {len(ids)} tokens; this model's context is {self.context}")
            limit = max_tokens if max_tokens is not None else min(self.max_tokens_limit, room)
            if limit > room:
                raise _bad(key, f"'{key}' {limit} + the prompt's {len(ids)} tokens exceed this model's context of "
                                f"{self.context} tokens; ask for at most {room}")
            for _ in range(n):
                k = len(rows)   # choice k of the answer; with a seed it draws from seed + k
                rows.append(Row(list(ids), limit, temperature=float(temperature), top_p=float(top_p),
                                seed=None if seed is None else (seed + k) % 2 ** 63, stop=stop, patch=target))
        job = Job(kind, target, rows, sum(len(ids) for ids in prompts), stream,
                  bool(options and options.get("include_usage")))
        for k, row in enumerate(rows):
            row.cancelled = lambda: job.cancelled
            row.on_finish = job.row_ended
            if stream:
                row.on_text = lambda text, finish, k=k: job.events.put((k, text, finish))
        return job

    def _chat_ids(self, messages: list[dict]) -> list[int]:
        tokenizer = self.loaded.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise HTTPError(400, f"{self.loaded.name}'s tokenizer has no chat template; use /v1/completions",
                            param="messages", code="no_chat_template")
        try:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"]
        except Exception as e:   # the template's own check (e.g. roles must alternate)
            raise _bad("messages", f"the chat template refused these messages: {e}") from None
        return list(ids)

    def waiting(self) -> int:
        return self.queue.qsize() + len(self.pending)

    def submit(self, job: Job) -> None:
        if self.waiting() >= self.max_queue:
            raise HTTPError(503, f"{self.max_queue} requests are waiting already (--max-queue); retry later",
                            code="queue_full")
        self.queue.put_nowait(job)

    # --- answers ---
    def model_card(self, name: str | None) -> dict:
        card = {"object": "model", "created": self.created, "owned_by": "zolite"}
        if name is None:
            return {**card, "id": self.loaded.name, "root": self.loaded.name, "parent": None, "kind": "base",
                    "task": None}
        entry = self.patches.patches[name]
        meta = entry["patch"].metadata
        return {**card, "id": name, "root": self.loaded.name, "parent": self.loaded.name,
                "kind": entry.get("kind", meta.get("zolite.kind", "dense")), "task": meta.get("zolite.task"),
                "layers": meta.get("zolite.layer"), "where": entry["where"]}

    def usage(self, job: Job) -> dict:
        completion = sum(r.tokens for r in job.rows)
        return {"prompt_tokens": job.prompt_tokens, "completion_tokens": completion,
                "total_tokens": job.prompt_tokens + completion}

    def answer(self, job: Job, rid: str) -> dict:
        head = {"id": rid, "created": int(time.time()), "model": job.target or self.loaded.name, "patch": job.target,
                "system_fingerprint": None}
        if job.kind == "chat":
            choices = [{"index": k, "message": {"role": "assistant", "content": r.text}, "logprobs": None,
                        "finish_reason": r.finish_reason} for k, r in enumerate(job.rows)]
            return {**head, "object": "chat.completion", "choices": choices, "usage": self.usage(job)}
        choices = [{"index": k, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason}
                   for k, r in enumerate(job.rows)]
        return {**head, "object": "text_completion", "choices": choices, "usage": self.usage(job)}

    def chunk(self, job: Job, rid: str, k: int | None, text: str | None, finish: str | None,
              first: bool = False) -> dict:
        """One streamed chunk: choice k's new text (k None: the closing usage chunk, no choices)."""
        head = {"id": rid, "created": int(time.time()), "model": job.target or self.loaded.name,
                "system_fingerprint": None}
        if job.kind == "chat":
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            choices = [] if k is None else [{"index": k, "delta": delta, "logprobs": None, "finish_reason": finish}]
            out = {**head, "object": "chat.completion.chunk", "choices": choices}
        else:
            choices = [] if k is None else [{"index": k, "text": text, "logprobs": None, "finish_reason": finish}]
            out = {**head, "object": "text_completion", "choices": choices}
        if job.include_usage:
            out["usage"] = self.usage(job) if k is None else None
        return out


class _HTTPServer(ThreadingHTTPServer):
    request_queue_size = 256   # the listen backlog (5 by default): a burst of clients must not be reset
    daemon_threads = True


def _handler(server: PatchServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"   # keep-alive: OpenAI clients reuse their connections
        timeout = 300                   # an idle kept-alive connection is closed after this

        def log_message(self, *args):   # quiet
            pass

        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _route(self) -> str:
            return urllib.parse.urlsplit(self.path).path.rstrip("/")

        def _guard(self, work) -> None:
            try:
                work()
            except HTTPError as e:
                self._send(e.status, e.body())
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

        def do_GET(self):
            self._guard(self._get)

        def _get(self):
            route = self._route()
            if route == "/health":
                return self._send(200, {"status": "ok", "model": server.loaded.name,
                                        "patches": server.patches.names(), "active": server.patches.active,
                                        "queued": server.waiting(), "swaps": server.swaps,
                                        "batches": server.batches, "rows": server.rows, "joined": server.joined,
                                        "max_batch": server.max_batch, "mix": server.mix,
                                        "continuous": server.continuous})
            if route == "/v1/models":
                cards = [server.model_card(None)] + [server.model_card(n) for n in server.patches.names()]
                return self._send(200, {"object": "list", "data": cards})
            if route.startswith("/v1/models/"):
                name = urllib.parse.unquote(route.removeprefix("/v1/models/"))
                return self._send(200, server.model_card(server.resolve({"model": name})))
            raise HTTPError(404, f"no such path {self.path}; GET /v1/models or /health, POST /v1/completions or "
                                 "/v1/chat/completions", code="not_found")

        def do_POST(self):
            self._guard(self._post)

        def _body(self):
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                self.close_connection = True
                raise HTTPError(411, "send the body with a Content-Length (chunked bodies are not supported)")
            try:
                length = int(self.headers.get("Content-Length", 0))
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_BODY:
                self.close_connection = True
                raise HTTPError(413 if length > MAX_BODY else 400, f"the body must have a Content-Length of at "
                                                                    f"most {MAX_BODY} bytes")
            raw = self.rfile.read(length)
            try:
                return json.loads(raw or b"null")
            except (ValueError, UnicodeDecodeError):
                raise _bad(None, "the body is not valid JSON") from None

        def _post(self):
            body = self._body()   # read before anything else, so a kept-alive connection stays in step
            route = self._route()
            kind = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}.get(route)
            if kind is None:
                raise HTTPError(404, f"no such path {self.path}; POST /v1/completions or /v1/chat/completions",
                                code="not_found")
            job = server.parse(kind, body)
            rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
            server.submit(job)
            if job.stream:
                return self._stream(job, rid)
            if not job.done.wait(server.timeout):
                job.cancelled = True
                raise HTTPError(504, f"no answer within {server.timeout:g} s; retry, or ask for fewer tokens",
                                code="timeout")
            if job.error:
                raise HTTPError(500, job.error, code="generation_failed")
            self._send(200, server.answer(job, rid))

        def _event(self, payload) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload)
            self.wfile.write(f"data: {data}\n\n".encode())

        def _stream(self, job: Job, rid: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")   # the stream ends when the connection does
            self.end_headers()
            self.close_connection = True
            started = set()
            try:
                while True:
                    try:
                        event = job.events.get(timeout=server.timeout)
                    except queue.Empty:
                        job.cancelled = True
                        self._event(HTTPError(504, f"no token within {server.timeout:g} s", code="timeout").body())
                        break
                    if event is None:
                        if job.error:
                            self._event(HTTPError(500, job.error, code="generation_failed").body())
                            break
                        if job.include_usage:
                            self._event(server.chunk(job, rid, None, None, None))
                        self._event("[DONE]")
                        break
                    k, text, finish = event
                    first = job.kind == "chat" and k not in started
                    started.add(k)
                    self._event(server.chunk(job, rid, k, text, finish, first=first))
            except (BrokenPipeError, ConnectionResetError):   # the client left: its rows leave the batch
                job.cancelled = True

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


BATCHING = ("continuous", "mixed", "per-patch")


def serve(model: str | None, patches: dict[str, str] | list[str], *, where: str = "device", host: str = "127.0.0.1",
          port: int = 8000, max_queue: int = 64, timeout: float = 60.0, max_batch: int = 32,
          batching: str = "continuous", mode: str | None = None, device: str | None = None,
          dtype: str | None = None) -> PatchServer:
    """Load `model` with `patches` ({name: path}, or NAME=PATH strings) and serve them in background threads;
    returns the running PatchServer (its .url; .wait() blocks, .stop() ends it).
    batching: continuous (patches share a batch, newcomers join between steps), mixed (patches share a batch, no
    joining), per-patch (a batch per patch, one swap per group). Pinned or disk patches are always per-patch."""
    from .swap import load_with_patches

    named = parse_named(list(patches)) if not isinstance(patches, dict) else patches
    if max_batch < 1 or max_queue < 1:   # before the model loads
        raise ZoliteError("--max-batch and --max-queue must be at least 1")
    if batching not in BATCHING:
        raise ZoliteError(f"unknown batching '{batching}'; choose one of {', '.join(BATCHING)}")
    loaded, patch_set = load_with_patches(model, named, where=where, mode=mode, device=device, dtype=dtype)
    return PatchServer(loaded, patch_set, host=host, port=port, max_queue=max_queue, timeout=timeout,
                       max_batch=max_batch, mix=batching != "per-patch", continuous=batching == "continuous").start()
