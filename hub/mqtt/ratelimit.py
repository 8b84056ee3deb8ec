"""How many bundle bytes each device may make the hub publish: a token bucket per device (sans-IO, time passed in).

A device asks for bundle parts (``blob-req``) and the hub publishes them on the bundle's topic. Any
enrolled device may ask for any bundle, as often as it likes: without a bound one device could make
the hub send 20 MB every 30 s for 5.5 KB of requests. Each part a request newly asks for costs its
size (a chunk at most ``CHUNK_SIZE``; the manifest ``MANIFEST_COST``); a part is published only while
the device's bucket holds its cost. The bucket holds ``burst`` bytes and refills at ``rate`` bytes per
second, so a device downloading one bundle is not slowed while a device asking again and again gets
``rate`` and no more. Parts refused now are asked for again by a genuine device (it retries with
back-off), and served as the bucket refills.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from protocol.manifest import CHUNK_SIZE
from protocol.topics import MANIFEST_PART

MANIFEST_COST = 64 * 1024  # a release envelope is a few KiB; charged at a generous bound
PRUNE_EVERY = 1000  # admissions between sweeps of buckets that are full again (they hold no state worth keeping)


def part_cost(part: str) -> int:
    return MANIFEST_COST if part == MANIFEST_PART else CHUNK_SIZE


@dataclass
class Bucket:
    level: float
    updated: float
    warned: float = float("-inf")  # when the hub last logged this device being limited


class DeviceBudgets:
    """Per-device buckets; ``burst <= 0`` turns the limit off."""

    def __init__(self, burst: int, rate: float) -> None:
        if 0 < burst < CHUNK_SIZE or rate < 0:
            raise ValueError(f"a device's burst must hold a chunk ({CHUNK_SIZE} bytes) and its rate be >= 0")
        self.burst, self.rate = float(burst), float(rate)
        self._buckets: dict[str, Bucket] = {}
        self._admissions = 0
        self.limited = 0  # requests of which some part was refused
        self.refused_bytes = 0  # cost of the parts refused

    def _bucket(self, device: str, now: float) -> Bucket:
        b = self._buckets.get(device)
        if b is None:
            b = self._buckets[device] = Bucket(self.burst, now)
        else:
            b.level = min(self.burst, b.level + (now - b.updated) * self.rate)
            b.updated = now
        return b

    def admit(self, device: str, parts: Iterable[str], now: float) -> list[str]:
        """The parts (in order) ``device`` may have published now, charged to its bucket; the rest are refused."""
        parts = list(parts)
        if self.burst <= 0 or not parts:
            return parts
        self._admissions += 1
        if self._admissions % PRUNE_EVERY == 0:
            self._prune(now)
        b = self._bucket(device, now)
        admitted = []
        for part in parts:
            cost = part_cost(part)
            if cost > b.level:
                break  # in order: the manifest before chunks, a device's chunks in the order it asked
            b.level -= cost
            admitted.append(part)
        if len(admitted) < len(parts):
            self.limited += 1
            self.refused_bytes += sum(part_cost(p) for p in parts[len(admitted):])
        return admitted

    def should_warn(self, device: str, now: float, every: float = 60.0) -> bool:
        """Whether to log that ``device`` is limited (once a minute per device: a flood must not flood the log)."""
        b = self._buckets.get(device)
        if b is None or now - b.warned < every:
            return False
        b.warned = now
        return True

    def _prune(self, now: float) -> None:
        full = [d for d, b in self._buckets.items() if b.level + (now - b.updated) * self.rate >= self.burst]
        for d in full:
            del self._buckets[d]

    def __len__(self) -> int:
        return len(self._buckets)
