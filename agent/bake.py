"""The bake: a new version on probation after its health check, judged by its inference error rate."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from protocol.messages import BakePolicy

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from agent.install import Installed

log = logging.getLogger("edgefleet.agent")


async def bake(active_modules: dict[str, Any], activate: Callable[[str], Awaitable[None]], load_errors: dict[str, str],
               device_id: str, inst: Installed, policy: BakePolicy) -> str:
    """Serve ``inst`` (``active_modules``: the inference front's ``ActiveModule`` by name) on probation and wait for its verdict: "" commits, anything else is the reason to roll back."""
    active = active_modules.get(inst.name)
    if active is None or (active.bundle, active.config) != (inst.bundle, inst.config_digest):
        await activate(inst.name)
        active = active_modules.get(inst.name)
    if active is None or (active.bundle, active.config) != (inst.bundle, inst.config_digest):
        return f"the new version did not start: {load_errors.get(inst.name, 'unknown reason')}"
    watch = active.bake = BakeWatch(policy)
    log.info("%s: module %s baking for %ds (rollback above %g%% errors over >= %d inferences)",
             device_id, inst.name, policy.seconds, policy.max_error_ppm / 10_000, policy.min_inferences)
    try:
        reason = await watch.wait()
    finally:
        active.bake = None
    log.info("%s: module %s bake %s: %s", device_id, inst.name, "failed" if reason else "passed",
             reason or watch.summary())
    return reason


class BakeWatch:
    """Counts one version's inferences during its bake; :meth:`wait` gives the reason to roll back, or ""."""

    def __init__(self, policy: BakePolicy) -> None:
        self.policy = policy
        self.inferences = 0
        self.errors = 0
        self.reason = ""
        self._decided = asyncio.Event()

    def record(self, ok: bool) -> None:
        """One answered inference (requests refused before reaching the model are not recorded)."""
        self.add(1, 0 if ok else 1)

    def add(self, inferences: int, errors: int) -> None:
        """Inferences answered elsewhere (the worker's direct socket), ``errors`` of them failed."""
        self.inferences += inferences
        self.errors += errors
        p = self.policy
        # integers only, as in the policy: errors/inferences > max_error_ppm/1e6
        if self.inferences >= p.min_inferences and self.errors * 1_000_000 > p.max_error_ppm * self.inferences:
            self.fail(f"error rate {self.errors / self.inferences:.1%} ({self.errors} of {self.inferences} inferences)"
                      f" exceeds {p.max_error_ppm / 10_000:g}%")

    def fail(self, reason: str) -> None:
        """Decide now (e.g. the worker crash-loops); the first reason stands."""
        if not self.reason:
            self.reason = reason
            self._decided.set()

    async def wait(self) -> str:
        """Until the bake period ends or the version fails it: the failure reason, or "" (commit)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._decided.wait(), self.policy.seconds)
        return self.reason

    def summary(self) -> str:
        return f"{self.errors} errors in {self.inferences} inferences"
