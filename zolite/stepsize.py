"""The step size, from the model instead of a grid: a curvature probe before the run, a guard during it.

Why a fixed lr fails across models: MeZO's update is W <- W - lr g u, with u the (scaled) random direction and
g = (l+ - l-) / 2eps the loss's slope along it. To second order a step changes the loss by

    dL = -lr g (u . grad) + lr^2 / 2 g^2 c,      c = u'Hu, the loss's curvature along u.

Over random u, E[c] = tr H (in u's metric), which grows with the number of perturbed weights: the step that keeps
the second term in check shrinks as the tuned layer grows. That is why SmolLM2's layer 11 (3.5M weights) learns at
3e-4 while Qwen2.5-1.5B's layer 1 (46.8M) is wrecked at 1e-4.

The probe measures c directly: on `PROBES` training batches, each with its own z, the doubled forward gives l+ and
l- at `probe_eps` and the same forward at eps 0 gives l0 (so its rounding matches), c = (l+ + l- - 2 l0) / eps^2,
and lr = KAPPA / c. c is a second difference, so its rounding noise grows as 1/eps^2: at MeZO's eps 1e-3 in nf4 the
noise swamped it on Qwen2.5 BoolQ and RTE (mean c below its standard error, even negative), hence probe_eps >=
PROBE_EPS. When c is still not clearly positive (below 3 standard errors), c + 3 standard errors is used: a smaller
step, never a larger one. On every layer's norms that is the rule, not an exception: on SmolLM2 (fp32, CPU) the
loss curves down along half of z there and E[c] is near zero however many probes (docs/evidence.md, why the probe
cannot size a step on norms and biases), so the step follows the spread of c.

KAPPA was set on SmolLM2-135M, SST-2, layer 11 (H200, bench/results/real_scale_dev): the probe measured c = 174 and
the hand-picked 3e-4 (best val of {3e-4, 1e-3}) is 0.05 / 174. A step that also used the measured signal fraction
(0.64 at the base) was 6x larger and collapsed after 100 steps: the signal is large only until the first, easy
direction (the label prior) is learnt.

The guard: the training loss is compared in blocks of `BLOCK` windows of `window` steps; when the last block's mean
is above the lowest earlier block's, or the base's (measured before the first step: a step too large from the start
lifts every block), by more than `SIGNIFICANCE` standard errors, the step is halved. The base's reference is measured
as the run measures its loss, the mean of l+ and l- at the run's eps, not the unperturbed l0: that mean sits
eps^2 c / 2 above l0, 0.07 on Qwen2.5's RTE layer 4 at eps 1e-2 (c = 1,404) and 0.50 for full-model MeZO on SST-2
(c = 10,072). Against l0, the blocks of runs that had barely moved looked "turned up": the guard sent RTE layer 4
back to the base eight times, full-model MeZO three times in 650 steps (bench/results/real_scale_final_h100_part2).
Each halving multiplies the slopes the run records, so a resumed run or a trajectory replays the same updates bit
for bit.

Halving stops a drift; it does not undo it. On Qwen2.5-1.5B (bench/results/real_scale_final_h100) SST-2 on layer 14
reached val 0.806, then its loss climbed from 0.51 to 0.95 and stayed there through six halvings (val 0.640 at the
end). So in plain MeZO runs the guard also returns: it keeps a copy of the weights at the start of the lowest block so
far (the weights that block's loss was measured from; the base's before any block is lower), and with each halving
puts them back. (The copy at a block's end was tried first: at 10x SmolLM2's step the first block's loss was
the lowest, but its last weights were already wrecked.) The returns are decided by the
losses alone, so a resumed run replays them too.
"""
from __future__ import annotations

import math
import statistics
import sys
from dataclasses import dataclass, field

from .errors import ZoliteError

PROBES = 24          # probe batches: 3 doubled forwards each (~7% of a 1,000-step run's forwards)
PROBE_EPS = 1e-2     # the smallest eps the curvature is measured at (see above)
KAPPA = 0.05         # lr = KAPPA / curvature
BLOCK = 4            # guard windows per compared block
SIGNIFICANCE = 4     # standard errors a block must rise by
BASE_BATCHES = 8     # batches the guard's reference is measured on when the lr is given (a probe measures 24)
MAX_BACKOFFS = 8     # the guard halves the step at most this often (1/256)


def probe_seed(run_seed: int, k: int) -> int:
    """z of probe k: seeds no step of the run draws (steps use zo.step_seed(run_seed, step))."""
    from .zo import step_seed

    return step_seed(run_seed + 1_000_003, k)


@dataclass
class ProbeResult:
    lr: float
    eps: float                 # the eps the curvature was measured at
    curvature: float           # E[c]
    curvature_se: float        # its standard error over the probes
    used_curvature: float      # what lr = KAPPA / used_curvature came from
    slope_sq: float            # E[g_a^2]
    signal: float              # E[g_a g_b]: the part of the slope two batches agree on (reported, not used)
    signal_se: float
    reference: list            # the run's loss at the base weights on each probe batch: the guard's reference
    probes: int
    forwards: int
    note: str = ""

    def as_dict(self) -> dict:
        return {k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in self.__dict__.items()
                if k != "reference"}


def probe_lr(pair_losses, batches: list[tuple[list, list]], run_seed: int, eps: float) -> ProbeResult:
    """pair_losses(examples, seed, eps) -> (l+, l-); batches: (batch a, batch b) per probe; eps: the run's."""
    run_eps, eps = eps, max(eps, PROBE_EPS)
    ga, gb, curv, reference = [], [], [], []
    for k, (a, b) in enumerate(batches):
        seed = probe_seed(run_seed, k)
        plus, minus = pair_losses(a, seed, eps)
        base, _ = pair_losses(a, seed, 0.0)
        plus_b, minus_b = pair_losses(b, seed, eps)
        values = (plus, minus, base, plus_b, minus_b)
        if not all(math.isfinite(v) for v in values):
            raise ZoliteError(f"the step-size probe got a non-finite loss ({values}); the model overflows in this "
                              "dtype: try --dtype bfloat16 or float32, or pass --lr")
        ga.append((plus - minus) / (2 * eps))
        gb.append((plus_b - minus_b) / (2 * eps))
        curv.append((plus + minus - 2 * base) / eps ** 2)
        # the run's loss, (l+ + l-) / 2 at its eps: that (up to rounding) when the probe's eps is the run's; at a
        # smaller eps l0 + eps^2 c / 2 with this batch's c
        reference.append(base + (run_eps / eps) ** 2 * (plus + minus - 2 * base) / 2)
    products = [x * y for x, y in zip(ga, gb)]
    result = ProbeResult(lr=0.0, eps=eps, curvature=statistics.fmean(curv), curvature_se=_se(curv),
                         used_curvature=0.0, slope_sq=statistics.fmean(g * g for g in ga),
                         signal=statistics.fmean(products), signal_se=_se(products), reference=reference,
                         probes=len(ga), forwards=6 * len(ga))
    if result.slope_sq == 0 and result.curvature == 0:
        raise ZoliteError("the step-size probe saw no change of the loss under any perturbation (the tuned layers "
                          "do not reach the loss?); pass --lr")
    used = result.curvature
    if not used > 3 * result.curvature_se:
        used = max(used, 0.0) + 3 * result.curvature_se
        result.note = (f"curvature {result.curvature:.4g} not clearly above its noise ({result.curvature_se:.4g}); "
                       "used curvature + 3 standard errors (a smaller step)")
    result.used_curvature = used
    result.lr = KAPPA / used
    return result


def _se(values: list[float]) -> float:
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("inf")


@dataclass
class LossGuard:
    """Halve the step when the training loss turns up, and with `returns` go back to the weights the lowest block
    started from (see the module's docstring). factor: the current multiplier of the lr; backoffs: [step, factor]
    each time it changed; kept: the step whose weights are kept; snapshots: the steps at which the block just ended
    became the lowest (its start's weights are kept from then on); returned: [step, kept step] each time the weights
    went back."""
    window: int
    reference: list = field(default_factory=list)   # the run's loss at the base weights on a few training batches
    returns: bool = False
    factor: float = 1.0
    backoffs: list = field(default_factory=list)
    kept: int = 0
    snapshots: list = field(default_factory=list)
    returned: list = field(default_factory=list)

    def check(self, losses: list[float], quiet: bool = False) -> str | None:
        """Called after each step with every loss so far. "halve": the step was just halved; "return": halved, and
        the weights go back to step `kept`'s; "snapshot": the weights this block started from (copied by the caller
        at each copy_at step) are the ones to go back to from now on (returns only); None: nothing to do."""
        n, block = len(losses), BLOCK * self.window
        if n < block or n % block:
            return None
        recent = losses[n - block:]
        if not all(math.isfinite(v) for v in recent):
            return None   # divergence is the loop's to handle
        # the lowest earlier block (blocks do not overlap: the minimum of many overlapping ones sits far below the
        # mean of a flat, noisy loss, and the guard would halve on noise)
        blocks = [losses[end - block:end] for end in range(block, n - block + 1, block)]
        best = min(blocks + ([self.reference] if len(self.reference) > 1 else []), key=statistics.fmean, default=None)
        if self._turned_up(n, recent, best):
            self.factor /= 2
            self.backoffs.append([n, self.factor])
            went_back = self.returns
            if went_back:
                self.returned.append([n, self.kept])
            if not quiet:
                back = f" and the weights went back to step {self.kept}'s" if went_back else ""
                print(f"zolite: the training loss turned up (steps {n - block + 1}-{n}: {statistics.fmean(recent):.4f}, "
                      f"lowest so far {statistics.fmean(best):.4f}); step size halved (lr x{self.factor:g}){back}",
                      file=sys.stderr)
            return "return" if went_back else "halve"
        if (self.returns and len(self.backoffs) < MAX_BACKOFFS   # (after the last halving nothing goes back)
                and (best is None or statistics.fmean(recent) < statistics.fmean(best))):
            self.kept = n - block
            self.snapshots.append(n)
            return "snapshot"
        return None

    def _turned_up(self, n: int, recent: list[float], best: list[float] | None) -> bool:
        block = BLOCK * self.window
        if best is None or n < 2 * block or len(self.backoffs) >= MAX_BACKOFFS:
            return False
        if self.backoffs and n - self.backoffs[-1][0] < block:   # the last block must be all at the current step
            return False
        se = math.sqrt(statistics.variance(best) / len(best) + statistics.variance(recent) / block)
        return statistics.fmean(recent) > statistics.fmean(best) + SIGNIFICANCE * se

    def replay(self, losses: list[float]) -> None:
        """Rebuild the guard's state from a resumed run's losses (it only looks at multiples of its block)."""
        self.factor, self.backoffs, self.kept, self.snapshots, self.returned = 1.0, [], 0, [], []
        for n in range(BLOCK * self.window, len(losses) + 1, BLOCK * self.window):
            self.check(losses[:n], quiet=True)

    def copy_at(self, step: int) -> bool:
        """Whether the weights at `step` start a block the guard may keep: the caller copies them (returns only).
        Decided by the backoffs up to `step`, so a replayed guard answers as the live one did."""
        block = BLOCK * self.window
        return (self.returns and step % block == 0
                and sum(1 for n, _ in self.backoffs if n <= step) < MAX_BACKOFFS)

    def action_at(self, step: int) -> str | None:
        """What check() said at `step` (after replay): the weights' part of it, for replaying the updates."""
        if any(n == step for n, _ in self.returned):
            return "return"
        return "snapshot" if step in self.snapshots else None


def effective_updates(steps: int, returned: list) -> list[int]:
    """Indices of the updates the weights at `steps` are made of, after the guard's returns ([step, kept step]):
    a return to step k drops the updates made since k (the path to k is a prefix of the current one, since the
    guard only keeps weights of the current path; a return to weights a return brought back counts as either step)."""
    back = {n: k for n, k in returned}
    path, length_at = [], {0: 0}
    for t in range(steps):
        path.append(t)
        if t + 1 in back:
            path = path[:length_at[back[t + 1]]]
        length_at[t + 1] = len(path)
    return path


def reference_losses(pair_losses, batches: list[list], run_seed: int, eps: float) -> list[float]:
    """The run's loss at the base weights on a few training batches (the mean of l+ and l- at the run's eps, as each
    step measures it): the guard's reference when the lr is given."""
    return [statistics.fmean(pair_losses(b, probe_seed(run_seed, k), eps)) for k, b in enumerate(batches)]


def guard_reference(lr_choice: dict) -> list[float]:
    """The guard's reference as a run's checkpoint records it. Older runs recorded l0 ("base_losses"); their past
    decisions were made against it, so a resumed one keeps it (and replays them)."""
    return lr_choice.get("guard_reference", lr_choice.get("base_losses", []))


def new_guard(steps: int, lr_choice: dict, returns: bool = False) -> LossGuard:
    return LossGuard(guard_window(steps), guard_reference(lr_choice), returns)


LR_SCHEDULES = ("constant", "linear", "cosine")


def schedule_factor(schedule: str, step: int, steps: int) -> float:
    """The lr's multiplier at `step` (0-based) of a run of `steps`: constant 1 (MeZO's); linear and cosine decay from
    1 at the first step towards 0 at the last, so the last steps add less of ZO's noise to the weights."""
    if schedule == "constant" or steps <= 0:
        return 1.0
    done = step / steps
    return 1.0 - done if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * done))


def guard_window(steps: int) -> int:
    """Windows of 2% of the run, at least 25 steps (blocks of 8%, at least 100 steps)."""
    return max(25, steps // 50)
