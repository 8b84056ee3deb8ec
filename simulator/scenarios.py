"""Fleet scenarios: which simulated devices misbehave, and how, chosen deterministically by device id.

A share picks the same devices on every run (sha256 of seed, kind and id), so a test or an
operator can say in advance which devices a ``--fail-share 0.2`` rollout will break. The
agent itself is unchanged: a scenario wraps the agent's health check and drops its socket.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

from agent.core import Agent
from modules.runners import ModelError

log = logging.getLogger("edgefleet.simulator.scenarios")


def picked(device_id: str, share: float, kind: str, seed: str = "") -> bool:
    """True for about ``share`` of device ids, the same ones every time."""
    if share <= 0:
        return False
    h = int.from_bytes(hashlib.sha256(f"{seed}/{kind}/{device_id}".encode()).digest()[:8], "big")
    return h / 2**64 < share


def module_matches(patterns: tuple[str, ...], name: str, version: int) -> bool:
    """``*`` matches every module; ``name`` every version of it; ``name:version`` one version."""
    return any(p == "*" or p == name or p == f"{name}:{version}" for p in patterns)


@dataclass(frozen=True)
class Scenario:
    fail_share: float = 0.0  # these devices fail the health check of ``fail_modules``
    fail_modules: tuple[str, ...] = ("*",)
    slow_share: float = 0.0  # these devices take ``slow_s`` longer to health-check (slow hardware)
    slow_s: float = 0.0
    flaky_share: float = 0.0  # these devices lose their connection about every ``flaky_period_s``
    flaky_period_s: float = 30.0
    seed: str = ""

    def failing(self, device_id: str) -> bool:
        return picked(device_id, self.fail_share, "fail", self.seed)

    def apply(self, agent: Agent) -> None:
        """Wrap ``agent``'s health check for the failing and slow devices."""
        dev = agent.device_id
        fail = self.failing(dev)
        slow = self.slow_s if picked(dev, self.slow_share, "slow", self.seed) else 0.0
        if not fail and not slow:
            return
        def gate(inst: Any) -> None:  # runs in the health check's thread, before the module's own check
            if slow:
                time.sleep(slow)
            if fail and module_matches(self.fail_modules, inst.name, inst.manifest.version):
                raise ModelError(f"simulated failure: {inst.name}:{inst.manifest.version} is broken on this device")

        agent.installer.health_gate = gate

    async def flaky(self, agents: list[Agent]) -> None:
        """Drop the sockets of the flaky devices, each at a random moment in every period, until cancelled."""
        victims = [a for a in agents if picked(a.device_id, self.flaky_share, "flaky", self.seed)]
        if not victims:
            return
        log.info("%d flaky device(s) lose their link about every %.0fs", len(victims), self.flaky_period_s)
        while True:
            await asyncio.sleep(self.flaky_period_s / len(victims))
            random.choice(victims).client.drop_link()  # like a dead link: the broker sends the last will
