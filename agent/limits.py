"""What a hostile or broken hub, or a full disk, cannot make the agent do: the download and disk limits.

- **Size while reading**: every response is read only up to what the signed release lists (a chunk's
  size, an envelope's cap), never to its end (``agent/http_transfer.py``); over MQTT the broker is told
  the largest packet the agent takes (``MAX_PACKET_BYTES``, MQTT 5 Maximum Packet Size).
- **Slow retrieval** (Uptane): a download that moves fewer than ``min_bps`` bytes per second over
  ``window_s`` seconds is aborted with the reason, and tried again after ``retry_s`` (:class:`RateWatch`).
- **Free space**: before a download and before unpacking, the bytes an install needs plus ``reserve_bytes``
  must be free, else the install fails with the figures and is tried again after ``retry_s``; a write that
  meets a full disk anyway (ENOSPC) fails the same way, never as a stall.
"""

from __future__ import annotations

import asyncio
import errno
import shutil
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.errors import DiskFull
from protocol.manifest import MAX_SPAN_BYTES
from protocol.messages import MAX_MESSAGE_BYTES
from protocol.signing import MAX_ENVELOPE_BYTES

# The largest MQTT packet the agent accepts: a span or an envelope, plus topic and properties.
MAX_PACKET_BYTES = max(MAX_SPAN_BYTES, MAX_ENVELOPE_BYTES, MAX_MESSAGE_BYTES) + 64 * 1024
_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


@dataclass(frozen=True)
class DownloadLimits:
    """The agent's limits on downloads and disk use (``agent run --min-download-rate`` and friends)."""

    min_bps: float = 1024.0  # a download slower than this ...
    window_s: float = 60.0  # ... over this many seconds is aborted (0 or a rate of 0: never)
    reserve_bytes: int = 4 * 2**20  # kept free beyond what an install needs (outbox, journal, state)
    retry_s: float = 30.0  # an install the environment stopped (slow, disk full) is tried again after this


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in _FULL


def disk_full(exc: OSError, what: str) -> DiskFull:
    return DiskFull(f"disk full while {what}: {exc.strerror or exc}")


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def check_free(path: Path, need: int, reserve: int, what: str) -> None:
    """Raise :class:`DiskFull` unless ``need + reserve`` bytes are free on ``path``'s filesystem."""
    free = free_bytes(path)
    if free < need + reserve:
        raise DiskFull(f"not enough free space to {what}: needs {_mb(need)} plus {_mb(reserve)} kept free, "
                       f"{_mb(free)} free on {path}")


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MB"


class RateWatch:
    """Bytes over a sliding window; :meth:`problem` names a transfer slower than the minimum once it ran a window.

    Not thread-safe: one per response (HTTP) or per fetch (MQTT, fed on the event loop).
    """

    def __init__(self, min_bps: float, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.min_bps, self.window_s, self.clock = min_bps, window_s, clock
        self._samples: deque[tuple[float, int]] = deque()
        self._in_window = 0
        self.started = clock()

    @property
    def enabled(self) -> bool:
        return self.min_bps > 0 and self.window_s > 0

    def restart(self) -> None:
        """Judge from now on (after a reconnect or a pause that was not the sender's doing)."""
        self._samples.clear()
        self._in_window = 0
        self.started = self.clock()

    def feed(self, n: int) -> None:
        if self.enabled:
            self._samples.append((self.clock(), n))
            self._in_window += n

    def problem(self) -> str:
        """"" while the rate holds (or less than a window has passed), else why the download is aborted."""
        if not self.enabled:
            return ""
        now = self.clock()
        if now - self.started < self.window_s:
            return ""
        while self._samples and self._samples[0][0] < now - self.window_s:
            self._in_window -= self._samples.popleft()[1]
        if self._in_window >= self.min_bps * self.window_s:
            return ""
        return (f"download slower than {self.min_bps:g} B/s over {self.window_s:g} s ({self._in_window} bytes in the "
                f"last {self.window_s:g} s): aborted as a slow retrieval")


def wake_at(pending: asyncio.TimerHandle | None, delay: float, event: asyncio.Event) -> asyncio.TimerHandle:
    """Set ``event`` after ``delay`` seconds, unless ``pending`` sets it sooner; the handle that will."""
    loop = asyncio.get_running_loop()
    at = loop.time() + max(0.0, delay)
    if pending is not None:
        if loop.time() <= pending.when() <= at:
            return pending
        pending.cancel()
    return loop.call_at(at, event.set)
