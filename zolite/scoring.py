"""Score candidate answers by their log-likelihood, with logits computed only at the answer tokens.

An example with C candidates becomes up to C token sequences (prompt + candidate[:-1]); identical sequences
are shared, so single-token candidates cost one sequence per example. Batches are right-padded and run
without an attention mask: under causal attention a real token never sees the padding after it, and with no
per-row mask every later layer accepts a batch doubled for the +eps / -eps halves of a ZO step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import ZoliteError
from .tasks import Example


@dataclass(frozen=True)
class EncodedExample:
    sequences: tuple[tuple[int, ...], ...]   # one per candidate: prompt + candidate[:-1]
    answers: tuple[tuple[int, ...], ...]     # the candidate's tokens
    label: int
    accepted: tuple[int, ...]                # candidates counted correct
    context: tuple[int, ...]                 # the prompt, cut to leave room for the longest candidate


def encode_example(tokenizer, example: Example, max_length: int) -> EncodedExample:
    prompt = tokenizer(example.prompt)["input_ids"]
    sequences, answers = [], []
    for cand in example.candidates:
        full = tokenizer(example.prompt + cand)["input_ids"]
        if full[:len(prompt)] == prompt and len(full) > len(prompt):
            answer = full[len(prompt):]
        else:  # the tokenizer merged across the boundary: tokenize the candidate on its own
            answer = tokenizer(cand, add_special_tokens=False)["input_ids"]
        if not answer:
            raise ZoliteError(f"candidate {cand!r} tokenizes to nothing; use a non-empty candidate")
        keep = max_length - len(answer)
        if keep < 1:
            raise ZoliteError(f"candidate {cand!r} is longer than --max-length {max_length}")
        context = prompt if len(prompt) <= keep else _truncate_left(prompt, keep, tokenizer)
        sequences.append(tuple(context + answer[:-1]))
        answers.append(tuple(answer))
    keep = max_length - max(len(a) for a in answers)
    shared = prompt if len(prompt) <= keep else _truncate_left(prompt, keep, tokenizer)
    return EncodedExample(tuple(sequences), tuple(answers), example.label, example.correct(), tuple(shared))


def _truncate_left(ids: list[int], keep: int, tokenizer) -> list[int]:
    """Drop tokens from the left (the question sits at the end), keeping a leading BOS."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and ids and ids[0] == bos and keep > 1:
        return [bos] + ids[len(ids) - keep + 1:]
    return ids[len(ids) - keep:]


@dataclass
class Batch:
    input_ids: torch.Tensor      # [S, T], right-padded
    rows: torch.Tensor           # [K] sequence of each scored token
    positions: torch.Tensor      # [K] position whose logits predict it
    targets: torch.Tensor        # [K] the token
    owners: torch.Tensor         # [K] example * C + candidate
    counts: torch.Tensor         # [E * C] tokens per candidate (0 = no such candidate)
    labels: torch.Tensor         # [E]
    accepted: torch.Tensor       # [E, C] bool: candidates counted correct
    n_candidates: int

    def to(self, device):
        return Batch(*(getattr(self, f).to(device) for f in
                       ("input_ids", "rows", "positions", "targets", "owners", "counts", "labels", "accepted")),
                     self.n_candidates)


def collate(encoded: list[EncodedExample], pad_id: int) -> Batch:
    n_cand = max(len(e.answers) for e in encoded)
    seq_index: dict[tuple, int] = {}
    rows, positions, targets, owners = [], [], [], []
    for ei, e in enumerate(encoded):
        for ci, (seq, ans) in enumerate(zip(e.sequences, e.answers)):
            s = seq_index.setdefault(seq, len(seq_index))
            first = len(seq) - len(ans)          # position whose logits predict the first answer token
            for k, tok in enumerate(ans):
                rows.append(s)
                positions.append(first + k)
                targets.append(tok)
                owners.append(ei * n_cand + ci)
    longest = max(len(s) for s in seq_index)   # one tensor from padded lists (a step's host time counts)
    input_ids = torch.tensor([[*seq, *[pad_id] * (longest - len(seq))] for seq in seq_index], dtype=torch.long)
    owners_t = torch.tensor(owners)
    counts = torch.bincount(owners_t, minlength=len(encoded) * n_cand)
    accepted = torch.tensor([[c in e.accepted for c in range(n_cand)] for e in encoded], dtype=torch.bool)
    return Batch(input_ids, torch.tensor(rows), torch.tensor(positions), torch.tensor(targets), owners_t,
                 counts, torch.tensor([e.label for e in encoded]), accepted, n_cand)


def pad_token_id(tokenizer) -> int:
    """Any id works for right padding (it is never attended to); avoid the pad id itself so transformers
    does not warn that padding was passed without an attention mask."""
    return 0 if tokenizer.pad_token_id not in (None, 0) else 1


def last_hidden(model, input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
    """Final hidden states (after the last norm), no KV cache, no logits. attention_mask: 4D mask(s) the model takes
    as given (batch_one_mask; None: causal, no padding mask: right padding is never attended to by a real token)."""
    return model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def sliding_window(config) -> int | None:
    """The attention window of a model whose layers use one (Mistral's, Gemma's, a Qwen2 with sliding layers), else
    None."""
    types = getattr(config, "layer_types", None) or []
    if types and all(t == "full_attention" for t in types):
        return None
    return getattr(config, "sliding_window", None)


def causal_mask(length: int, dtype: torch.dtype, device, window: int | None = None) -> torch.Tensor:
    """[1, 1, length, length]: 0 where a token may attend (itself and up to window - 1 tokens back; all of them
    without a window), the dtype's lowest value where it may not (added to the attention scores, as transformers'
    eager and SDPA attention both take a float mask); its batch dimension of 1 broadcasts over any number of rows."""
    position = torch.arange(length, device=device)
    back = position[:, None] - position[None, :]
    allowed = (back >= 0) & (back < window if window else True)
    return torch.zeros(1, 1, length, length, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)


def batch_one_mask(model, length: int, device):
    """The attention mask(s) of batch 1 for `length` tokens, which a forward takes as given (4D) and which broadcast
    over B rows before the first tuned layer and 2B after it: one causal mask, or with the model's sliding window, or
    both by layer type (a model that mixes them takes a dict). None: layer types not known here."""
    config, dtype = model.config, model.get_input_embeddings().weight.dtype
    window = sliding_window(config)
    full = causal_mask(length, dtype, device)
    if not window or window >= length:
        return full
    kinds = set(getattr(config, "layer_types", None) or ["sliding_attention"])
    if not kinds <= {"full_attention", "sliding_attention"}:
        return None
    windowed = causal_mask(length, dtype, device, window)
    if len(kinds) == 1:
        return windowed
    return {"full_attention": full, "sliding_attention": windowed}


def doubled_forward_mask(model, input_ids: torch.Tensor):
    """What a ZO forward that doubles the batch at a tuned layer must give the model: None where transformers' own
    mask fits any batch (no sliding window shorter than the batch: it skips the mask), else batch_one_mask (past a
    window transformers builds one for the B rows it is given, which the 2B rows after the doubling cannot take)."""
    window = sliding_window(model.config)
    if not window or input_ids.shape[1] <= window:
        return None
    mask = batch_one_mask(model, input_ids.shape[1], input_ids.device)
    if mask is None:
        raise ZoliteError(f"this model's attention layer types ({', '.join(sorted(set(model.config.layer_types)))}) "
                          f"are past what zolite's doubled forward handles at {input_ids.shape[1]} tokens; use "
                          f"--max-length {window} or less")
    return mask


def answer_hidden(batch: Batch, hidden: torch.Tensor) -> torch.Tensor:
    """The hidden states [copies, K, D] at the positions whose logits predict the answer tokens."""
    n_seq = batch.input_ids.shape[0]
    copies = hidden.shape[0] // n_seq
    return hidden.view(copies, n_seq, *hidden.shape[1:])[:, batch.rows, batch.positions]


def candidate_scores(model, batch: Batch, hidden: torch.Tensor) -> torch.Tensor:
    """Mean log-probability of each candidate: [copies, E, C] (copies = 2 in a ZO step: +eps, -eps).

    Missing candidates (tasks with fewer than C) get -inf.
    """
    return answer_scores(model, batch, answer_hidden(batch, hidden))


def answer_scores(model, batch: Batch, h: torch.Tensor) -> torch.Tensor:
    """candidate_scores from answer_hidden's states."""
    copies = h.shape[0]
    logp = torch.log_softmax(model.get_output_embeddings()(h).float(), dim=-1)
    token_logp = logp.gather(-1, batch.targets.expand(copies, -1).unsqueeze(-1)).squeeze(-1)
    sums = torch.zeros(copies, batch.counts.numel(), device=h.device).index_add_(1, batch.owners, token_logp)
    scores = sums / batch.counts.clamp(min=1)
    scores = scores.masked_fill(batch.counts == 0, float("-inf"))
    return scores.view(copies, -1, batch.n_candidates)


def losses(scores: torch.Tensor, batch: Batch, objective: str = "ce") -> torch.Tensor:
    """One loss per copy. 'ce': cross-entropy over the candidates; 'lm': -log-likelihood of the gold answer;
    'accuracy': minus the batch accuracy (not differentiable; ZO only needs the two values)."""
    labels = batch.labels
    if objective == "ce":
        return torch.stack([F.cross_entropy(s, labels) for s in scores])
    if objective == "lm":
        return -scores.gather(2, labels.expand(scores.shape[0], -1).unsqueeze(-1)).mean(dim=(1, 2))
    if objective == "accuracy":
        best = scores.argmax(-1, keepdim=True)                                   # [copies, E, 1]
        return -batch.accepted.expand(scores.shape[0], -1, -1).gather(2, best).float().mean(dim=(1, 2))
    raise ZoliteError(f"unknown objective '{objective}'; choose ce, lm or accuracy")
