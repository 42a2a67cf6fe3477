"""Greedy answers to generation-task prompts (SQuAD, DROP): what the F1 / EM eval scores, and what the f1 objective
scores under W + eps z and W - eps z. Depends on no other zolite module, so both the eval and the ZO step can use it."""
from __future__ import annotations

import torch


@torch.inference_mode()
def generate_answers(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 50, max_length: int = 512,
                     batch_size: int = 32) -> list[str]:
    """Greedy answers, cut at the first new line (MeZO's answers end with one), prompts cut from the left."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = []
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True, padding_side="left",
                        truncation=True, truncation_side="left", max_length=max(1, max_length - max_new_tokens))
        out = model.generate(**enc.to(device), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        for row in out[:, enc["input_ids"].shape[1]:]:
            answers.append(tokenizer.decode(row, skip_special_tokens=True).split("\n")[0].strip())
    return answers
