"""Fleet A/B: two versions on disjoint device groups, compared with always-valid confidence intervals.

A success rate per arm (accuracy from labels, or 1 - error rate from telemetry) gets a confidence
*sequence* (Robbins' normal mixture for sub-Gaussian increments; Bernoulli outcomes are 1/2-sub-Gaussian,
Howard et al. 2021): the interval holds at every sample size at once with probability 1 - alpha, so an
operator may look as often as they like and stop as soon as it decides. The two arms' intervals, each at
alpha/2, bound the difference; it decides once that interval excludes 0. Pure: counts in, verdict out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

RHO = 25.0  # the mixture's width, in units of intrinsic time (n/4): tightest near n ~ 100 outcomes per arm


def radius(n: int, alpha: float, rho: float = RHO) -> float:
    """Half-width of the always-valid interval for a mean of ``n`` outcomes in [0, 1] (two-sided, level alpha)."""
    if n <= 0:
        return math.inf
    v = n / 4.0  # sum of variance proxies: 1/4 per bounded outcome
    return math.sqrt((v + rho) * (math.log((v + rho) / rho) + 2.0 * math.log(1.0 / alpha))) / n


@dataclass(frozen=True)
class Arm:
    name: str
    successes: int
    trials: int

    def interval(self, alpha: float) -> tuple[float, float]:
        if self.trials <= 0:
            return 0.0, 1.0
        p, r = self.successes / self.trials, radius(self.trials, alpha)
        return max(0.0, p - r), min(1.0, p + r)


def compare(a: Arm, b: Arm, alpha: float = 0.05) -> dict[str, Any]:
    """The difference b - a of success rates with its always-valid interval, and which arm wins (if decided)."""
    lo_a, hi_a = a.interval(alpha / 2)
    lo_b, hi_b = b.interval(alpha / 2)
    lo, hi = lo_b - hi_a, hi_b - lo_a
    winner = b.name if lo > 0 else a.name if hi < 0 else None
    rate = {arm.name: (arm.successes / arm.trials if arm.trials else None) for arm in (a, b)}
    return {"arms": [{"name": arm.name, "successes": arm.successes, "trials": arm.trials, "rate": rate[arm.name],
                      "interval": list(arm.interval(alpha / 2))} for arm in (a, b)],
            "difference": (rate[b.name] - rate[a.name]) if a.trials and b.trials else None,
            "interval": [lo, hi], "alpha": alpha, "decided": winner is not None, "winner": winner}
