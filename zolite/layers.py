"""Where the decoder layers sit in each architecture, and which of them a run tunes (0-based indices)."""
from __future__ import annotations

import torch

from .errors import ZoliteError

# llama / mistral / qwen2 / qwen3: model.layers; OPT: model.decoder.layers; GPT-2: transformer.h; Pythia: gpt_neox.layers
LAYER_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers")


def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The dotted path of the decoder-layer list and the list itself."""
    for path in LAYER_PATHS:
        module = model
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, torch.nn.ModuleList):
            return path, module
    raise ZoliteError(f"cannot find the decoder layers of {type(model).__name__}; "
                      f"supported layouts: {', '.join(LAYER_PATHS)}")


def is_weight_matrix(module: torch.nn.Module) -> bool:
    """A Linear, or GPT-2's Conv1D (a Linear with its weight transposed): the modules bitsandbytes quantizes."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (torch.nn.Linear, Conv1D))


def parse_params(params: str | None) -> list[str]:
    """--params' comma-separated name parts (empty: every tensor of the tuned layers)."""
    return [w.strip() for w in (params or "").split(",") if w.strip()]


def is_every_layer(spec) -> bool:
    """--layer all (any case or spacing)."""
    return isinstance(spec, str) and spec.strip().lower() == "all"


def parse_layers(spec: str | int, num_layers: int) -> list[int]:
    """'12' -> [12]; 'all' -> every layer; '3,5' -> [3, 5]."""
    if is_every_layer(spec):
        return list(range(num_layers))
    try:
        indices = [int(spec)] if isinstance(spec, int) else [int(s) for s in str(spec).split(",")]
    except ValueError:
        raise ZoliteError(f"--layer '{spec}' is not a layer index; pass an integer (0-based), a list like 3,5, or all") from None
    check_layer_indices(indices, num_layers)
    if len(set(indices)) != len(indices):
        raise ZoliteError(f"--layer '{spec}' names a layer twice")
    return sorted(indices)


def check_layer_indices(layers, num_layers: int, hint: str = "") -> None:
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ZoliteError(f"layer {bad[0]} is out of range: this model has {num_layers} decoder layers, 0 to "
                          f"{num_layers - 1} (0-based){hint}")


def format_layers(indices: list[int], num_layers: int) -> str:
    return "all" if indices == list(range(num_layers)) else ",".join(map(str, indices))
