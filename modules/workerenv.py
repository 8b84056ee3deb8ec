"""The module worker's process setup and its shared memory operations (``agent/worker.py`` imports them).

Kept apart from the worker's loop, which is run by path and capped in size (tests/test_architecture.py).
"""

from __future__ import annotations

import resource
import signal
import sys
from collections import deque
from typing import Any

from modules.shmregions import Regions


def apply_limits(limits: dict[str, Any]) -> None:
    """Address-space and CPU-time caps for this process, where the OS supports them."""
    mem_mb, cpu_s = int(limits.get("memory_mb") or 0), int(limits.get("cpu_seconds") or 0)
    if mem_mb > 0 and hasattr(resource, "RLIMIT_AS"):
        resource.setrlimit(resource.RLIMIT_AS, (mem_mb * 2**20, mem_mb * 2**20))
    if cpu_s > 0 and hasattr(resource, "RLIMIT_CPU"):
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))


def die_with_parent() -> None:
    # ctypes here, not at the top: only the worker process needs it
    import ctypes

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass  # best effort: stdin EOF still ends the worker


def shm_op(regions: Regions, header: dict[str, Any], fds: deque[int]) -> dict[str, Any]:
    """``shm_attach`` (the region's descriptor came with the frame: ``fds``' first) or ``shm_detach``: the answer."""
    app, name = str(header["app"]), str(header["name"])
    if header["op"] == "shm_detach":
        regions.detach(app, name)
        return {"ok": True}
    if not fds:
        return {"ok": False, "kind": "input", "error": f"region {name!r}: no file descriptor came with the frame"}
    regions.attach(app, name, fds.popleft(), int(header["offset"]), int(header["size"]))
    return {"ok": True}
