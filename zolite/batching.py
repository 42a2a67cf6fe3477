"""Batched generation for the server: many prompts in one left-padded batch, each row with its own length limit,
stop strings, sampling settings, random generator and (with a swap.RowRouter) patch, streamed token by token.

A row leaves the batch as soon as it ends (its end-of-sequence token, a stop string, its max_tokens, or its client
gone): the rows still running go on without it (the KV cache keeps only their rows). New rows can join between
steps (continuous batching): they are prefilled apart, then their cache is left-padded to the batch's length and
stacked under it. A row's sampled tokens come from its own generator (seeded by the request's seed), so what a row
draws does not depend on the other rows in the batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .predict import _eos_ids


@dataclass
class Row:
    """One sequence to generate: one choice of one prompt."""
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0          # 0: greedy
    top_p: float = 1.0
    seed: int | None = None           # None: a fresh random seed
    stop: tuple[str, ...] = ()
    patch: str | None = None          # with a router: the patch this row runs through
    on_text: Callable[[str, str | None], None] | None = None   # (new text, finish reason or None) as it comes
    cancelled: Callable[[], bool] = lambda: False              # checked every step: the client went away
    on_finish: Callable[[], None] | None = None                 # called once, when the row has ended
    ids: list[int] = field(default_factory=list)   # the tokens generated (an end-of-sequence token not kept)
    tokens: int = 0                   # tokens generated, an end-of-sequence token included (usage counts it)
    text: str = ""                    # the answer so far (cut before a stop string)
    sent: int = 0                     # characters of `text` passed to on_text
    finish_reason: str | None = None  # "stop" (end token or stop string), "length" (max_tokens), "cancelled"


def _choose(logits: torch.Tensor, rows: list[Row], generators: list[torch.Generator | None]) -> list[int]:
    """The next token of each row: argmax for greedy rows; for the others, a draw from the row's own generator
    after temperature and nucleus (top_p) filtering."""
    logits = logits.float()
    chosen = logits.argmax(-1).tolist()
    for i, (row, gen) in enumerate(zip(rows, generators)):
        if gen is None:
            continue
        probs = torch.softmax(logits[i] / row.temperature, -1)
        if row.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            outside = sorted_p.cumsum(-1) - sorted_p > row.top_p   # the tokens after the nucleus is full
            probs = probs.scatter(0, order, sorted_p.masked_fill(outside, 0.0))
        chosen[i] = int(torch.multinomial(probs, 1, generator=gen))
    return chosen


def _advance(row: Row, token: int, tokenizer, eos: set[int]) -> None:
    """Add `token` to `row`, end the row if it should end, and pass on the text that is now certain."""
    row.tokens += 1
    if token in eos:
        row.finish_reason = "stop"
    else:
        row.ids.append(token)
        row.text = tokenizer.decode(row.ids, skip_special_tokens=True)
        cuts = [i for i in (row.text.find(s) for s in row.stop) if i >= 0]
        if cuts:
            row.text, row.finish_reason = row.text[:min(cuts)], "stop"
        elif len(row.ids) >= row.max_tokens:
            row.finish_reason = "length"
    if row.finish_reason is not None:
        ready = len(row.text)
    else:   # hold back what could still become a stop string, or is half a multi-byte character
        ready = len(row.text) - max((len(s) - 1 for s in row.stop), default=0)
        while ready > row.sent and row.text[ready - 1] == "\ufffd":
            ready -= 1
    if row.on_text is not None and (ready > row.sent or row.finish_reason is not None):
        row.on_text(row.text[row.sent:max(ready, row.sent)], row.finish_reason)
    row.sent = max(ready, row.sent)


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def _cache_argument(model) -> str:
    """transformers renamed forward's `past_key_values` to `cache` (5.2x); older 5.x know only the first."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class _Batch:
    """The rows being generated together: their KV cache, attention mask and positions, and the logits of each row's
    next token. Rows leave when they end; new rows can join between steps (prefilled apart, then their cache is
    left-padded to the batch's length and stacked under it)."""

    def __init__(self, model, tokenizer, router=None):
        self.model, self.tokenizer, self.router = model, tokenizer, router
        self.device = model.get_input_embeddings().weight.device
        self.eos = _eos_ids(model, tokenizer)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos), 0)
        self.cache_arg = _cache_argument(model)
        self.rows: list[Row] = []
        self.generators: list[torch.Generator | None] = []
        self.cache = self.mask = self.positions = self.logits = None

    def _forward(self, rows, ids, mask, positions, cache):
        if self.router is not None:
            self.router.route([r.patch for r in rows], self.device)
        return self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                          logits_to_keep=1, **{self.cache_arg: cache}).logits[:, -1]

    def add(self, rows: list[Row]) -> None:
        """Prefill `rows` (padded on the left) and join them to the batch."""
        from transformers import DynamicCache

        if not rows:
            return
        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.tensor([[self.pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in rows],
                            device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(rows, ids, mask, positions, cache)
        generators = [None if r.temperature == 0 else _generator(r.seed, self.device) for r in rows]
        if not self.rows:
            self.cache, self.mask, self.positions, self.logits = cache, mask, positions[:, -1:], logits
        else:   # stack under the running rows, both left-padded to the longer length
            length = max(self.mask.shape[1], mask.shape[1])
            for mine, theirs in zip(self.cache.layers, cache.layers):
                mine.keys = torch.cat([_left_pad(mine.keys, length), _left_pad(theirs.keys, length)])
                mine.values = torch.cat([_left_pad(mine.values, length), _left_pad(theirs.values, length)])
            self.mask = torch.cat([_left_pad(self.mask, length), _left_pad(mask, length)])
            self.positions = torch.cat([self.positions, positions[:, -1:]])
            self.logits = torch.cat([self.logits, logits])
        self.rows += rows
        self.generators += generators

    def step(self) -> None:
        """Each row takes its next token; ended rows leave; the others run one forward (for their next logits)."""
        tokens = _choose(self.logits, self.rows, self.generators)
        keep = []
        for slot, (row, token) in enumerate(zip(self.rows, tokens)):
            if row.cancelled():
                row.finish_reason = "cancelled"
            else:
                _advance(row, token, self.tokenizer, self.eos)
            if row.finish_reason is None:
                keep.append(slot)
            elif row.on_finish is not None:
                row.on_finish()
        if len(keep) < len(self.rows):   # drop the ended rows from the batch and the cache
            self.rows = [self.rows[s] for s in keep]
            self.generators = [self.generators[s] for s in keep]
            if not keep:
                return
            index = torch.tensor(keep, device=self.device)
            self.cache.batch_select_indices(index)
            self.mask, self.positions = self.mask[index], self.positions[index]
            tokens = [tokens[s] for s in keep]
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        self.positions = self.positions + 1
        self.logits = self._forward(self.rows, torch.tensor(tokens, device=self.device)[:, None], self.mask,
                                    self.positions, self.cache)


def _left_pad(x: torch.Tensor, length: int) -> torch.Tensor:
    """Pad a mask [B, T] or a cache tensor [B, H, T, D] with zeros on the left of T, up to `length`."""
    dim = 1 if x.dim() == 2 else 2
    if x.shape[dim] == length:
        return x
    shape = list(x.shape)
    shape[dim] = length - x.shape[dim]
    return torch.cat([x.new_zeros(shape), x], dim=dim)


@torch.inference_mode()
def generate_rows(model, tokenizer, rows: list[Row], router=None,
                  admit: Callable[[int], list[Row]] | None = None, max_rows: int | None = None) -> None:
    """Generate every row in one batch (prompts padded on the left); fills each row's text and finish_reason.
    router (a swap.RowRouter, entered): each row runs through its own patch (Row.patch). admit(room): rows to
    join the batch between steps (continuous batching), at most `room` of them (max_rows minus the rows running)."""
    from transformers.cache_utils import DynamicLayer

    batch = _Batch(model, tokenizer, router)
    batch.add(rows)
    if batch.cache is not None and not all(type(layer) is DynamicLayer for layer in batch.cache.layers):
        admit = None   # joining stacks full-attention caches; a sliding-window (or other) cache keeps its batch
    while batch.rows:
        batch.step()
        if admit is not None:
            room = (max_rows or len(rows)) - len(batch.rows)
            if room > 0:
                batch.add(admit(room))
