"""The step size, from the model instead of a grid: a probe before the run, a guard during it.

Why a fixed lr fails across models: MeZO's update is W <- W - lr g u, with u the (scaled) random direction and
g = (l+ - l-) / 2eps the loss's slope along it. To second order a step changes the loss on fresh data by

    E[dL] = -lr E[g_a g_b] + lr^2 / 2 E[g_a^2 c],      c = u'Hu, the loss's curvature along u,

where g_a and g_b are the slopes along the same u on two independent batches (their product keeps the part of the
gradient the batches agree on: the signal; g_a^2 also holds the batch noise). c grows with the number of perturbed
weights (E[c] = tr H in u's metric), which is why SmolLM2's layer 11 (3.5M weights) learns at 3e-4 and Qwen2.5-1.5B's
layer 1 (46.8M) is wrecked at 1e-4.

The probe measures those three numbers on a few training batches, from doubled forwards the run makes anyway:
(l+, l-) on batch a, the unperturbed l0 on batch a (the same doubled forward at eps 0, so its rounding matches) and
(l+, l-) on batch b, each probe with its own z. c = (l+ + l- - 2 l0) / eps^2. The lr minimising E[dL] is
E[g_a g_b] / E[g_a^2 c]; the signal term is noisy over a few probes, so it is floored at `MIN_SIGNAL` of E[g_a^2]
(a step at that lr still expects the loss to fall when the signal is at least that), and the result is scaled by
`SAFETY` (half the minimising lr keeps 75% of its expected decrease, with room for curvature that grows as the
weights move).

The guard: the training loss is watched in windows of `window` steps; when a window's mean is above the first
window's (the base's loss) by more than 3 standard errors, the step size is halved. Halving is exact in floating
point, so a backed-off run replays bit for bit (its recorded slopes carry the factor).
"""
from __future__ import annotations

import math
import statistics
import sys
from dataclasses import dataclass, field

from .errors import ZoliteError

PROBES = 24          # probe batches: 3 doubled forwards each (~7% of a 1,000-step run's forwards)
KAPPA = 0.05         # lr = KAPPA / curvature (see the module's docstring for how it was set)
MAX_BACKOFFS = 8     # the guard halves the step at most this often (1/256)


def probe_seed(run_seed: int, k: int) -> int:
    """z of probe k: seeds no step of the run draws (steps use zo.step_seed(run_seed, step))."""
    from .zo import step_seed

    return step_seed(run_seed + 1_000_003, k)


@dataclass
class ProbeResult:
    lr: float
    slope_sq: float            # E[g_a^2]
    signal: float              # E[g_a g_b]
    signal_se: float           # its standard error over the probes
    curvature: float           # E[c]
    curvature_se: float
    weighted_curvature: float  # E[g_a^2 c] / E[g_a^2]
    probes: int
    forwards: int
    note: str = ""

    def as_dict(self) -> dict:
        return {k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def probe_lr(pair_losses, batches: list[tuple[list, list]], run_seed: int, eps: float) -> ProbeResult:
    """pair_losses(examples, seed, eps) -> (l+, l-); batches: (batch a, batch b) per probe."""
    ga, gb, curv = [], [], []
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
    n = len(ga)
    slope_sq = sum(g * g for g in ga) / n
    products = [x * y for x, y in zip(ga, gb)]
    signal = statistics.fmean(products)
    weighted = sum(g * g * c for g, c in zip(ga, curv)) / max(slope_sq * n, 1e-300)
    result = ProbeResult(lr=0.0, slope_sq=slope_sq, signal=signal, signal_se=_se(products),
                         curvature=statistics.fmean(curv), curvature_se=_se(curv), weighted_curvature=weighted,
                         probes=n, forwards=6 * n)
    if slope_sq == 0:
        raise ZoliteError("the step-size probe saw no change of the loss under any perturbation (the tuned layers "
                          "do not reach the loss?); pass --lr")
    curvature = max(weighted, result.curvature)
    if curvature <= 0:   # no positive curvature measured: fall back on the slope's own scale
        result.note = "no positive curvature measured; lr from the curvature's standard error"
        curvature = max(result.curvature_se, 1e-12)
    result.lr = KAPPA / curvature
    return result


def _se(values: list[float]) -> float:
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("inf")


@dataclass
class LossGuard:
    """Halve the step when the training loss climbs (see the module's docstring). factor: the current multiplier
    of the lr (a power of two); backoffs: [step, factor] each time it changed."""
    window: int
    factor: float = 1.0
    backoffs: list = field(default_factory=list)

    def check(self, losses: list[float], quiet: bool = False) -> bool:
        """Called after each step with every loss so far; True when it just halved the step."""
        n, w = len(losses), self.window
        if n < 2 * w or n % w or len(self.backoffs) >= MAX_BACKOFFS:
            return False
        if self.backoffs and n - self.backoffs[-1][0] < w:   # the window must be all at the current step size
            return False
        first, recent = losses[:w], losses[n - w:]
        if not all(math.isfinite(v) for v in recent):
            return False   # divergence is the loop's to handle
        se = math.sqrt(statistics.variance(first) / w + statistics.variance(recent) / w)
        if statistics.fmean(recent) <= statistics.fmean(first) + 3 * se:
            return False
        self.factor /= 2
        self.backoffs.append([n, self.factor])
        if not quiet:
            print(f"zolite: the training loss climbed (steps {n - w + 1}-{n}: {statistics.fmean(recent):.4f}, "
                  f"the first {w}: {statistics.fmean(first):.4f}); step size halved (lr x{self.factor:g})",
                  file=sys.stderr)
        return True

    def replay(self, losses: list[float]) -> None:
        """Rebuild the guard's state from a resumed run's losses (it only looks at multiples of its window)."""
        self.factor, self.backoffs = 1.0, []
        for n in range(self.window, len(losses) + 1, self.window):
            self.check(losses[:n], quiet=True)


def guard_window(steps: int) -> int:
    """Windows of 2% of the run, at least 25 steps: ~50 checks a run, each over enough batches to see a climb."""
    return max(25, steps // 50)
