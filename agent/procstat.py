"""Resident memory and CPU of the agent and its workers, read from Linux's /proc.

The agent needs three numbers per process; reading them from /proc keeps psutil (and the
ctypes it loads, about 1.2 MB of the agent's ~40 MB budget) out of the daemon. Where there is
no /proc (macOS while developing), psutil is used if it is installed.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
HAVE_PROC = os.path.exists("/proc/self/stat")


class ProcessGone(Exception):
    """The process exited (or is a zombie waiting to be reaped)."""


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of ``pid`` (default: this process)."""
    if not HAVE_PROC:
        return _psutil(pid).memory_info().rss
    try:
        with open(f"/proc/{pid or 'self'}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        raise ProcessGone(pid) from None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid``; ProcessGone for an exited or zombie process."""
    if not HAVE_PROC:
        proc = _psutil(pid)
        t = proc.cpu_times()
        return t.user + t.system
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read()
        # the command name is in parentheses and may hold spaces: split after its closing one
        fields = text[text.rindex(b")") + 2:].split()
    except (OSError, ValueError):
        raise ProcessGone(pid) from None
    if fields[0] == b"Z":
        raise ProcessGone(pid)
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime (fields 14 and 15 of stat)


@dataclass
class CpuMeter:
    """CPU % of one process between successive :meth:`percent` calls (the first call says 0)."""

    pid: int
    _last: tuple[float, float] | None = field(default=None, repr=False)

    def percent(self) -> float:
        now, used = time.monotonic(), cpu_seconds(self.pid)
        last, self._last = self._last, (now, used)
        if last is None or now <= last[0]:
            return 0.0
        return 100.0 * (used - last[1]) / (now - last[0])


def _psutil(pid: int | None) -> Any:
    import psutil  # only without /proc

    try:
        return psutil.Process(pid)
    except psutil.Error:
        raise ProcessGone(pid) from None
