"""Memory-lean loading (int8 with the tuned layer kept out of quantization), the memory planner, micro-batches,
and the memory reports of tune and `zolite profile`."""
from __future__ import annotations

import json
import math
import sys

import pytest
import torch

import zolite
from conftest import run_cli
from test_errors import QUICK, assert_user_error
from zolite.errors import ZoliteError
from zolite.loading import load_model, model_skeleton
from zolite.plan import estimate, parse_size, plan_memory
from zolite.scoring import collate, pad_token_id
from zolite.optim import micro_batched_losses
from zolite.zo import TunedLayers, spsa_losses

GIB = 2**30


@pytest.fixture(scope="module")
def llama7b_skeleton():
    """Llama-2-7B's shape on the meta device: no memory, real parameter counts."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000)
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def test_parse_size():
    assert parse_size("8GiB") == 8 * GIB
    assert parse_size("8 GB") == 8 * GIB
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("6") == 6 * GIB
    for bad in ("lots", "8iB", "8 GiBs"):
        with pytest.raises(ZoliteError, match="not a size"):
            parse_size(bad)


def test_estimates_follow_the_weight_sizes(llama7b_skeleton):
    parts = {m: estimate(llama7b_skeleton, [1], m, 16, 256, torch.float16) for m in ("fp16", "int8", "nf4", "offload")}
    assert 12.4 < parts["fp16"]["weights"] < 12.7          # 6.74 B params in fp16
    assert 6.5 < parts["int8"]["weights"] < 6.9             # measured 6.56 GiB all-int8; layer 1 in fp16 adds 0.19
    assert 3.9 < parts["nf4"]["weights"] < 4.4              # measured 3.93 GiB all-nf4; layer 1 in fp16 adds 0.28
    assert 1.3 < parts["offload"]["weights"] < 1.4          # the tuned layer, the embedding, 3 streamed heads' worth
    assert parts["int8"]["master_copy"] == pytest.approx(202.4e6 * 2 / GIB, rel=0.01)   # fp16 residuals of 202.4 M params


def test_plan_picks_the_fastest_mode_that_fits(llama7b_skeleton):
    picks = {gib: plan_memory(llama7b_skeleton, [1], gib * GIB, 16, 256, torch.float16)
             for gib in (24, 12, 8, 6, 4)}
    assert (picks[24].mode, picks[24].micro_batch) == ("fp16", 16)
    # int8 is never picked unasked: nf4 was faster and smaller on the H100 and keeps ZO's accuracy
    assert (picks[12].mode, picks[12].micro_batch) == ("nf4", 16)
    assert (picks[8].mode, picks[8].micro_batch) == ("nf4", 16)
    assert picks[6].mode == "nf4" and picks[6].micro_batch < 16
    assert picks[4].mode == "offload"
    for gib, plan in picks.items():
        assert plan.estimate_gib <= gib and plan.reason.startswith(plan.mode)
    with pytest.raises(ZoliteError, match="nothing fits in 0.50 GiB"):
        plan_memory(llama7b_skeleton, [1], GIB // 2, 16, 256, torch.float16)


def test_smaller_budget_smaller_micro_batch(llama7b_skeleton):
    big = plan_memory(llama7b_skeleton, [1], 20 * GIB, 16, 2048, torch.float16, mode="int8")
    small = plan_memory(llama7b_skeleton, [1], 11 * GIB, 16, 2048, torch.float16, mode="int8")
    assert small.micro_batch < big.micro_batch and 16 % small.micro_batch == 0


def test_int8_keeps_the_tuned_layer_unquantized(tiny_model):
    pytest.importorskip("bitsandbytes")
    loaded = load_model(tiny_model, device="cpu", mode="int8", keep_layers=[1])
    kinds = {name: type(m).__name__ for name, m in loaded.model.named_modules() if name.endswith("q_proj")}
    assert kinds["model.layers.1.self_attn.q_proj"] == "Linear"
    assert {kinds[f"model.layers.{i}.self_attn.q_proj"] for i in (0, 2, 3)} == {"Linear8bitLt"}
    assert loaded.model.lm_head.weight.dtype == torch.float32
    with pytest.raises(ZoliteError, match="layer 9 is out of range"):
        load_model(tiny_model, device="cpu", mode="int8", keep_layers=[9])


def test_micro_batches_give_the_batch_losses(tiny_model, small_data):
    from zolite.evaluate import encode_rows
    from zolite.data import sample_splits
    from zolite.tasks import get_task, task_data

    loaded = load_model(tiny_model, device="cpu")
    task = get_task("sst2")
    rows = sample_splits(task_data(task, small_data), seed=0).train[:8]
    examples = encode_rows(loaded.tokenizer, task, rows, 128)
    tuned = TunedLayers(loaded.model, [1])
    pad = pad_token_id(loaded.tokenizer)
    batch_of = lambda chunk: collate(chunk, pad)  # noqa: E731
    whole = micro_batched_losses(loaded.model, tuned, examples, batch_of, 7, 1e-2, "ce")
    split = micro_batched_losses(loaded.model, tuned, examples, batch_of, 7, 1e-2, "ce", micro_batch=2)
    assert whole[0] != whole[1]
    assert split == pytest.approx(whole, abs=1e-6)


def test_int8_tune_writes_the_memory_report(tiny_model, small_data, tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    report = zolite.tune(tiny_model, "sst2", data=small_data, run_dir=tmp_path / "run", layer="1", steps=4,
                         eval_every=2, batch_size=4, micro_batch=2, mode="int8", eps=1e-3, progress=False)
    # int8 at MeZO's eps 1e-3 (given: int8's default is 1e-2): warned that the activation rounding swamps the estimate
    assert "use --mode nf4, or --eps 0.01" in capsys.readouterr().err
    assert report["config"]["mode"] == "int8" and report["config"]["micro_batch"] == 2
    profile = report["memory_profile"]
    assert {"load", "data", "train", "forward ±eps", "update", "eval", "final eval", "patch write"} <= set(profile["phases"])
    assert profile["phases"]["forward ±eps"]["count"] == 4 and profile["phases"]["eval"]["count"] == 3   # steps 0, 2, 4
    assert "int8 on cpu" in profile["breakdown"]["frozen_weights_gib"]
    assert profile["tokens_per_s"] > 0 and profile["timeline"]
    assert (tmp_path / "run" / "memory.png").stat().st_size > 0
    assert "forward ±eps" in (tmp_path / "run" / "report.md").read_text()
    patch = zolite.load_patch(report["patch"])
    assert set(patch.tensors) == {n for n in patch.tensors if n.startswith("model.layers.1.")}


def test_profile_command(tiny_model, tmp_path):
    result = run_cli("profile", "--model", tiny_model, "--layer", "2", "--batch", "4", "--seq-len", "16", "--steps",
                     "3", "--micro-batch", "2", "--out", tmp_path / "p", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["layers"] == "2" and summary["micro_batch"] == 2 and summary["seq_len"] == 16
    assert summary["memory_profile"]["phases"]["forward ±eps"]["count"] == 3
    for name in ("report.json", "report.md", "memory.png"):
        assert (tmp_path / "p" / name).is_file()
    assert_user_error(run_cli("profile", "--model", tiny_model, "--layer", "2", "--out", tmp_path / "p"),
                      "already exists", "--force")


def test_memory_errors(tiny_model, small_data, tmp_path, monkeypatch):
    assert_user_error(run_cli("tune", "--model", tiny_model, "--mode", "int4", "--layer", "1", "--data", small_data,
                              "--run-dir", tmp_path / "a", *QUICK), "unknown mode 'int4'", "int8")
    assert_user_error(run_cli("tune", "--model", tiny_model, "--mode", "offload", "--layer", "1", "--data",
                              small_data, "--device", "cpu", "--run-dir", tmp_path / "b", *QUICK),
                      "--mode offload", "there is none here")
    assert_user_error(run_cli("tune", "--model", tiny_model, "--gpu-memory", "1KiB", "--layer", "1", "--data",
                              small_data, "--run-dir", tmp_path / "c", *QUICK), "nothing fits in 0.00 GiB")
    assert_user_error(run_cli("tune", "--model", tiny_model, "--gpu-memory", "lots", "--layer", "1", "--data",
                              small_data, "--run-dir", tmp_path / "d", *QUICK), "not a size")
    assert_user_error(run_cli("tune", "--model", tiny_model, "--micro-batch", "3", "--layer", "1", "--data",
                              small_data, "--run-dir", tmp_path / "e", *QUICK), "must divide --batch-size 2")
    assert_user_error(run_cli("tune", "--model", tiny_model, "--mode", "int8", "--layers", "all", "--data",
                              small_data, "--run-dir", tmp_path / "f", *QUICK), "nothing is left to quantize")


def test_offload_refuses_without_cpu_memory(tiny_model, monkeypatch):
    import psutil

    from zolite.loading import check_cpu_memory

    class Tiny:
        available = 1024

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Tiny())
    with pytest.raises(ZoliteError, match="keeps the weights in CPU memory.*available"):
        check_cpu_memory(model_skeleton(tiny_model), torch.float16)


def test_measured_activations_replace_the_estimate(llama7b_skeleton, monkeypatch, tmp_path):
    from zolite.plan import load_measured, record_measured

    monkeypatch.setenv("ZOLITE_CACHE", str(tmp_path))
    assert load_measured("some-model", torch.float16) == {}
    record_measured("some-model", "int8", torch.float16, 1000.0, {"gpu": "test"})
    assert load_measured("some-model", torch.float32) == {}   # measured in fp16 only
    measured = load_measured("some-model", torch.float16)
    assert measured == {"int8": 1000.0}
    parts = estimate(llama7b_skeleton, [1], "int8", 16, 256, torch.float16, measured=measured)
    assert parts["activations"] == round(1.1 * 2 * 16 * 256 * 1000 / GIB, 3)
    analytic = estimate(llama7b_skeleton, [1], "nf4", 16, 256, torch.float16, measured=measured)
    assert analytic["activations"] > parts["activations"]   # nf4 was not measured: the analytic estimate


def test_shipped_measurements_plan_llama2_7b_until_the_user_measures(llama7b_skeleton, monkeypatch, tmp_path):
    """The llama2-7b profile ships activation bytes measured on an H100; the user's own measurement wins."""
    from zolite.plan import measured_activations, record_measured
    from zolite.profile import get_profile

    monkeypatch.setenv("ZOLITE_CACHE", str(tmp_path))
    profile = get_profile("llama2-7b")
    shipped = measured_activations("llama2", torch.float16, profile)
    assert set(shipped) == {"fp16", "int8", "nf4", "offload"} and measured_activations("llama2", torch.float32, profile) == {}
    plan = plan_memory(llama7b_skeleton, [1], 8 * GIB, 16, 256, torch.float16, measured=shipped)
    # measured on the H100: nf4 peaked at 5.30 GiB (allocated) for this batch; the plan adds 10% and the CUDA context
    assert (plan.mode, plan.micro_batch) == ("nf4", 16) and 5.3 < plan.estimate_gib < 6.6
    record_measured("llama2", "nf4", torch.float16, 1.0, {"gpu": "test"})
    assert measured_activations("llama2", torch.float16, profile)["nf4"] == 1.0


def test_gpu_cap_passes_torch_a_device_index(monkeypatch):
    """torch.cuda.set_per_process_memory_fraction refuses a bare 'cuda' device (it wants an index): the GPU runs
    of --gpu-memory failed there. Checked here with the CUDA calls replaced."""
    from types import SimpleNamespace

    from zolite.tune_setup import cap_gpu_memory

    calls = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=80 * 2**30))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, i: calls.append((f, i)))
    assert cap_gpu_memory(8 * 2**30, torch.device("cuda")) == 0.1
    cap_gpu_memory(100 * 2**30, torch.device("cuda:1"))
    assert calls == [(0.1, 0), (1.0, 1)] and all(isinstance(i, int) for _, i in calls)


def test_on_a_gpu_a_run_that_would_not_fit_the_free_memory_is_planned(llama7b_skeleton, monkeypatch, capsys):
    """No --gpu-memory on a GPU: a run that fits the card's free memory as asked runs as asked (its numbers do not
    depend on what was free); one that would not gets the largest micro-batch that fits, else offload, else is
    tried anyway. --gpu-memory plans for the budget and caps the allocator. CUDA calls replaced."""
    from zolite.profile import get_profile
    from zolite.tune_setup import TuneConfig, plan_for_device

    free = {"bytes": 40 * GIB}
    caps = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (free["bytes"], 80 * GIB))
    monkeypatch.setattr(sys.modules["zolite.tune_setup"], "cap_gpu_memory", lambda budget, device: caps.append(budget))
    profile = get_profile("llama2-7b")

    def plan(**options):
        config = TuneConfig(model="llama2-7b", task="boolq", batch_size=16, max_length=256, **options)
        return plan_for_device(config, torch.device("cuda"), llama7b_skeleton, [1], lambda: "x", profile)

    assert plan() == (None, None) and plan(mode="fp16") == ("fp16", None)     # fit as asked: unchanged
    free["bytes"] = 6 * GIB                                                   # nf4 (the default) fits at 8
    mode, p = plan()
    assert (mode, p.micro_batch) == ("nf4", 8) and "would not fit the GPU's free 6.0 GiB" in capsys.readouterr().err
    free["bytes"] = 5 * GIB                                                   # no nf4 micro-batch fits: offload
    assert plan()[0] == "offload"
    assert plan(mode="nf4") == ("nf4", None) and "trying the run as asked" in capsys.readouterr().err
    free["bytes"] = 1 * GIB                                                   # nothing fits: tried as asked
    assert plan() == (None, None) and caps == []
    mode, p = plan(gpu_memory="8GiB")                                        # a budget you give: planned and capped
    assert (mode, p.micro_batch) == ("nf4", 16) and caps == [8 * GIB]
    with pytest.raises(ZoliteError, match="nothing fits in 1.00 GiB"):
        plan(gpu_memory="1GiB")
    assert plan_for_device(TuneConfig(model="m", task="t", mode="int8"), torch.device("cpu"), None, [1], None,
                           None) == ("int8", None)


def test_default_mode_on_a_gpu_is_nf4_unless_the_profile_says_otherwise():
    from zolite.loading import choose_mode
    from zolite.profile import get_profile

    assert choose_mode(None, torch.device("cuda"), None) == "nf4"
    assert choose_mode(None, torch.device("cuda"), get_profile("smollm2-135m")) == "fp16"   # its profile's mode_cuda
    assert choose_mode(None, torch.device("cpu"), None) == "fp16"
    assert choose_mode("int8", torch.device("cuda"), None) == "int8"


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_breakdown_counts_the_quantization_statistics(tiny_model, mode):
    """LLM.int8's row scales and NF4's block absmax are not parameters; the breakdown still counts them, once."""
    pytest.importorskip("bitsandbytes")
    from zolite.memory import weight_breakdown
    from zolite.zo import TunedLayers

    loaded = zolite.load_model(tiny_model, mode=mode, device="cpu", keep_layers=[1])
    tuned = TunedLayers(loaded.model, [1])
    frozen = weight_breakdown(loaded.model, tuned)["frozen_weights_gib"]
    quantized = [m.weight for m in loaded.model.modules() if type(m.weight if hasattr(m, "weight") else None).__name__
                 in ("Int8Params", "Params4bit")]
    assert quantized
    stats = (sum(w.SCB.numel() * 4 for w in quantized) if mode == "int8" else
             sum(w.quant_state.absmax.numel() * 4 + w.quant_state.code.numel() * 4 for w in quantized))
    assert frozen["quantization statistics, float32 on cpu"] * 2**30 == pytest.approx(stats, abs=2**30 * 1e-4)
    weights = sum(w.numel() for w in quantized)   # int8: 1 byte a weight, nf4: 2 weights a byte, stored as uint8
    assert frozen[f"{'int8' if mode == 'int8' else 'uint8'} on cpu"] * 2**30 == pytest.approx(weights, abs=2**30 * 1e-4)


def test_streamed_offload_computes_the_same_and_restores_its_weights(tiny_model):
    """On the CPU there is no side stream, but the bookkeeping is the GPU's: each frozen layer's Linears and the head
    are fetched one ahead, in execution order, the kept layer and the embedding are not streamed, the weights go into
    a few slabs (pageable here: pinning needs a GPU), and after a forward each module holds its own Parameter again,
    with the same logits, also after a forward that failed."""
    from zolite.offload import stream_from_cpu

    def slab_allocator(slabs):
        return lambda n: slabs.append(torch.empty(n, dtype=torch.uint8)) or slabs[-1]

    model = zolite.load_model(tiny_model, dtype="float32").model
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())   # untie: stream the head too
    ids = torch.tensor([[1, 5, 9, 3]])
    expected = model(ids).logits
    params = dict(model.named_parameters())
    slabs = []
    streamer = stream_from_cpu(model, torch.device("cpu"), keep_layers=[1], allocate=slab_allocator(slabs))
    names = {id(m): n for n, m in model.named_modules()}
    order = [names[id(u)] for u in streamer.units]
    linears = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj"]
    assert order == [*[f"model.layers.{i}.{n}" for i in (0, 2, 3) for n in linears], "lm_head"]
    slab = range(slabs[0].data_ptr(), slabs[0].data_ptr() + slabs[0].numel())
    assert len(slabs) == 1 and model.lm_head.weight.data_ptr() in slab
    assert model.model.layers[1].mlp.up_proj.weight.data_ptr() not in slab      # kept: not streamed
    assert model.model.embed_tokens.weight.data_ptr() not in slab
    assert torch.equal(model(ids).logits, expected)                     # the first forward: order learned,
    assert streamer.seen == list(range(len(order))) and streamer.copies == len(order)   # copies made on demand
    for _ in range(2):
        assert torch.equal(model(ids).logits, expected)
    assert streamer.following == {k: k + 1 for k in range(len(order) - 1)}
    assert streamer.copies == 3 * len(order) and not streamer.ready      # one copy per unit per forward
    assert all(p is params[n] for n, p in model.named_parameters())
    model.model.layers[0].self_attn.k_proj.register_forward_hook(lambda *_: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        model(ids)                                                       # fails after q and k had their copies
    assert all(p is params[n] for n, p in model.named_parameters())     # put back
    from zolite.offload import ModuleStreamer

    other = zolite.load_model(tiny_model, dtype="float32").model
    units = [m for m in other.model.layers[0].modules() if isinstance(m, torch.nn.Linear)][::-1]
    backwards = ModuleStreamer(other, units, torch.device("cpu"))      # registered in the reverse of execution order
    other(ids), other(ids)
    assert backwards.following == {k: k - 1 for k in range(len(units) - 1, 0, -1)}   # learned from the first forward
    tied = zolite.load_model(tiny_model, dtype="float32").model          # tied, as SmolLM2: the head stays on the device
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert tied.lm_head not in stream_from_cpu(tied, torch.device("cpu"), allocate=slab_allocator([])).units


def test_slab_spaces_do_not_overlap():
    from zolite.offload import _slab_spaces

    sizes = {"a": 3, "b": 300 << 20, "c": 1000, "d": 200 << 20, "e": 1, "f": 250 << 20}
    slabs = []
    spaces = dict(_slab_spaces(sizes, lambda n: slabs.append(torch.empty(n, dtype=torch.uint8)) or slabs[-1]))
    assert [s.numel() for s in slabs] == [512 << 20] * 2   # the largest (300 MiB) sets the size; b + f > 512
    assert {k: v.numel() for k, v in spaces.items()} == sizes
    spans = sorted((v.data_ptr(), v.data_ptr() + v.numel()) for v in spaces.values())
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    assert all(v.data_ptr() % 512 == slabs[0].data_ptr() % 512 for v in spaces.values())


def test_breakdown_counts_every_meta_tensor(tiny_model):
    """Tensors on the meta device all report data_ptr 0: the breakdown must not take them for one shared tensor."""
    from zolite.memory import weight_breakdown
    from zolite.zo import TunedLayers

    skeleton = model_skeleton(tiny_model)
    tuned = TunedLayers(skeleton, [1])
    frozen = weight_breakdown(skeleton, tuned)["frozen_weights_gib"]
    size = sum(p.numel() * p.element_size() for p in skeleton.parameters()) - tuned.numel() * 4
    assert frozen["float32 on meta"] * 2**30 == pytest.approx(size, abs=2**30 * 1e-4)


def test_the_plan_counts_the_cuda_graphs_z_buffers(llama7b_skeleton):
    """--cuda-graphs holds z of every tuned tensor in fp32 where the step is graphed (a small layer's fused path):
    the estimate counts those 4 bytes per tuned weight there, and nothing for a 7B layer (per-half path, not
    graphed) or an offloaded run."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        small = LlamaForCausalLM(LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                             num_attention_heads=9, num_key_value_heads=3, vocab_size=49152))
    layer = sum(p.numel() for p in small.model.layers[11].parameters())
    plain, graphed = (estimate(small, [11], "fp16", 16, 64, torch.float32, cuda_graphs=g) for g in (False, True))
    assert plain["z_buffers"] == 0 and graphed["z_buffers"] == round(4 * layer / GIB, 3)
    assert {k: v for k, v in graphed.items() if k != "z_buffers"} == {k: v for k, v in plain.items() if k != "z_buffers"}
    assert estimate(small, [11], "offload", 16, 64, torch.float32, cuda_graphs=True)["z_buffers"] == 0
    assert estimate(llama7b_skeleton, [1], "nf4", 16, 256, torch.float16, cuda_graphs=True)["z_buffers"] == 0
    # None: a profile's default, which holds in mode fp16 only (the plan picks the mode)
    assert estimate(small, [11], "fp16", 16, 64, torch.float32, cuda_graphs=None) == graphed
    assert estimate(small, [11], "nf4", 16, 64, torch.float32, cuda_graphs=None)["z_buffers"] == 0


@pytest.fixture(scope="module")
def qwen2_64(tmp_path_factory) -> str:
    """A tiny Qwen2 (biases) wide enough for bitsandbytes' nf4 forward on the CPU (hidden 32 fails there)."""
    from conftest import build_tiny_qwen2

    return str(build_tiny_qwen2(tmp_path_factory.mktemp("qwen2-64") / "model", hidden=64))


def test_the_plan_counts_the_vectors_z_buffer():
    """Half-precision vectors alone (--params norm) are stepped together, their z drawn into one fp32 buffer, graphed
    or not: the estimate counts 4 bytes per tuned weight, and nothing for fp32 vectors (one by one) or for more than
    one update chunk of them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def wide(hidden):   # on meta: only the counts are real, so a layer this wide costs nothing
        with torch.device("meta"):
            return LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=64, num_hidden_layers=1,
                                                num_attention_heads=1, num_key_value_heads=1, vocab_size=64))

    model = wide(1 << 20)   # two norms of 2^20: 8 MiB of fp32 z
    vectors = estimate(model, [0], "nf4", 1, 8, torch.float16, params="norm")
    assert vectors["z_buffers"] == round(4 * 2 * (1 << 20) / GIB, 3) > 0
    assert vectors["perturbation"] == round(3 * 2 * 2 * (1 << 20) / GIB, 3)   # the pairs and the concatenation
    assert estimate(model, [0], "nf4", 1, 8, torch.float32, params="norm")["z_buffers"] == 0
    assert estimate(model, [0], "nf4", 1, 8, torch.float16)["z_buffers"] == 0   # the layer's matrices: one by one
    assert estimate(wide(1 << 22), [0], "nf4", 1, 8, torch.float16, params="norm")["z_buffers"] == 0


def test_quantized_modes_keep_only_the_tuned_weights_linears(qwen2_64):
    """nf4 / int8 leave a Linear unquantized only where its weight is tuned: --params bias,norm over every layer
    keeps every Linear in 4 bits (biases and norms are never quantized); v_proj keeps one Linear a layer."""
    pytest.importorskip("bitsandbytes")
    from zolite.loading import linear_names, quantizes_nothing

    def kinds(**keep):
        loaded = load_model(qwen2_64, device="cpu", mode="nf4", **keep)
        return {name: type(m).__name__ for name, m in loaded.model.model.layers.named_modules()
                if name.endswith("_proj")}

    every = [0, 1, 2]
    assert set(kinds(keep_layers=every, keep_params="bias,norm").values()) == {"Linear4bit"}
    some = kinds(keep_layers=[1], keep_params="v_proj")
    assert [n for n, k in some.items() if k == "Linear"] == ["1.self_attn.v_proj"]
    whole = kinds(keep_layers=[1])
    assert {n for n, k in whole.items() if k == "Linear"} == {n for n in whole if n.startswith("1.")}
    skeleton = model_skeleton(qwen2_64)
    assert linear_names(skeleton, every, "bias,norm") == []
    assert quantizes_nothing(skeleton, every) and not quantizes_nothing(skeleton, every, "bias,norm")
    assert not quantizes_nothing(skeleton, [1])


@pytest.fixture(scope="module")
def nf4_patches(qwen2_64, small_data, tmp_path_factory) -> dict:
    """Two nf4 patches of the tiny Qwen2: every layer's biases and norms, and layer 1's v_proj."""
    pytest.importorskip("bitsandbytes")
    out = tmp_path_factory.mktemp("nf4-patches")
    common = dict(mode="nf4", device="cpu", steps=2, eval_every=0, batch_size=4, lr=1e-2, data=small_data,
                  progress=False)
    return {"bitfit": zolite.tune(qwen2_64, "sst2", layer="all", params="bias,norm", run_dir=out / "a", **common),
            "v": zolite.tune(qwen2_64, "sst2", layer="1", params="v_proj", run_dir=out / "b", **common)}


def test_served_patches_keep_the_linears_they_change(qwen2_64, nf4_patches):
    """Several patches on one quantized base: the Linears any of them changes stay unquantized, so each attaches, and
    only those (each layer its own patches' --params, not every layer's); biases-and-norms patches alone leave every
    Linear in 4 bits."""
    from zolite.swap import load_with_patches

    def unquantized(names):
        loaded, patches = load_with_patches(None, {n: nf4_patches[n]["patch"] for n in names}, mode="nf4",
                                            device="cpu")
        return {n for n, m in loaded.model.model.layers.named_modules() if type(m) is torch.nn.Linear}

    assert unquantized(["bitfit"]) == set()
    assert unquantized(["bitfit", "v"]) == {"1.self_attn.v_proj"}


def test_older_runs_and_patches_keep_their_layers_whole():
    """Before 2026-12-06 a quantized --params run kept every Linear of its layers unquantized: its config resumes,
    and its patch applies, over that base; runs without --params, or unquantized, are unaffected."""
    from zolite.patch import Patch
    from zolite.tune_setup import TuneConfig, unquantized_params, with_new_options

    old = {"params": "v_proj", "mode": "nf4"}
    assert with_new_options(old)["keep_whole_layers"] is True
    assert unquantized_params(TuneConfig(**with_new_options(old))) is None
    assert not with_new_options({"params": "v_proj", "mode": "fp16"})["keep_whole_layers"]
    assert not with_new_options({"mode": "nf4"})["keep_whole_layers"]
    assert unquantized_params(TuneConfig(params="v_proj", mode="nf4")) == "v_proj"

    def patch(hparams):
        return Patch({}, {"zolite.hparams": json.dumps(hparams)})

    assert patch(old).unquantized_params is None
    assert patch({**old, "keep_whole_layers": False}).unquantized_params == "v_proj"


def test_biases_and_norms_of_every_layer_tune_on_an_nf4_base(qwen2_64, small_data, tmp_path):
    """BitFit-style ZO in nf4: every layer's biases and norms tuned, every Linear weight quantized. The patch holds
    only those tensors, and `zolite eval` in nf4 (the patch's Linears quantized as in the run) scores it as the run
    did."""
    pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file

    report = zolite.tune(qwen2_64, "sst2", layer="all", params="bias,norm", mode="nf4", device="cpu", steps=4,
                         eval_every=2, batch_size=4, lr=1e-2, data=small_data, run_dir=tmp_path / "run",
                         progress=False)
    assert report["config"]["mode"] == "nf4" and report["layers"] == "all"
    patch = load_file(report["patch"])
    assert patch and all("bias" in n or "norm" in n for n in patch)
    assert report["tuned_params"] == sum(t.numel() for t in patch.values())
    assert all(math.isfinite(x) for x in report["loss_curve"])
    result = zolite.evaluate(qwen2_64, "sst2", patch=report["patch"], split="val", data=small_data, mode="nf4",
                             device="cpu")
    assert result["patched"]["score"] == report["final"]["val"]["score"]
    with pytest.raises(ZoliteError, match="nothing is left to quantize.*--params norm"):
        zolite.tune(qwen2_64, "sst2", layer="0,1,2", mode="nf4", device="cpu", steps=2, data=small_data,
                    run_dir=tmp_path / "all", progress=False)


def test_the_plan_quantizes_the_weights_params_leaves_out(llama7b_skeleton):
    """Every layer's biases and norms: weights as small as all-nf4 (the 7B's 3.9 GiB), so the planner may pick
    nf4; every layer's weights: nothing left to quantize (fp16 or offload only)."""
    every = list(range(32))
    nf4 = estimate(llama7b_skeleton, every, "nf4", 16, 256, torch.float16, params="bias,norm")
    assert 3.6 < nf4["weights"] < 4.0 and nf4["master_copy"] < 0.01
    assert plan_memory(llama7b_skeleton, every, 8 * GIB, 16, 256, torch.float16, params="bias,norm").mode == "nf4"
    with pytest.raises(ZoliteError, match="nothing fits in 8.00 GiB: the smallest plan \\(fp16"):
        plan_memory(llama7b_skeleton, every, 8 * GIB, 16, 256, torch.float16)   # (offload keeps tuned layers whole)
    # offload keeps layer 1 whole on the GPU either way, but the master copy and its state cover only its v_proj
    whole, v = (estimate(llama7b_skeleton, [1], "offload", 16, 256, torch.float16, optimizer="adam", params=p)
                for p in (None, "v_proj"))
    assert whole["weights"] == v["weights"]
    v_proj = 4096 * 4096   # of the layer's 202.4M
    assert (v["master_copy"], v["optimizer_state"]) == (round(2 * v_proj / GIB, 3), round(8 * v_proj / GIB, 3))
    assert whole["optimizer_state"] > 12 * v["optimizer_state"]


def test_nf4_biases_take_the_doubled_forward(qwen2_64, monkeypatch):
    """Biases of NF4 Linears and norms, over every layer: one forward of the doubled batch gives the per-half path's
    l+ and l-, and each 4-bit matmul runs once on it (a 4-bit Linear whose bias alone is tuned runs without it, and
    each half adds its own), where the per-half path runs the tuned ones twice."""
    bnb = pytest.importorskip("bitsandbytes")
    from test_step_fast import _batch, assert_fused_equals_per_half

    loaded = load_model(qwen2_64, device="cpu", mode="nf4", keep_layers=[0, 1, 2], keep_params="bias,norm")
    tuned = TunedLayers(loaded.model, [0, 1, 2], params="bias,norm")
    assert {type(m).__name__ for m, _ in tuned.owner} == {"Linear4bit", "Qwen2RMSNorm"}
    batch = _batch(loaded, "boolq")
    assert_fused_equals_per_half(loaded.model, tuned, batch)

    matmuls = []
    matmul_4bit = bnb.matmul_4bit
    monkeypatch.setattr(bnb, "matmul_4bit", lambda x, *a, **k: matmuls.append(len(x)) or matmul_4bit(x, *a, **k))
    spsa_losses(loaded.model, tuned, batch, seed=3, eps=1e-2, objective="ce")
    four_bit = sum(type(m).__name__ == "Linear4bit" for m in loaded.model.modules())
    assert matmuls == [2 * len(batch.input_ids)] * four_bit


def test_backprop_through_cpu_nf4_biases_is_refused_up_front(qwen2_64, small_data, tmp_path):
    """bitsandbytes' CPU 4-bit matmul adds biases in place once it has scored val, which autograd refuses: one line,
    before the model loads, instead of a traceback at the first step."""
    pytest.importorskip("bitsandbytes")
    assert_user_error(run_cli("tune", "--model", qwen2_64, "--task", "sst2", "--layers", "all", "--params", "bias,norm",
                              "--mode", "nf4", "--estimator", "fo", "--device", "cpu", "--data", small_data,
                              "--run-dir", tmp_path / "r", *QUICK), "bitsandbytes' CPU kernel", "--mode fp16")
    assert not (tmp_path / "r" / "checkpoint.safetensors").exists()


def test_gpt2_conv1d_is_quantized_and_kept_like_a_linear(tmp_path):
    """GPT-2's decoder holds Conv1D (a transposed Linear), which bitsandbytes quantizes as it does a Linear: the tuned
    layer's stay unquantized, and the planner counts the others as quantized weights."""
    pytest.importorskip("bitsandbytes")
    from transformers import GPT2Config, GPT2LMHeadModel

    from zolite.loading import linear_names, quantizes_nothing
    from zolite.plan import _sizes

    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=64, n_layer=2, n_head=2, n_positions=32)).save_pretrained(
        tmp_path / "g")
    skeleton = model_skeleton(str(tmp_path / "g"))
    assert linear_names(skeleton, [1]) == [f"transformer.h.1.{n}" for n in
                                           ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert quantizes_nothing(skeleton, [0, 1]) and not quantizes_nothing(skeleton, [1])
    assert _sizes(skeleton, [1])["linear_frozen"] == 12 * 64 * 64   # layer 0's four weight matrices
    loaded = load_model(str(tmp_path / "g"), device="cpu", mode="nf4", keep_layers=[1])
    kinds = {n: type(m).__name__ for n, m in loaded.model.transformer.h.named_modules() if ".c_" in n}
    assert kinds == {**{f"0.{n}": "Linear4bit" for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")},
                     **{f"1.{n}": "Conv1D" for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}}
