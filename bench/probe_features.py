"""Save every layer's hidden state at the position that predicts the answer, for a task's train, val and test rows.

Inference only, on the frozen base, with zolite's own prompt encoding. `bench/probe_ceiling.py` then asks what a
linear read-out of each layer can reach (the ceiling of any recipe that only reweighs the last hidden state, such as
the final norm) and replays a ZO run on the final norm exactly from the saved states.

    python bench/probe_features.py --model smollm2-135m --task boolq --data ../shared/data --out OUT
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from calibration_ceiling import two_answer_arguments, two_answer_setup   # bench/, beside this script
from zolite.errors import ZoliteError
from zolite.evaluate import encode_rows


@torch.inference_mode()
def last_states(model, encoded, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, L+1, D] hidden states (embeddings, then each layer's output, as transformers returns them) and [N, D]
    the final norm's input, at each row's last prompt token."""
    norm = model.base_model.norm
    device = next(model.parameters()).device
    captured = {}
    hook = norm.register_forward_hook(lambda mod, args, out: captured.__setitem__("pre", args[0]))
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].context))
    layers_out, pre_out = [None] * len(encoded), [None] * len(encoded)
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            lengths = torch.tensor([len(encoded[i].context) for i in chunk])
            ids = torch.zeros(len(chunk), int(lengths.max()), dtype=torch.long)
            for r, i in enumerate(chunk):
                ids[r, :lengths[r]] = torch.tensor(encoded[i].context)
            out = model.base_model(input_ids=ids.to(device), output_hidden_states=True)   # right padding: causal
            rows, last = torch.arange(len(chunk), device=device), lengths.to(device) - 1
            states = torch.stack(out.hidden_states, dim=1)[rows, :, last].cpu()
            pre = captured["pre"][rows, last].cpu()
            for r, i in enumerate(chunk):
                layers_out[i], pre_out[i] = states[r].float(), pre[r].float()
    finally:
        hook.remove()
    return torch.stack(layers_out), torch.stack(pre_out)


def main():
    args = two_answer_arguments(__doc__, "folder for features.pt and meta.json", batch_size=8)
    task, splits, loaded, meta = two_answer_setup(args)
    saved = {}
    for split in ("train", "val", "test"):
        rows = getattr(splits, split)[:args.limit]
        t0 = time.perf_counter()
        encoded = encode_rows(loaded.tokenizer, task, rows, args.max_length)
        layers, pre = last_states(loaded.model, encoded, args.batch_size)
        saved[split] = {"layers": layers.half(), "pre_norm": pre, "label": torch.tensor([e.label for e in encoded]),
                        "answers": torch.tensor([[a[0] for a in e.answers] for e in encoded]),
                        "single_token": all(len(a) == 1 for e in encoded for a in e.answers)}
        meta[f"{split}_rows"] = len(rows)
        meta[f"{split}_seconds"] = round(time.perf_counter() - t0, 1)
        print(split, len(rows), meta[f"{split}_seconds"], "s", flush=True)
    head = loaded.model.get_output_embeddings().weight.detach().float().cpu()
    saved["final_norm"] = {"weight": loaded.model.base_model.norm.weight.detach().float().cpu(),
                           "eps": loaded.model.base_model.norm.variance_epsilon}
    saved["head_rows"] = {int(t): head[int(t)] for t in saved["train"]["answers"].unique()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(saved, out / "features.pt")
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    try:
        main()
    except ZoliteError as e:   # a wrong task, model or data folder: one line, as the CLI prints it
        raise SystemExit(f"probe_features.py: {e}")
