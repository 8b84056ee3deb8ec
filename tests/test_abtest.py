"""Fleet A/B's always-valid comparison (hub/monitoring/abtest.py): it decides for a real difference, and
looking after every outcome does not raise its error rate above alpha (the point of a sequential test)."""

from __future__ import annotations

import numpy as np

from hub.monitoring.abtest import Arm, compare, radius


def test_a_real_difference_is_found_and_a_small_sample_stays_undecided():
    assert not compare(Arm("a", 9, 10), Arm("b", 6, 10))["decided"]
    verdict = compare(Arm("a", 900, 1000), Arm("b", 600, 1000))
    assert verdict["decided"] and verdict["winner"] == "a"
    lo, hi = verdict["interval"]
    assert lo <= -0.3 <= hi and hi < 0
    assert radius(100, 0.05) > radius(10_000, 0.05) > 0


def test_peeking_after_every_outcome_keeps_false_decisions_under_alpha():
    rng = np.random.default_rng(7)
    runs, steps, alpha, false = 200, 2000, 0.05, 0
    for _ in range(runs):  # both arms the same (p = 0.8): any decision is a false one
        a = np.cumsum(rng.random(steps) < 0.8)
        b = np.cumsum(rng.random(steps) < 0.8)
        for n in range(10, steps, 10):  # an operator looking every 10 outcomes
            if compare(Arm("a", int(a[n - 1]), n), Arm("b", int(b[n - 1]), n), alpha)["decided"]:
                false += 1
                break
    assert false / runs <= alpha
