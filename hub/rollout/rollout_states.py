"""The rollout state machine: named states, the transitions allowed between them, and how one is shown.

    pending [-> shadowing] -> installing(wave i) -> baking(wave i) -> gate passed -> installing(wave i+1) ... -> succeeded
                \\-> shadow gate failed -> rolling_back        \\-> gate failed -> halted | rolling_back -> rolled_back

``shadowing``: the first wave's devices run the candidate beside the live version on the same inputs,
never serving it; its gates decide whether the waves begin (a failed shadow always rolls back: the
candidate is removed, the live version never stopped).

``wave`` is stored beside ``state``; :func:`display` renders ``wave[2].baking``. Every transition is
persisted (``rollouts`` table) and audited before the controller acts on it, so a hub that restarts
finds each rollout where it was.
"""

from __future__ import annotations

PENDING = "pending"
SHADOWING = "shadowing"
INSTALLING = "installing"
BAKING = "baking"
PAUSED = "paused"
HALTED = "halted"
ROLLING_BACK = "rolling_back"
ROLLED_BACK = "rolled_back"
SUCCEEDED = "succeeded"
ABORTED = "aborted"
SUPERSEDED = "superseded"  # a newer revision's rollout replaced this one

TRANSITIONS: dict[str, frozenset[str]] = {
    PENDING: frozenset({SHADOWING, INSTALLING, ABORTED, SUPERSEDED}),
    SHADOWING: frozenset({INSTALLING, ROLLING_BACK, ABORTED, SUPERSEDED}),
    # with no bake time the gate runs as soon as a wave is installed: on to the next wave, or done
    INSTALLING: frozenset({BAKING, INSTALLING, SUCCEEDED, HALTED, ROLLING_BACK, PAUSED, ABORTED, SUPERSEDED}),
    BAKING: frozenset({INSTALLING, SUCCEEDED, HALTED, ROLLING_BACK, PAUSED, ABORTED, SUPERSEDED}),
    PAUSED: frozenset({INSTALLING, BAKING, ROLLING_BACK, ABORTED, SUPERSEDED}),
    # resume after a halt re-runs the wave's gate from installing
    HALTED: frozenset({INSTALLING, ROLLING_BACK, ABORTED, SUPERSEDED}),
    ROLLING_BACK: frozenset({ROLLED_BACK}),
    ROLLED_BACK: frozenset(),
    SUCCEEDED: frozenset(),
    ABORTED: frozenset(),
    SUPERSEDED: frozenset(),
}
TERMINAL = frozenset(s for s, nxt in TRANSITIONS.items() if not nxt)
# states in which the rollout's devices hold its revision (the director honours its pins)
HOLDING = frozenset({SHADOWING, INSTALLING, BAKING, PAUSED, HALTED})
# states the controller advances on its own
ACTIVE = frozenset({PENDING, SHADOWING, INSTALLING, BAKING, ROLLING_BACK})


class IllegalTransition(Exception):
    pass


def check(old: str, new: str) -> None:
    if new not in TRANSITIONS.get(old, frozenset()):
        raise IllegalTransition(f"a rollout cannot go from {old} to {new}")


def display(state: str, wave: int) -> str:
    """``wave[2].baking`` while waves run (1-based, as operators count), else the bare state."""
    return f"wave[{wave + 1}].{state}" if state in (INSTALLING, BAKING) else state
