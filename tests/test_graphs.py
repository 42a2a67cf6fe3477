"""CUDA graphs of the step's forward (zolite.graphs), in the pieces a CPU can check: z read from buffers gives the
eager step's bits, padding a batch to its bucket leaves the losses, and the recorded forward is fed and read
through its fixed tensors (a stand-in recorder re-runs the forward where a GPU would replay it, and checks what a graph fixes at capture). Capture itself
runs on the GPU only (bench/step_speed.py, zolite-graphs)."""
from __future__ import annotations

import pytest
import torch

import zolite
import zolite.graphs as graphs
from zolite.data import bundled_file, iter_rows
from zolite.evaluate import encode_rows
from zolite.graphs import ForwardGraphs, Recorded
from zolite.optim import Stepper
from zolite.scoring import collate, last_hidden, pad_token_id
from zolite.tasks import get_task
from zolite.zo import TunedLayers, spsa_losses


def _batch(loaded, task="sst2", n=6, start=0):
    rows = [r for r, _ in zip(iter_rows(bundled_file(task)), range(start + n))][start:]
    return collate(encode_rows(loaded.tokenizer, get_task(task), rows, 512), pad_token_id(loaded.tokenizer))


class RerunRecorder:
    """A GPU's record() as the CPU can have it: replay runs the forward again on the same fixed input tensors and
    writes into the same output tensor. A graph reads memory by address, fixed at capture: so each replay also
    checks that the z buffers, weights and residuals are the tensors they were at capture (written in place, never
    replaced) and that the scalar scales, baked into the kernels, did not change."""

    def __init__(self, tuned: TunedLayers):
        self.tuned = tuned

    def addresses(self) -> list:
        t = self.tuned
        return ([b.data_ptr() for b in t.z_buffers] + [p.data_ptr() for p in t.params]
                + [r.data_ptr() for r in t.residuals if r is not None] + list(t.z_buffer_scales))

    def __call__(self, forward, inputs, pool):
        answers, at_capture = forward(*inputs), self.addresses()

        def replay():
            assert self.addresses() == at_capture
            answers.copy_(forward(*inputs))
        return Recorded(replay, inputs, answers), pool


@pytest.mark.parametrize("model,dtype,params", [("tiny_model", "float32", None), ("tiny_model", "float16", None),
                                                 ("tiny_qwen2", "float16", "bias,norm")])
def test_z_buffers_give_the_eager_bits(model, dtype, params, request):
    """perturbed(None, eps) after fill_z(seed) is perturbed(seed, eps), bit for bit (fp32, fp16 with residuals, and
    fp16 vectors stepped together)."""
    loaded = zolite.load_model(request.getfixturevalue(model), dtype=dtype)
    tuned = TunedLayers(loaded.model, [1, 2], params=params)
    assert tuned.together == (params is not None)
    tuned.sgd_update(3, 0.7, 1e-3)   # residuals that are not zero
    batch = _batch(loaded)
    with torch.inference_mode(), tuned.perturbed(5, 1e-2):
        eager = last_hidden(loaded.model, batch.input_ids)
    tuned.use_z_buffers()
    tuned.fill_z(5)
    with torch.inference_mode(), tuned.perturbed(None, 1e-2):
        buffered = last_hidden(loaded.model, batch.input_ids)
    assert torch.equal(eager, buffered)
    with torch.inference_mode(), tuned.perturbed(None, 1e-2):   # the buffers are read, not consumed
        assert torch.equal(last_hidden(loaded.model, batch.input_ids), eager)


@pytest.mark.parametrize("model", ["tiny_model", "tiny_qwen2"])
def test_padding_to_the_bucket_keeps_the_losses(model, request):
    """Right-padding to a multiple of BUCKET tokens, with the graphs' causal mask of batch 1 (B rows before the
    tuned layer, 2B after): the same l+ and l- (a token never sees the padding after it; only the matmuls' shapes
    and the mask's form change, so to float rounding). Llama's and Qwen2's (mask mapping) attention alike."""
    loaded = zolite.load_model(request.getfixturevalue(model))
    tuned = TunedLayers(loaded.model, [1])
    batch = _batch(loaded)
    assert batch.input_ids.shape[1] % graphs.BUCKET   # the test pads for real
    eager = spsa_losses(loaded.model, tuned, batch, 7, 1e-2, "ce")
    padded = spsa_losses(loaded.model, tuned, batch, 7, 1e-2, "ce",
                         graphs=ForwardGraphs(loaded.model, tuned, recorder=RerunRecorder(tuned)))
    assert padded == pytest.approx(eager, rel=1e-6, abs=1e-7)


def test_replays_feed_each_batch_and_seed(tiny_model):
    """Several steps through the graphs (two shapes, new seeds, weights updated between steps) give the eager
    step's losses, with one recording per shape."""
    loaded = zolite.load_model(tiny_model)
    net = loaded.model

    def run(use_graphs):
        tuned = TunedLayers(net, [1, 2])
        start = {k: v.clone() for k, v in tuned.state().items()}
        stepper = Stepper(net, tuned, eps=1e-2, lr=1e-3, collate_to_device=lambda c: collate(
            c, pad_token_id(loaded.tokenizer)))
        if use_graphs:
            stepper.graphs = ForwardGraphs(net, tuned, recorder=RerunRecorder(tuned))
        out = [stepper.step(step, chunk) for step, chunk in enumerate(chunks)]
        tuned.load(start)
        return out, stepper.graphs

    rows = [r for r, _ in zip(iter_rows(bundled_file("sst2")), range(40))]
    encoded = encode_rows(loaded.tokenizer, get_task("sst2"), rows, 512)
    chunks = [encoded[4 * step:4 * step + (4 if step % 2 else 6)] for step in range(6)]
    chunks.append(chunks[1])   # a shape seen before, at another step's seed: replayed, not recorded again
    eager, _ = run(False)
    graphed, forward_graphs = run(True)
    assert graphed == pytest.approx(eager, rel=1e-6)
    assert eager[0] != eager[2]   # the steps' losses differ: each replay saw its own batch and z
    batches = [collate(c, 0) for c in chunks]
    assert set(forward_graphs.recorded) == {(*b.input_ids.shape[:1], -(-b.input_ids.shape[1] // graphs.BUCKET)
                                             * graphs.BUCKET, b.rows.numel(), 1e-2) for b in batches}
    assert len(forward_graphs.recorded) < len(chunks)   # shapes recur: recorded once, replayed


def test_cpu_batches_and_failed_capture_run_eagerly(tiny_model, capsys):
    """The real recorder takes CUDA tensors only; a capture that fails turns the graphs off with one line, and the
    step goes on eagerly with the same losses."""
    loaded = zolite.load_model(tiny_model)
    tuned = TunedLayers(loaded.model, [1])
    batch = _batch(loaded)
    assert not ForwardGraphs(loaded.model, tuned).usable(batch.input_ids)   # a CPU batch

    def failing(forward, inputs, pool):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")
    broken = ForwardGraphs(loaded.model, tuned, recorder=failing)
    eager = spsa_losses(loaded.model, tuned, batch, 2, 1e-2, "ce")
    assert spsa_losses(loaded.model, tuned, batch, 2, 1e-2, "ce", graphs=broken) == eager
    assert broken.failed and not broken.usable(batch.input_ids)
    err = capsys.readouterr().err
    assert "CUDA graphs are off for this run" in err and "stream is capturing" in err and "more" not in err


def test_tune_option_turns_graphs_on(tiny_model, tmp_path, monkeypatch):
    """--cuda-graphs builds the run's ForwardGraphs; on the CPU they run eagerly, so the patch is the eager run's."""
    made = []
    original = graphs.ForwardGraphs.__init__

    def spy(self, *args, **kwargs):
        made.append(self)
        original(self, *args, **kwargs)
    monkeypatch.setattr(graphs.ForwardGraphs, "__init__", spy)
    common = dict(steps=3, eval_every=0, lr=1e-3, batch_size=4, layer="1", force=True, progress=False)
    plain = zolite.tune(str(tiny_model), "sst2", run_dir=tmp_path / "a", **common)
    graphed = zolite.tune(str(tiny_model), "sst2", run_dir=tmp_path / "b", cuda_graphs=True, **common)
    assert len(made) == 1 and made[0].tuned.z_buffers is None   # not on the CPU: no buffers to pay for
    assert plain["timing"]["cuda_graphs"] is None and graphed["timing"]["cuda_graphs"]["recorded_shapes"] == 0
    from safetensors.torch import load_file
    a, b = load_file(plain["patch"]), load_file(graphed["patch"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_update_from_buffered_z_has_the_drawn_bits(tiny_model, dtype):
    """The update reads the step's z from the buffers the graphed forward drew (one draw less per tensor) and gives
    the weights and residuals that drawing z again gives; another seed's buffers are not used."""
    loaded = zolite.load_model(tiny_model, dtype=dtype)
    tuned = TunedLayers(loaded.model, [1, 2])
    start = tuned.exact_state()
    start = {k: v.clone() for k, v in start.items()}
    tuned.sgd_update(4, 0.9, 1e-2, weight_decay=0.1)
    drawn = {k: v.clone() for k, v in tuned.exact_state().items()}
    tuned.load(start)
    tuned.use_z_buffers()
    tuned.fill_z(3)
    tuned.z_buffers[0].fill_(1e3)   # poison: a buffer of another seed must not be read
    tuned.sgd_update(4, 0.9, 1e-2, weight_decay=0.1)
    assert all(torch.equal(v, drawn[k]) for k, v in tuned.exact_state().items())
    tuned.load(start)
    tuned.fill_z(4)
    tuned.sgd_update(4, 0.9, 1e-2, weight_decay=0.1)
    assert all(torch.equal(v, drawn[k]) for k, v in tuned.exact_state().items())


@pytest.mark.parametrize("eps_scale", ["absolute", "relative", "sparse", "activation"])
def test_z_drawn_into_the_buffers_is_the_drawn_z(tiny_model, eps_scale):
    """fill_z draws each z straight into its buffer (scale tensors applied): the z that drawing anew gives."""
    tuned = TunedLayers(zolite.load_model(tiny_model).model, [1], eps_scale=eps_scale)
    if eps_scale == "activation":
        tuned.set_scales({n: torch.rand(p.shape[-1]) + 0.5 for n, p in zip(tuned.names, tuned.params)
                          if p.dim() == 2})
    tuned.use_z_buffers()
    tuned.fill_z(9)
    for i, buffer in enumerate(tuned.z_buffers):
        z, scale = tuned.z(9, i)
        assert torch.equal(buffer, z) and scale == tuned.z_buffer_scales[i]


def test_a_graphed_run_resumes_bit_for_bit(tiny_model, small_data, tmp_path, monkeypatch):
    """A run with its forwards replayed (the stand-in recorder), cut off after its step-4 checkpoint and resumed,
    ends bit for bit like the uninterrupted one: the resumed run records its graphs again, and replays are
    deterministic."""
    import sys

    from test_tune import Interrupted, _cut_off_after, sha

    made = []

    def graphs_of(net, tuned):
        made.append(ForwardGraphs(net, tuned, recorder=RerunRecorder(tuned)))
        return made[-1]
    monkeypatch.setattr(sys.modules["zolite.tune"], "ForwardGraphs", graphs_of)
    common = dict(data=small_data, layer="1", steps=8, eval_every=2, batch_size=4, lr=1e-2, keep="last",
                  progress=False, cuda_graphs=True)
    full = zolite.tune(tiny_model, "sst2", run_dir=tmp_path / "full", **common)
    assert made[0].recorded   # the steps went through the graphs
    assert full["timing"]["cuda_graphs"] == {"recorded_shapes": len(made[0].recorded), "capture_failed": False}
    with monkeypatch.context() as m:
        _cut_off_after(m, 4)
        with pytest.raises(Interrupted):
            zolite.tune(tiny_model, "sst2", run_dir=tmp_path / "cut", **common)
    resumed = zolite.tune(tiny_model, "sst2", resume=tmp_path / "cut", progress=False)
    assert sha(resumed["patch"]) == sha(full["patch"]) and resumed["loss_curve"] == full["loss_curve"]


def test_each_eps_has_its_own_recording(tiny_model):
    """eps is baked into the recorded kernels: the same shape at two eps gives two recordings, each with the eager
    losses; the lr probe's other eps do not go through the graphs at all."""
    loaded = zolite.load_model(tiny_model)
    tuned = TunedLayers(loaded.model, [1])
    forward_graphs = ForwardGraphs(loaded.model, tuned, recorder=RerunRecorder(tuned))
    batch = _batch(loaded)
    for eps in (1e-2, 1e-3, 1e-2):
        eager = spsa_losses(loaded.model, tuned, batch, 4, eps, "ce")
        assert spsa_losses(loaded.model, tuned, batch, 4, eps, "ce", graphs=forward_graphs) == pytest.approx(
            eager, rel=1e-6)
    assert sorted(k[-1] for k in forward_graphs.recorded) == [1e-3, 1e-2]
    stepper = Stepper(loaded.model, tuned, eps=1e-2, lr=0.0,
                      collate_to_device=lambda c: collate(c, pad_token_id(loaded.tokenizer)))
    stepper.graphs = ForwardGraphs(loaded.model, tuned, recorder=RerunRecorder(tuned))
    rows = [r for r, _ in zip(iter_rows(bundled_file("sst2")), range(4))]
    stepper.pair_losses(encode_rows(loaded.tokenizer, get_task("sst2"), rows, 512), 3, eps=5e-2)
    assert not stepper.graphs.recorded
    stepper.pair_losses(encode_rows(loaded.tokenizer, get_task("sst2"), rows, 512), 3)
    assert [k[-1] for k in stepper.graphs.recorded] == [1e-2]
