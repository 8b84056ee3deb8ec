"""The bake: a new version on probation after its health check, judged by its inference error rate."""

from __future__ import annotations

import asyncio
import contextlib

from protocol.messages import BakePolicy


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
