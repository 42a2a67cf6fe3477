"""Use a (patched) model: generate from a prompt, or classify task rows from a JSONL file."""
from __future__ import annotations

from typing import Iterator

import torch

from .data import iter_rows
from .errors import ZoliteError, check_at_least
from .evaluate import encode_rows, score_encoded
from .tasks import Task, get_task


def generate(model, tokenizer, prompt: str, *, max_new_tokens: int = 64, chat: bool = False) -> str:
    """Greedy continuation of `prompt` (wrapped in the tokenizer's chat template when chat=True)."""
    return complete(model, tokenizer, prompt, max_new_tokens=max_new_tokens, chat=chat)[0]


@torch.inference_mode()
def complete(model, tokenizer, prompt: str, *, max_new_tokens: int = 64, chat: bool = False) -> tuple[str, str]:
    """(greedy continuation, finish reason): "stop" when the model ended it (end-of-sequence token), "length" when
    max_new_tokens cut it off, as an OpenAI-style completion reports it."""
    check_at_least("--max-new-tokens", max_new_tokens, 1)
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    ids = ids.to(next(model.parameters()).device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    new = out[0, ids.shape[1]:]
    ended = len(new) < max_new_tokens or (len(new) > 0 and new[-1].item() in _eos_ids(model, tokenizer))
    return tokenizer.decode(new, skip_special_tokens=True), "stop" if ended else "length"


def _eos_ids(model, tokenizer) -> set[int]:
    """Every token generation stops at: the generation config's (an id or a list) and the tokenizer's."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(configured if isinstance(configured, (list, tuple)) else [configured])
    return {i for i in ids | {tokenizer.eos_token_id} if i is not None}


def classify_rows(model, tokenizer, task: Task, rows: list[dict], *, max_length: int = 512,
                  batch_size: int = 32) -> list[dict]:
    """One prediction per row (rows already checked against the task)."""
    encoded = encode_rows(tokenizer, task, rows, max_length)
    scores = score_encoded(model, tokenizer, encoded, batch_size)
    out = []
    for row, s in zip(rows, scores):
        best = int(s.argmax())
        out.append({"line": row["_line"], "prediction": task.example(row).candidates[best].strip(),
                    "index": best, "scores": [round(float(x), 4) for x in s]})
    return out


def task_row(task: Task, row: dict, path) -> dict:
    """A row to classify with `task`, checked (the label field is optional: the template wants one)."""
    if task.generative:
        raise ZoliteError(f"{task.name} is a generation task, and --input picks among a task's candidates; generate "
                          "its answers with zolite serve (POST /v1/completions) or apply --prompt")
    row = dict(row)
    row.setdefault("label", 0)
    task.validate(row, path)
    return row


def read_task_rows(task: Task, path) -> Iterator[dict]:
    """The rows of a JSONL file to classify with `task`, checked one by one."""
    for row in iter_rows(path):
        yield task_row(task, row, path)


def classify_file(model, tokenizer, task: Task, path, *, max_length: int = 512,
                  batch_size: int = 32) -> Iterator[dict]:
    """One prediction per row of `path` (task rows; the label field is optional), in file order. Every row is checked
    before the first prediction, so a bad row fails with nothing printed; then the file is streamed in chunks."""
    for _ in read_task_rows(task, path):
        pass
    chunk: list[dict] = []
    for row in read_task_rows(task, path):
        chunk.append(row)
        if len(chunk) == 256:
            yield from classify_rows(model, tokenizer, task, chunk, max_length=max_length, batch_size=batch_size)
            chunk = []
    if chunk:
        yield from classify_rows(model, tokenizer, task, chunk, max_length=max_length, batch_size=batch_size)


def classify_routed(model, tokenizer, patch_set, path, route_field: str = "patch") -> list[dict]:
    """One prediction per row of `path`, each by the patch (of `patch_set`, a swap.PatchSet on `model`) its
    `route_field` names, with the patch's task: rows grouped by patch (one swap per patch), returned in file order."""
    groups: dict[str, list[dict]] = {}
    for row in iter_rows(path):
        name = row.get(route_field)
        if name not in patch_set.names():
            raise ZoliteError(f"{path} line {row['_line']}: {route_field}={name!r} is not one of the patches "
                              f"({', '.join(patch_set.names())})")
        groups.setdefault(name, []).append(row)
    predictions = []
    for name, rows in groups.items():
        p = patch_set.patches[name]["patch"]
        task = get_task(p.task, need_data=False, **p.task_options())
        rows = [task_row(task, row, path) for row in rows]
        patch_set.swap(name)
        predictions += [dict(pred, patch=name) for pred in classify_rows(model, tokenizer, task, rows)]
    return sorted(predictions, key=lambda r: r["line"])
