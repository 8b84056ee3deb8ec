"""When to publish bundle parts: one copy per wave, however many devices ask and however spread out.

Sans-IO (the caller passes the time); the bridge feeds it requests and publishes what :meth:`Carousel.due`
returns. Devices subscribe to a bundle's blob topic before they ask, and their MQTT sessions are
persistent, so every copy published after a device's request reaches that device. Hence:

- **Gathering.** A request that adds demand (a device newly waiting for a part) starts or extends the
  bundle's next pass: it is published ``quiet`` seconds after the last new demand, at most ``max_hold``
  after the first. A wave's requests arrive over tens of seconds (desired states go out one by one, a
  fleet's connections are busy), and a pass published mid-storm would have to be repeated for every
  device that subscribed after it. A single late device waits ``quiet`` seconds per step (manifest,
  then chunks).
- **Covered requests.** A device asking again for a part published after it became able to take
  it (after its first request; for chunks, after it had the manifest) is ignored for ``covered``
  seconds: the copy is on its way (a busy device re-asks while its queue drains). After that it is
  treated as a miss and served again.
- **Passes are per bundle**, manifest first: a device waiting for the manifest gets it before the
  chunks of the same pass (and of any later one), so it takes them and is covered for them.
- A device that reconnects (its "online" status) may have lost its session: :meth:`reconnected`
  forgets when it asked, so its next request counts as new.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from protocol.topics import MANIFEST_PART

NEVER = float("inf")


@dataclass
class _Asker:
    asked: float  # first request for this bundle (subscribed from then on)
    ready: float = NEVER  # from when it takes chunks: its first chunk request, or the manifest copy it waited for


@dataclass
class _Bundle:
    askers: dict[str, _Asker] = field(default_factory=dict)
    sent: dict[str, float] = field(default_factory=dict)  # part -> time of its last copy
    waiting: dict[str, set[str]] = field(default_factory=dict)  # part -> devices the next pass serves
    first_pending: float = NEVER
    last_new: float = NEVER
    touched: float = 0.0

    def deadline(self, quiet: float, max_hold: float) -> float:
        if not self.waiting:
            return NEVER
        return min(self.last_new + quiet, self.first_pending + max_hold)


class Carousel:
    """Per-bundle passes of the parts devices wait for; see the module docstring."""

    def __init__(self, quiet: float = 1.5, max_hold: float = 30.0, covered: float = 30.0) -> None:
        if quiet <= 0 or max_hold < quiet or covered <= 0:
            raise ValueError("need 0 < quiet <= max_hold and covered > 0")
        self.quiet, self.max_hold, self.covered = quiet, max_hold, covered
        self._bundles: dict[str, _Bundle] = {}
        self.ignored = 0  # covered requests for parts (what coalescing saved), for tests and metrics

    def request(self, bundle: str, device: str, manifest: bool, chunks: list[str], now: float,
                admit: Callable[[list[str]], list[str]] | None = None) -> None:
        """``device`` asks for parts; ``admit`` gets the parts it newly waits for and returns those it may have
        (the hub's per-device budget, hub/mqtt/ratelimit.py): covered requests cost nothing."""
        b = self._bundles.setdefault(bundle, _Bundle())
        b.touched = now
        asker = b.askers.get(device)
        if asker is None:
            asker = b.askers[device] = _Asker(asked=now)
        if chunks:
            asker.ready = min(asker.ready, now)  # it has the manifest
        wants = ([(MANIFEST_PART, asker.asked)] if manifest else []) + [(c, asker.ready) for c in chunks]
        new = []
        for part, since in wants:
            sent = b.sent.get(part)
            if sent is not None and sent >= since and now - sent < self.covered:
                self.ignored += 1
                continue
            if device not in b.waiting.get(part, ()):
                new.append(part)
        if admit is not None:
            new = admit(new)
        for part in new:
            b.waiting.setdefault(part, set()).add(device)
        if new:
            b.last_new = now
            b.first_pending = min(b.first_pending, now)

    def reconnected(self, device: str) -> None:
        for b in self._bundles.values():
            b.askers.pop(device, None)

    def next_deadline(self) -> float:
        """When :meth:`due` next has something (``inf``: nothing pending)."""
        return min((b.deadline(self.quiet, self.max_hold) for b in self._bundles.values()), default=NEVER)

    def due(self, now: float) -> list[tuple[str, list[str]]]:
        """The passes to publish now, as (bundle, parts) with the manifest first; marks them sent."""
        out: list[tuple[str, list[str]]] = []
        for key, b in list(self._bundles.items()):
            if b.deadline(self.quiet, self.max_hold) <= now:
                parts = sorted(b.waiting, key=lambda p: p != MANIFEST_PART)
                for device in b.waiting.get(MANIFEST_PART, ()):  # it reads this manifest before any later chunk
                    asker = b.askers.get(device)
                    if asker is not None:
                        asker.ready = min(asker.ready, now)
                for part in parts:
                    b.sent[part] = now
                b.waiting.clear()
                b.first_pending = b.last_new = NEVER
                out.append((key, parts))
            elif not b.waiting and now - b.touched > self.covered:
                del self._bundles[key]  # idle: nothing it remembers still matters
        return out

    def pending(self, bundle: str) -> dict[str, set[str]]:
        """Who waits for which part of ``bundle`` (a copy, for tests and status)."""
        b = self._bundles.get(bundle)
        return {p: set(d) for p, d in b.waiting.items()} if b else {}
