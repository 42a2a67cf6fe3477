"""MeZO's zeroth-order step on a few decoder layers (Malladi et al. 2023, Algorithm 1).

- z for tensor i is regenerated from (step seed, i) on the tensor's device: never stored.
- Weights are never perturbed in place: each tuned module sees W + sign*eps*z, computed from the master
  copy just before its forward and dropped right after, so restoring is exact and memory grows by one
  module's tensor at a time.
- The layers before the first tuned layer run once; from there the batch is doubled, the first half
  seeing +eps and the second -eps, so l+ and l- come from one forward. Layers whose tensors are all small (the
  launch-bound case: SmolLM2, Qwen-1.5B) run once on the doubled batch: each tuned module draws its z once and
  applies W + eps z to the first half and W - eps z to the second (a Linear as one batched matmul). Larger layers
  (a 7B's) run twice, once per half, each module building one perturbed weight at a time (the least memory).
  Many half-precision vectors (every bias and norm) are perturbed and updated together, as one concatenation.
- Many tiny steps are not lost to fp16/bf16 rounding: an fp32 layer is its own master; a half-precision layer keeps
  beside it a residual of the same dtype holding what rounding dropped (Kahan-style compensation), for half the
  memory of an fp32 master copy (0.38 instead of 0.75 GiB for a 7B layer). fp16 weight + residual carry about 22
  significant bits (fp32 has 24); bf16 + residual about 16: far better than bf16 alone, short of fp32.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager

import torch

from .errors import ZoliteError
from .layers import decoder_layers, parse_params

_MIX = 0x9E3779B97F4A7C15
EPS_SCALES = ("absolute", "relative", "activation", "sparse")
# --eps-scale sparse (Sparse MeZO, Liu et al. 2024): z only on this fraction of each tensor's weights, those smallest
# in magnitude in the base (the paper finds a ZO estimate's error hurts large weights more than small ones)
SPARSE_FRACTION = 0.25


def tensor_seed(step_seed: int, index: int) -> int:
    return (step_seed * _MIX + index * 0xBF58476D1CE4E5B9 + 1) % (1 << 63)


_generators = threading.local()


def _generator(device: torch.device) -> torch.Generator:
    """This thread's generator on `device`, made once: manual_seed resets its whole state (CPU: the mt19937 state and
    the cached normal sample; CUDA: Philox seed and offset), so reseeding it draws what a new generator would."""
    gens = _generators.__dict__.setdefault("by_device", {})
    key = (device.type, device.index)
    if key not in gens:
        gens[key] = torch.Generator(device=device)
    return gens[key]


def sample_z(step_seed: int, index: int, like: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """z of tensor `index` at step seed `step_seed`: fp32, like's shape and device (drawn into `out` if given)."""
    gen = _generator(like.device).manual_seed(tensor_seed(step_seed, index))
    if out is not None:
        return torch.randn(like.shape, generator=gen, out=out)
    return torch.randn(like.shape, generator=gen, device=like.device, dtype=torch.float32)


def step_seed(run_seed: int, step: int) -> int:
    """The seed of step `step`: a pure function of the run seed, so resuming needs no RNG state."""
    return tensor_seed(run_seed + 1, step) % (1 << 62)


# A residual is below half an ulp of its weight; scaled up by 2^12 it stays a normal (not subnormal) fp16 number for
# weights from ~1e-4 to ~1e4, so it keeps 11 significant bits.
RESIDUAL_SCALE = 4096.0
UPDATE_CHUNK = 1 << 22   # elements of a half-precision tensor updated at a time (16 MiB of fp32)
# A layer whose tensors are all below this many elements runs once on the doubled batch (module by module: z drawn
# once, W + eps z and W - eps z side by side); a larger one (a 7B's 4096 x 4096 and up) runs once per half, one
# perturbed weight alive at a time, as the memory plans assume.
FUSED_MAX_NUMEL = 1 << 24


def selected_tensors(model: torch.nn.Module, indices: list[int], params: str | None = None) -> list[tuple]:
    """(full name, parameter, owning module, attribute) of the layers' tensors that --params selects, in the layers'
    order (the order z is drawn in). A part that names no tensor is an error listing the names (checked on the
    model's skeleton before any weight is loaded, and again here)."""
    prefix, layers = decoder_layers(model)
    wanted = parse_params(params)
    chosen, seen = [], []
    for i in indices:
        for mod_name, module in layers[i].named_modules():
            for attr, p in module.named_parameters(recurse=False):
                local = ".".join(filter(None, (mod_name, attr)))
                seen.append(local)
                if not wanted or any(w in local for w in wanted):
                    chosen.append((".".join(filter(None, (prefix, str(i), local))), p, module, attr))
    for w in wanted:
        if not any(w in local for local in seen):
            raise ZoliteError(f"--params: '{w}' is in no tensor name of the tuned layers; they are: "
                              f"{', '.join(dict.fromkeys(seen))}")
    return chosen


class TunedLayers:
    """The tuned decoder layers: their parameters by full name, and a compensation residual for half-precision ones."""

    def __init__(self, model: torch.nn.Module, indices: list[int], eps_scale: str = "absolute",
                 params: str | None = None):
        """params: comma-separated parts of tensor names (e.g. "v_proj,down_proj"): only the layers' tensors whose
        name contains one are perturbed and updated (fewer weights, less ZO noise per step); None = all.
        eps_scale: 'absolute' (z ~ N(0, 1) per weight, times eps), 'relative' (tensor i is perturbed by
        eps * s_i * z with s_i = the RMS of its weights when this object is made, i.e. of the base; the update
        follows the same s_i * z, a diagonal preconditioning), 'activation' (a matrix's column j, or a norm's weight j,
        is perturbed by eps * s_j * z, s_j from the energy of the input channel j it weighs: zolite.precondition;
        set by set_scales) or
        'sparse' (z is zero but on each tensor's SPARSE_FRACTION smallest-magnitude base weights: Sparse MeZO).
        Scales derived from the base (relative, sparse) are made here, from the weights as loaded."""
        if eps_scale not in EPS_SCALES:
            raise ZoliteError(f"unknown eps scale '{eps_scale}'; choose one of {', '.join(EPS_SCALES)}")
        self.indices = list(indices)
        layers = decoder_layers(model)[1]
        self.layers = [layers[i] for i in self.indices]
        self.names, self.params, self.owner = [], [], []   # owner: (module, attribute) holding the tensor
        for name, p, module, attr in selected_tensors(model, self.indices, params):
            self.names.append(name)
            self.params.append(p)
            self.owner.append((module, attr))
        self.residuals = [None if p.dtype == torch.float32 else torch.zeros_like(p) for p in self.params]
        self.eps_scale = eps_scale
        self.scales: list = [1.0] * len(self.params)   # a float per tensor, or a tensor broadcast over it
        self.z_buffers: list | None = None   # CUDA graphs (zolite.graphs): this step's z, drawn before a replay
        self.z_buffers_seed: int | None = None
        self.z_buffer_scales: list = []      # the scalar scale left to apply to each buffer (z() gives it)
        # one forward of the doubled batch through the tuned layers (see perturbed): small tensors, and modules whose
        # input rows are the batch's (Linear, norms)
        self.fused = (max((p.numel() for p in self.params), default=0) < FUSED_MAX_NUMEL
                      and all(_row_wise(module) for module, _ in self.owner))
        # Many half-precision vectors (every bias and norm of a model, say) are perturbed and updated as one
        # concatenation: the same elementwise arithmetic, so the same bits, in a few kernel launches where each
        # vector took a few (the step is bound by launching them: docs/evidence.md, eleventh part). Vectors only:
        # their pairs are used as they come (no batched matmul over them), and they take no weight decay
        self.together = (self.fused and len(self.params) > 1 and self.numel() <= UPDATE_CHUNK
                         and all(p.dim() == 1 and r is not None for p, r in zip(self.params, self.residuals))
                         and len({(p.dtype, p.device) for p in self.params}) == 1)
        self.z_flat: torch.Tensor | None = None   # with `together`: the z buffers are views of it
        if eps_scale == "relative":
            rms = [p.detach().float().pow(2).mean().sqrt().item() for p in self.params]
            self.scales = [r if r > 0 else 1.0 for r in rms]
        elif eps_scale == "sparse":
            self.scales = [small_weights(p) for p in self.params]

    def set_scales(self, scales: dict[str, torch.Tensor]) -> None:
        """Per-tensor scale tensors by full name (fp32, broadcastable to the tensor); the others stay 1."""
        for i, (name, p) in enumerate(zip(self.names, self.params)):
            if name in scales:
                self.scales[i] = scales[name].to(p.device, torch.float32)
        self.z_buffers_seed = None   # buffered z were drawn with the old scales

    def scale_tensors(self) -> dict[str, torch.Tensor]:
        """The measured scale tensors by full name (activation: for checkpoints and trajectories); sparse masks are
        derived from the base again, like relative scales."""
        if self.eps_scale != "activation":
            return {}
        return {n: s for n, s in zip(self.names, self.scales) if isinstance(s, torch.Tensor)}

    def z(self, seed: int, i: int, out: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
        """(z of tensor i, times its scale tensor if it has one; the scalar scale left to apply); drawn into `out`
        if given."""
        z, scale = sample_z(seed, i, self.params[i], out=out), self.scales[i]
        if isinstance(scale, torch.Tensor):
            return z.mul_(scale), 1.0
        return z, scale

    def use_z_buffers(self) -> None:
        """Keep one fp32 buffer per tensor for z (zolite.graphs: perturbed(None, eps) reads them; fill_z draws);
        with `together`, views of one."""
        with torch.inference_mode(False):   # made under a forward's inference mode, refilled by updates outside it
            if self.together and self.z_flat is None:
                self.z_flat = torch.empty(self.numel(), dtype=torch.float32, device=self.params[0].device)
                self.z_buffers, self.z_buffers_seed = self._split(self.z_flat), None
            elif self.z_buffers is None:
                self.z_buffers = [torch.empty(p.shape, dtype=torch.float32, device=p.device) for p in self.params]

    @torch.no_grad()
    def fill_z(self, seed: int) -> None:
        """Draw step `seed`'s z (times any scale tensor) into the buffers."""
        self.z_buffer_scales = [self.z(seed, i, out=buffer)[1] for i, buffer in enumerate(self.z_buffers)]
        self.z_buffers_seed = seed

    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    def _split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of a concatenation of the vectors (`together`: all 1-D) along its last dimension, one per vector."""
        return list(flat.split([p.numel() for p in self.params], dim=-1))

    def _common_scale(self) -> float | None:
        """With `together`: the scalar scale every tensor's z takes (z() applies scale tensors itself); None when
        they differ (relative scales), and the tensors are then perturbed and updated one by one."""
        scalars = {1.0 if isinstance(s, torch.Tensor) else s for s in self.scales}
        return scalars.pop() if self.together and len(scalars) == 1 else None

    def _buffered(self, seed: int) -> None:
        """Step `seed`'s z in the buffers, drawn unless they hold it already."""
        self.use_z_buffers()
        if self.z_buffers_seed != seed:
            self.fill_z(seed)

    def _concatenated(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(the weights, the residuals), each as one flat tensor of the weights' dtype."""
        return (torch.cat([p.detach().reshape(-1) for p in self.params]),
                torch.cat([r.reshape(-1) for r in self.residuals]))

    def master(self, i: int) -> torch.Tensor:
        """Tensor i's fp32 value: the weight itself (fp32), or weight + residual (a new tensor)."""
        p, r = self.params[i].detach(), self.residuals[i]
        return p if r is None else p.float().add_(r, alpha=1 / RESIDUAL_SCALE)

    @property
    def masters(self) -> list[torch.Tensor]:
        return [self.master(i) for i in range(len(self.params))]

    def state(self) -> dict[str, torch.Tensor]:
        """fp32 values by full name (for patches and the best-so-far copy)."""
        return {name: self.master(i) for i, name in enumerate(self.names)}

    def weights(self) -> dict[str, torch.Tensor]:
        """The parameters as stored, by full name: what a base fingerprint is taken over (state()'s fp32 copies
        of a half-precision layer read -0.0 as +0.0, since x + 0.0 = +0.0, so they would not match the base)."""
        return {name: p.detach() for name, p in zip(self.names, self.params)}

    def exact_state(self) -> dict[str, torch.Tensor]:
        """Weights and residuals as stored, so a resumed run continues bit for bit."""
        out = self.weights()
        out.update({f"{n}#residual": r for n, r in zip(self.names, self.residuals) if r is not None})
        return out

    @torch.no_grad()
    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set the layers from `state()` (fp32 values) or `exact_state()` (weights + residuals)."""
        for name, p, r in zip(self.names, self.params, self.residuals):
            value = tensors[name].to(p.device)
            if r is None:
                p.copy_(value)
            elif f"{name}#residual" in tensors:
                p.copy_(value)
                r.copy_(tensors[f"{name}#residual"])
            else:
                self._set(p, r, value.to(torch.float32, copy=True))   # _set consumes its value

    @torch.no_grad()
    def set_value(self, i: int, value: torch.Tensor) -> None:
        """Tensor i <- value (fp32; consumed). For an fp32 layer `master(i)` is the weight itself, edited in place."""
        p, r = self.params[i], self.residuals[i]
        if r is not None:
            self._set(p, r, value)
        elif value.data_ptr() != p.data_ptr():
            p.copy_(value)

    @staticmethod
    def _set(p: torch.Tensor, r: torch.Tensor, value: torch.Tensor) -> None:
        """p <- value rounded to p's dtype; r <- what the rounding dropped (value is consumed)."""
        p.copy_(value)
        r.copy_(value.sub_(p).mul_(RESIDUAL_SCALE))

    @torch.no_grad()
    def sgd_update(self, seed: int, projected_grad: float, lr: float, weight_decay: float = 0.0) -> None:
        """MeZO's update: W <- W - lr * (g * z + wd * W), no decay on vectors (norms, biases).

        Beside z, a half-precision tensor needs its fp32 value; it is built UPDATE_CHUNK elements at a time (the
        arithmetic is elementwise, so the result is the same bits), and each z is freed before the next is drawn:
        one fp32 tensor plus a chunk alive at a time, where a whole fp32 value and two z's were before."""
        scale = self._common_scale()
        if scale is not None:   # vectors: no decay
            self._buffered(seed)
            self._update_together(-lr * projected_grad * scale)
            return
        # z drawn into the buffers for this step's graphed forward is read from there (not written), not drawn again
        buffered = self.z_buffers is not None and self.z_buffers_seed == seed
        for i, (p, r) in enumerate(zip(self.params, self.residuals)):
            z, scale = (self.z_buffers[i], self.z_buffer_scales[i]) if buffered else self.z(seed, i)
            decay = 1 - lr * weight_decay if weight_decay and p.dim() >= 2 else None
            step = -lr * projected_grad * scale
            if r is None:   # fp32: the weight is its own master, edited in place
                if decay is not None:
                    p.mul_(decay)
                p.add_(z, alpha=step)
            else:
                self._update_half(p, r, z, decay, step)
            del z

    def _update_together(self, step: float) -> None:
        """_update_half's arithmetic on the concatenation of every vector, weight and residual (no decay), with z from
        the flat buffer; written back with one copy per list."""
        weights, residuals = self._concatenated()
        value = weights.float().add_(residuals, alpha=1 / RESIDUAL_SCALE).add_(self.z_flat, alpha=step)
        rounded = value.to(weights.dtype)   # the rounding p.copy_(value) does
        torch._foreach_copy_([p.detach() for p in self.params], self._split(rounded))
        torch._foreach_copy_(self.residuals, self._split(value.sub_(rounded).mul_(RESIDUAL_SCALE).to(weights.dtype)))

    def _update_half(self, p: torch.Tensor, r: torch.Tensor, z: torch.Tensor, decay: float | None, step: float):
        """p + r/RESIDUAL_SCALE (fp32) <- that * decay + step * z, rounded back into p and r, chunk by chunk."""
        for weights, residuals, zs in _chunks(p, r, z):
            value = weights.float().add_(residuals, alpha=1 / RESIDUAL_SCALE)
            if decay is not None:
                value.mul_(decay)
            value.add_(zs, alpha=step)
            self._set(weights, residuals, value)

    def _by_module(self) -> dict[int, tuple]:
        """id(module) -> (module, [(tensor index, attribute name), ...]): the tuned tensors each module owns."""
        by_module: dict[int, tuple] = {}
        for i, (module, attr) in enumerate(self.owner):
            by_module.setdefault(id(module), (module, []))[1].append((i, attr))
        return by_module

    @contextmanager
    def _swapped(self, seed: int, eps: float, state: dict):
        """Hooks giving each tuned module W + state['sign'] * eps * z for the length of its forward."""
        handles = []
        by_module = self._by_module()

        def swap_in(module, _args, _entries):
            for i, attr in _entries:   # W + sign * eps * z, built in z's buffer: one fp32 temporary per tensor
                p, r = self.params[i], self.residuals[i]
                z, scale = self.z(seed, i)
                w = z.mul_(state["sign"] * eps * scale).add_(p)
                if r is not None:
                    w.add_(r, alpha=1 / RESIDUAL_SCALE)
                module._parameters[attr] = w.to(p.dtype)

        def swap_out(module, _args, _out, _entries):
            for i, attr in _entries:
                module._parameters[attr] = self.params[i]

        for module, entries in by_module.values():
            handles.append(module.register_forward_pre_hook(lambda m, a, e=entries: swap_in(m, a, e)))
            handles.append(module.register_forward_hook(lambda m, a, o, e=entries: swap_out(m, a, o, e)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for (module, attr), p in zip(self.owner, self.params):
                module._parameters[attr] = p

    @contextmanager
    def perturbed(self, seed: int | None, eps: float):
        """Within this block a forward of batch B returns 2B rows: [W + eps z | W - eps z]. seed None: z from the
        buffers (fused path only)."""
        if not self.fused:
            if seed is None:
                raise ValueError("z buffers are for the fused path only")
            with self._perturbed_per_half(seed, eps):
                yield
            return
        scale = self._common_scale()
        pairs = self._pairs_together(seed, eps, scale) if scale is not None else None   # before any wrapping
        state = {"doubled": False, "rows": None}
        saved_forwards = []
        for layer in self.layers:
            saved_forwards.append((layer, layer.__dict__.get("forward")))
            layer.forward = _doubled_forward(layer.forward, state)
        by_module = self._by_module()
        for module, entries in by_module.values():
            saved_forwards.append((module, module.__dict__.get("forward")))
            module.forward = self._pair_forward(module, entries, seed, eps, state, pairs)
        try:
            yield
        finally:
            _restore_forwards(saved_forwards)
            for (module, attr), p in zip(self.owner, self.params):
                module._parameters[attr] = p

    def _pairs_together(self, seed: int | None, eps: float, scale: float) -> list[torch.Tensor]:
        """[W_i + eps z_i, W_i - eps z_i] of every vector i ([2, n_i], W's dtype), as _offset and _perturbed_weight
        compute them, on the concatenation of all: views of one [2, numel] tensor. z is drawn into the buffers (seed
        None: they hold it), where the update reads it again. scale: _common_scale()."""
        if seed is not None:
            self._buffered(seed)
        weights, residuals = self._concatenated()
        offset = self.z_flat.mul(eps * scale)
        plus = torch.add(offset, weights).add_(residuals, alpha=1 / RESIDUAL_SCALE)
        minus = torch.sub(weights, offset).add_(residuals, alpha=1 / RESIDUAL_SCALE)
        return self._split(torch.stack([plus, minus]).to(weights.dtype))

    def _offset(self, seed: int | None, i: int, eps: float) -> torch.Tensor:
        """eps * z_i (times tensor i's scale), fp32, in z's buffer: W +- this is tensor i perturbed. seed None: z
        from the buffers fill_z drew (a new tensor, the same bits)."""
        if seed is None:
            return self.z_buffers[i].mul(eps * self.z_buffer_scales[i])
        z, scale = self.z(seed, i)
        return z.mul_(eps * scale)

    def _perturbed_weight(self, i: int, offset: torch.Tensor, sign: int, out: torch.Tensor | None = None
                          ) -> torch.Tensor:
        """W_i + sign * offset in W_i's dtype, into `out` (a new tensor if None): for each element
        (offset + W) or (W - offset), plus residual / RESIDUAL_SCALE, in fp32, rounded once to the dtype: the bits
        the per-half path computes as (sign * offset + W) + residual (W - offset = -offset + W exactly)."""
        p, r = self.params[i].detach(), self.residuals[i]
        if out is None:
            out = torch.empty(p.shape, dtype=p.dtype, device=p.device)   # contiguous: _chunks writes through views
        if r is None:   # fp32
            return torch.add(offset, p, out=out) if sign > 0 else torch.sub(p, offset, out=out)
        for w, res, off, o in _chunks(p, r, offset, out):   # one fp32 chunk alive at a time
            value = torch.add(off, w) if sign > 0 else torch.sub(w, off)
            o.copy_(value.add_(res, alpha=1 / RESIDUAL_SCALE))
        return out

    def _pair(self, i: int, offsets: dict, pairs: list | None) -> torch.Tensor:
        """[W_i + eps z_i, W_i - eps z_i] in W_i's dtype: from the pairs built together, or built here."""
        if pairs is not None:
            return pairs[i]
        p = self.params[i]
        pair = torch.empty((2, *p.shape), dtype=p.dtype, device=p.device)
        for k, sign in enumerate((1, -1)):
            self._perturbed_weight(i, offsets[i], sign, out=pair[k])
        return pair

    def _pair_forward(self, module, entries, seed: int, eps: float, state: dict, pairs: list | None = None):
        """module's forward on the doubled batch: rows [0, B) see W + eps z, rows [B, 2B) W - eps z, z drawn once.
        A Linear runs as one batched matmul over the two weights; a 4-bit Linear whose bias alone is tuned runs once
        without its bias, and each half adds its own (its weight is the base's for both); another module (a norm,
        an int8 Linear) runs once per half."""
        forward = module.forward
        linear = type(module) is torch.nn.Linear
        # (not bitsandbytes' int8 Linear: LLM.int8 picks its outlier columns from all rows it is given, so on 2B rows
        # each half's output would depend on the other's)
        bias_only = type(module).__name__ == "Linear4bit" and [attr for _, attr in entries] == ["bias"]

        def run(x, *args, **kwargs):
            if x.dim() < 3 or x.shape[0] != state["rows"]:   # [rows, tokens, ...]: not, e.g., routed tokens
                raise ZoliteError(f"{type(module).__name__} of a tuned layer got an input of shape {tuple(x.shape)}, "
                                  f"not [{state['rows']}, tokens, ...] (the doubled batch): this architecture needs "
                                  "TunedLayers.fused = False")
            offsets = {} if pairs is not None else {i: self._offset(seed, i, eps) for i, _ in entries}
            pair = {attr: self._pair(i, offsets, pairs) for i, attr in entries}   # [W + eps z, W - eps z] each
            del offsets
            if bias_only:
                return self._bias_pair_forward(module, forward, entries[0][0], pair["bias"], x, *args, **kwargs)
            if linear:
                for attr in ("weight", "bias"):   # a tensor left out by --params: the base's, for both halves
                    base = getattr(module, attr)
                    if attr not in pair and base is not None:
                        pair[attr] = base.detach().expand(2, *base.shape)
                x2 = x.reshape(2, -1, x.shape[-1])
                weight = pair["weight"].transpose(1, 2)
                out = (torch.baddbmm(pair["bias"].unsqueeze(1), x2, weight) if "bias" in pair
                       else torch.bmm(x2, weight))
                return out.reshape(*x.shape[:-1], out.shape[-1])
            half = x.shape[0] // 2
            outs = []
            for k in range(2):
                for _, attr in entries:
                    module._parameters[attr] = pair[attr][k]
                outs.append(forward(x[k * half:(k + 1) * half], *args, **kwargs))
            for i, attr in entries:
                module._parameters[attr] = self.params[i]
            return torch.cat(outs)
        return run

    def _bias_pair_forward(self, module, forward, i: int, pair: torch.Tensor, x, *args, **kwargs):
        """forward(x) of a Linear without its bias (tensor i), then b + eps z added to rows [0, B) and b - eps z to
        rows [B, 2B): the quantized matmul runs once on 2B rows, where per half it ran (and dequantized) twice. The
        bias is added after the matmul's rounding, not inside it, so the sums may differ in the output dtype's last
        bit."""
        module._parameters["bias"] = None
        try:
            out = forward(x, *args, **kwargs)
        finally:
            module._parameters["bias"] = self.params[i]
        halves = out.reshape(2, -1, out.shape[-1])
        return (halves + pair.unsqueeze(1).to(out.dtype)).reshape(out.shape)

    @contextmanager
    def _perturbed_per_half(self, seed: int, eps: float):
        """perturbed() for large layers: each tuned layer runs twice, on the +eps half then the -eps half."""
        state = {"sign": 0, "doubled": False}
        saved_forwards = []
        for layer in self.layers:
            saved_forwards.append((layer, layer.__dict__.get("forward")))
            layer.forward = _doubling_forward(layer.forward, state)
        try:
            with self._swapped(seed, eps, state):
                yield
        finally:
            _restore_forwards(saved_forwards)

    @contextmanager
    def shifted(self, seed: int, eps: float, sign: int):
        """Within this block every forward (generation included) sees W + sign * eps * z."""
        with self._swapped(seed, eps, {"sign": sign}):
            yield


def small_weights(p: torch.Tensor, fraction: float = SPARSE_FRACTION) -> torch.Tensor:
    """Mask (bool, p's shape and device) of the weights at or below the `fraction` quantile of |p|: at least that
    fraction, more where magnitudes tie at the threshold (a norm still at its initial ones: all of it). kthvalue:
    quantile refuses tensors over 16M elements."""
    magnitude = p.detach().abs().float()
    k = max(1, round(fraction * magnitude.numel()))
    return magnitude <= magnitude.flatten().kthvalue(k).values


def _chunks(*tensors: torch.Tensor):
    """The same UPDATE_CHUNK-element slices of equally sized tensors (elementwise work on them gives the same bits
    as on the whole, and the slices are views, so writes land in the tensors); tensors that fit one chunk, or are not
    all contiguous, are passed whole: no views to make, the step's host work is less."""
    if tensors[0].numel() <= UPDATE_CHUNK or not all(t.is_contiguous() for t in tensors):
        return [tensors]
    flat = [t.view(-1) for t in tensors]
    return [[t[i:i + UPDATE_CHUNK] for t in flat] for i in range(0, tensors[0].numel(), UPDATE_CHUNK)]


def _restore_forwards(saved: list) -> None:
    """Undo wrapped forwards: drop the instance's own, or put back the one it had."""
    for module, forward in saved:
        if forward is None:
            del module.forward
        else:
            module.forward = forward


def _row_wise(module) -> bool:
    """A module whose input's first dimension is the batch's rows, run as is on half of them: a plain Linear, a
    bitsandbytes one (its bias tuned over a quantized weight) or a norm. Not other subclasses: expert linears route
    rows elsewhere."""
    return (type(module) is torch.nn.Linear or type(module).__name__ in ("Linear4bit", "Linear8bitLt")
            or "Norm" in type(module).__name__)


def _doubled_forward(forward, state):
    """The tuned layer on the doubled batch (the first tuned layer doubles it: the layers before it ran on B rows)."""
    def run(hidden, *args, **kwargs):
        if not state["doubled"]:
            hidden = torch.cat([hidden, hidden])
            state["doubled"] = True
        state["rows"] = hidden.shape[0]
        return forward(hidden, *args, **kwargs)
    return run


def _doubling_forward(forward, state):
    def run(hidden, *args, **kwargs):
        if state["doubled"]:
            plus, minus = hidden.chunk(2)
        else:  # first tuned layer: everything before it ran once on B rows
            plus = minus = hidden
            state["doubled"] = True
        state["sign"] = 1
        out_plus = forward(plus, *args, **kwargs)
        state["sign"] = -1
        out_minus = forward(minus, *args, **kwargs)
        state["sign"] = 0
        if isinstance(out_plus, tuple):  # older layers return (hidden, ...)
            return (torch.cat([out_plus[0], out_minus[0]]),) + tuple(out_plus[1:])
        return torch.cat([out_plus, out_minus])
    return run


def spsa_losses(model, tuned: TunedLayers, batch, seed: int, eps: float, objective: str, graphs=None
                ) -> tuple[float, float]:
    """l(W + eps z) and l(W - eps z) on one batch, from one forward of the doubled batch (replayed from a CUDA
    graph where `graphs`, a zolite.graphs.ForwardGraphs, can take it)."""
    from .scoring import answer_hidden, answer_scores, doubled_forward_mask, last_hidden, losses

    with torch.inference_mode():
        answers = graphs.answer_hidden(batch, seed, eps) if graphs is not None and graphs.usable(batch.input_ids) \
            else None
        if answers is None:
            with tuned.perturbed(seed, eps):
                answers = answer_hidden(batch, last_hidden(model, batch.input_ids,
                                                           attention_mask=doubled_forward_mask(model, batch.input_ids)))
        loss = losses(answer_scores(model, batch, answers), batch, objective)
    plus, minus = loss.tolist()
    return plus, minus


def generation_losses(model, tokenizer, tuned: TunedLayers, task, rows: list[dict], seed: int, eps: float,
                      max_length: int) -> tuple[float, float]:
    """Minus the mean F1 of greedy answers under W + eps z and under W - eps z: a non-differentiable objective
    (MeZO, Sec. 3.3), two generations per step instead of one doubled forward."""
    from .generation import generate_answers

    prompts = [task.example(r).prompt for r in rows]
    out = []
    for sign in (1, -1):
        with tuned.shifted(seed, eps, sign):
            answers = generate_answers(model, tokenizer, prompts, max_new_tokens=task.max_answer_tokens,
                                       max_length=max_length, batch_size=len(prompts))
        out.append(-sum(task.answer_scores(a, task.golds(r))[1] for a, r in zip(answers, rows)) / len(rows))
    return out[0], out[1]
