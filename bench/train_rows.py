"""What the probing benches share: the model loaded as `zolite tune` loads it, its training rows encoded as tune
encodes them (split with data seed 0), and a stepper that only measures losses."""
from __future__ import annotations


def load_with_train_rows(config):
    """(loaded model, tuned layer indices, the config with the profile's defaults filled in, encoded train rows)."""
    from zolite.data import sample_splits
    from zolite.evaluate import encode_rows
    from zolite.layers import decoder_layers
    from zolite.tasks import get_task, task_data
    from zolite.tune_setup import fill_defaults, load_for_tuning

    loaded, indices, _, _ = load_for_tuning(config)
    task = get_task(config.task)
    config = fill_defaults(config, loaded, indices, len(decoder_layers(loaded.model)[1]), task)
    splits = sample_splits(task_data(task, config.data), seed=0, validate=task.validate, expand=task.expand)
    return loaded, indices, config, encode_rows(loaded.tokenizer, task, splits.train, config.max_length)


def loss_stepper(loaded, tuned, config):
    """A zolite Stepper over `tuned` at lr 0: its pair_losses(examples, seed, eps) are the probe's losses."""
    from zolite.optim import Stepper
    from zolite.scoring import collate, pad_token_id

    pad, device = pad_token_id(loaded.tokenizer), loaded.device
    return Stepper(loaded.model, tuned, eps=config.eps, objective="ce", seed=config.seed, lr=0.0,
                   collate_to_device=lambda c: collate(c, pad).to(device))
