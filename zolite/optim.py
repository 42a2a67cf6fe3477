"""Gradient estimators and optimisers for the tuned layers (ZO-Bench's set, and a backprop baseline).

A step is: an estimator gives, for each tuned tensor i, a direction d_i (a gradient estimate), without storing it
for the whole layer at once; an optimiser turns d_i into the change of tensor i.

Estimators:
- `spsa` (MeZO): n seeded z per step; for each, l+ and l- come from one doubled forward and g_k = (l+ - l-) / 2eps;
  d_i = mean_k g_k z_k,i, z regenerated from its seed. 2n forward passes per step (MeZO's count).
- `residual` (one-point residual feedback, Zhang et al. 2022): one forward per step at W + eps z_t;
  g_t = (l(W_t + eps z_t) - l(W_{t-1} + eps z_{t-1})) / eps, reusing the previous step's perturbed loss;
  d_i = g_t z_t,i. The first step only records its loss (no update).
- `fo`: backpropagation through the frozen (possibly quantized) base into the tuned layers; d_i = the gradient.

Optimisers on d: `sgd` (W -= lr d), `momentum` (m = beta m + d; W -= lr m), `adam` (Adam with bias correction;
decoupled weight decay, i.e. AdamW), `sign` (W -= lr sign(d)). Weight decay: W -= lr wd W on matrices only.
Layer-wise adaptive step (`layerwise`, off by default until an ablation shows it helps): each tensor's update u_i
is rescaled by the trust ratio ||W_i|| / ||u_i|| (LAMB, You et al. 2020), so every tensor moves by lr times its own
norm per step whatever the scale of its estimate; lr then means a relative step size.
"""
from __future__ import annotations

import contextlib

import torch

from .errors import ZoliteError, check_at_least
from .zo import TunedLayers, step_seed

ESTIMATORS = ("spsa", "residual", "fo")
OPTIMIZERS = ("sgd", "momentum", "adam", "sign")


def z_seed(run_seed: int, step: int, k: int) -> int:
    """The seed of the k-th z of a step (k = 0 is the step's own seed, so n_z = 1 is plain MeZO). Run seeds 7919
    apart share z (seed s's second z is seed s + 7919's first); kept as is, since it decides every n_z > 1 run."""
    return step_seed(run_seed, step) if k == 0 else step_seed(run_seed + 7919 * k, step)


class Optimizer:
    """Per-tensor optimiser state (fp32, on the tensor's device) and the update rule."""

    def __init__(self, tuned: TunedLayers, name: str = "sgd", lr: float = 1e-3, weight_decay: float = 0.0,
                 momentum: float = 0.9, betas: tuple[float, float] = (0.9, 0.999), layerwise: bool = False):
        if name not in OPTIMIZERS:
            raise ZoliteError(f"unknown optimizer '{name}'; choose one of {', '.join(OPTIMIZERS)}")
        self.tuned, self.name, self.lr, self.wd = tuned, name, lr, weight_decay
        self.momentum, self.betas, self.layerwise = momentum, betas, layerwise
        self.t = 0
        zeros = lambda: [torch.zeros(p.shape, device=p.device) for p in tuned.params]  # noqa: E731
        self.m = zeros() if name in ("momentum", "adam") else None
        self.v = zeros() if name == "adam" else None

    @torch.no_grad()
    def step(self, direction) -> None:
        """direction(i) -> d_i (fp32, may be consumed)."""
        self.t += 1
        b1, b2 = self.betas
        for i, p in enumerate(self.tuned.params):
            d = direction(i)
            if self.name == "sgd":
                u = d
            elif self.name == "sign":
                u = d.sign_()
            elif self.name == "momentum":
                u = self.m[i].mul_(self.momentum).add_(d)
            else:
                self.m[i].mul_(b1).add_(d, alpha=1 - b1)
                self.v[i].mul_(b2).addcmul_(d, d, value=1 - b2)
                u = (self.m[i] / (1 - b1 ** self.t)) / ((self.v[i] / (1 - b2 ** self.t)).sqrt_().add_(1e-8))
            value = self.tuned.master(i)
            scale = self.lr
            if self.layerwise:
                w_norm, u_norm = value.norm().item(), u.norm().item()
                scale *= w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
            if self.wd and p.dim() >= 2:
                value.mul_(1 - self.lr * self.wd)
            value.add_(u, alpha=-scale)
            self.tuned.set_value(i, value)

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {}
        for key, bufs in (("m", self.m), ("v", self.v)):
            if bufs is not None:
                tensors.update({f"{key}/{n}": b for n, b in zip(self.tuned.names, bufs)})
        return tensors, {"t": self.t}

    def load(self, tensors: dict[str, torch.Tensor], scalars: dict) -> None:
        self.t = scalars.get("t", 0)
        for key, bufs in (("m", self.m), ("v", self.v)):
            if bufs is not None:
                for n, b in zip(self.tuned.names, bufs):
                    b.copy_(tensors[f"{key}/{n}"])


def zo_direction(tuned: TunedLayers, seeds: list[int], coefficients: list[float]):
    """d_i = s_i mean_k c_k z_k,i, one tensor at a time (z regenerated from its seed; s_i = the tensor's eps
    scale, 1 unless eps is relative)."""
    def direction(i: int) -> torch.Tensor:
        d, scale = tuned.z(seeds[0], i)
        d.mul_(coefficients[0])
        for seed, c in zip(seeds[1:], coefficients[1:]):
            d.add_(tuned.z(seed, i)[0], alpha=c)
        return d.mul_(scale / len(seeds))
    return direction


def fo_gradients(model, tuned: TunedLayers, loss_fn) -> tuple[float, list[torch.Tensor]]:
    """The loss and d(loss)/d(tuned tensors) by backprop through the frozen base (its weights get no gradient)."""
    for p in tuned.params:
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            loss = loss_fn()
            grads = torch.autograd.grad(loss, tuned.params)
    finally:
        for p in tuned.params:
            p.requires_grad_(False)
    return loss.item(), [g.float() for g in grads]


def weighted_mean(examples, micro_batch, loss_of_chunk, world=None):
    """The batch's loss(es) as the size-weighted mean over micro-batches and ranks: this rank's slice of the batch
    (all of it in one process) in micro-batches, each loss times its rows summed in float64, then one sum over the
    ranks of (sums, rows). With micro-batches of a rank's slice, a one-process run and an N-rank one add the same
    float64 terms: the same bits (sums of a few float32-valued terms are exact in float64, so order does not matter)."""
    mine = world.shard(examples) if world is not None else examples
    size = micro_batch or len(mine)
    total = None
    for start in range(0, len(mine), size):
        chunk = mine[start:start + size]
        value = [v * len(chunk) for v in loss_of_chunk(chunk)]
        total = value if total is None else [a + b for a, b in zip(total, value)]
    if world is not None and world.size > 1:
        *total, rows = world.sum([*total, len(mine)])
        return [t / rows for t in total]
    return [t / len(examples) for t in total]


def micro_batched_losses(model, tuned: TunedLayers, examples, batch_of, seed, eps, objective, micro_batch=None,
                         world=None, graphs=None) -> tuple[float, float]:
    """l+ and l- of the batch as the size-weighted mean over micro-batches (and ranks: `world`; ZO losses are means
    over examples). batch_of: encoded examples -> a Batch on the model's device."""
    from .zo import spsa_losses

    plus, minus = weighted_mean(examples, micro_batch, lambda chunk: spsa_losses(
        model, tuned, batch_of(chunk), seed, eps, objective, graphs), world)
    return plus, minus


class Stepper:
    """One training step of the chosen estimator and optimiser; counts forward passes; its state resumes exactly.

    The losses come from three methods (on the model's scoring here; a test can put a known function in):
    pair_losses (l+ and l- of one z), perturbed_loss (l at W + eps z) and loss_and_grads (backprop)."""

    def __init__(self, model, tuned: TunedLayers, *, estimator: str = "spsa", n_z: int = 1, eps: float = 1e-3,
                 objective: str = "ce", micro_batch: int | None = None, seed: int = 0, phase=None,
                 collate_to_device=None, world=None, **optimizer_options):
        if estimator not in ESTIMATORS:
            raise ZoliteError(f"unknown estimator '{estimator}'; choose one of {', '.join(ESTIMATORS)}")
        check_at_least("--n-z", n_z, 1)
        self.model, self.tuned, self.estimator, self.n_z, self.eps = model, tuned, estimator, n_z, eps
        self.objective, self.micro_batch, self.seed = objective, micro_batch, seed
        self.batch_of = collate_to_device
        self.world = world              # a distributed run's World: each rank takes its slice, the losses are summed
        self.optimizer = Optimizer(tuned, **optimizer_options)
        self.previous_loss = None      # residual feedback: l(W_{t-1} + eps z_{t-1})
        # ZO: each step's (seeds, projected gradients), or None for a step without an update (residual's first):
        # with the base weights they rebuild the weights and optimiser state (seed checkpoints, trajectories)
        self.updates = [] if estimator != "fo" else None
        self.forwards = 0
        # the step's lr multiplier (the guard's backoffs times --lr-schedule's decay, set by the tune loop): ZO steps
        # apply and record lr_factor * g, so a replay applies the same numbers
        self.lr_factor = 1.0
        self.phase = phase or (lambda name: contextlib.nullcontext())   # a MemoryProfiler's phase, to measure
        self.graphs = None   # a zolite.graphs.ForwardGraphs: the ±eps forwards replayed from CUDA graphs

    # --- the losses ---
    def pair_losses(self, examples, seed: int, eps: float | None = None) -> tuple[float, float]:
        """l(W + eps z) and l(W - eps z); eps None: the stepper's."""
        return micro_batched_losses(self.model, self.tuned, examples, self.batch_of, seed,
                                    self.eps if eps is None else eps, self.objective, self.micro_batch, world=self.world,
                                    graphs=self.graphs if eps in (None, self.eps) else None)   # the lr probe's
                                                                                               # other eps: eager

    def _scores_loss(self, batch):
        from .scoring import candidate_scores, last_hidden, losses

        return losses(candidate_scores(self.model, batch, last_hidden(self.model, batch.input_ids)), batch,
                      self.objective)[0]

    def perturbed_loss(self, examples, seed: int) -> float:
        def one(chunk):
            with torch.inference_mode(), self.tuned.shifted(seed, self.eps, +1):
                return [self._scores_loss(self.batch_of(chunk)).item()]
        return weighted_mean(examples, self.micro_batch, one, self.world)[0]

    def loss_and_grads(self, examples) -> tuple[float, list[torch.Tensor]]:
        def one(chunk):
            batch = self.batch_of(chunk)
            loss, grads = fo_gradients(self.model, self.tuned, lambda: self._scores_loss(batch))
            return [loss, *grads]
        loss, *grads = weighted_mean(examples, self.micro_batch, one)
        return loss, grads

    # --- the step ---
    def plain(self) -> bool:
        o = self.optimizer
        return self.estimator == "spsa" and self.n_z == 1 and o.name == "sgd" and not o.layerwise

    def step(self, step: int, examples: list) -> float:
        """Train on `examples` (encoded); returns the step's training loss."""
        if self.estimator == "spsa":
            seeds = [z_seed(self.seed, step, k) for k in range(self.n_z)]
            coefficients, mean_loss = [], 0.0
            for seed in seeds:
                with self.phase("forward ±eps"):
                    plus, minus = self.pair_losses(examples, seed)
                coefficients.append(self.lr_factor * (plus - minus) / (2 * self.eps))
                mean_loss += (plus + minus) / 2 / len(seeds)
            self.forwards += 2 * len(seeds)
            with self.phase("update"):
                self._zo_update(seeds, coefficients)
            return mean_loss
        if self.estimator == "residual":
            seed = z_seed(self.seed, step, 0)
            with self.phase("forward +eps"):
                loss = self.perturbed_loss(examples, seed)
            self.forwards += 1
            if self.previous_loss is None:
                if self.updates is not None:
                    self.updates.append(None)
            else:
                with self.phase("update"):
                    self._zo_update([seed], [self.lr_factor * (loss - self.previous_loss) / self.eps])
            self.previous_loss = loss
            return loss
        with self.phase("forward + backward"):
            loss, grads = self.loss_and_grads(examples)
        self.forwards += 1
        with self.phase("update"):
            self.optimizer.step(lambda i: grads[i])
        return loss

    def _zo_update(self, seeds: list[int], coefficients: list[float], record: bool = True) -> None:
        if self.plain():   # MeZO exactly: the fused in-place update, no direction buffer
            self.tuned.sgd_update(seeds[0], coefficients[0], self.optimizer.lr, self.optimizer.wd)
        else:
            self.optimizer.step(zo_direction(self.tuned, seeds, coefficients))
        if record and self.updates is not None:   # None: resumed from a dense checkpoint, steps before unrecorded
            self.updates.append([list(seeds), list(coefficients)])

    def replay(self, updates: list, after_step=lambda step: None) -> None:
        """Apply recorded updates again, from the base weights and a fresh optimiser: weights and optimiser state
        come out bit for bit as they were, on the device and dtype that drew the z. after_step(n) follows step n."""
        for n, update in enumerate(updates, start=1):
            if update is not None:
                self._zo_update(*update, record=False)
            after_step(n)
        self.updates = list(updates)

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, scalars = self.optimizer.state()
        return tensors, {**scalars, "previous_loss": self.previous_loss, "forwards": self.forwards}

    def load(self, tensors: dict[str, torch.Tensor] | None, scalars: dict) -> None:
        """Optimiser buffers (None: rebuilt by replay) and scalars from a checkpoint."""
        if tensors is not None:
            self.optimizer.load(tensors, scalars)
        self.previous_loss = scalars.get("previous_loss")
        self.forwards = scalars.get("forwards", 0)
