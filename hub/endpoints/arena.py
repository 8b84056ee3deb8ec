"""Request bodies in shared memory: the gateway receives a large body straight into it, a worker reads it there.

Without it a camera-sized body crosses two sockets: the client's into the gateway, then the gateway's into a
worker (a 3 MB image: about 1 ms of socket copies on each side of that second hop, measured in
bench/tensor_bench.py). With it the gateway's ``recv`` writes the body once into a slot of this arena (a
``memfd``), the frame to the worker names the slot (offset, size), and the worker decodes the tensor in
place from its own read-only mapping.

Workers get the arena through a descriptor reopened read-only (``/proc/self/fd``), and the memfd is sealed
once the gateway has mapped it (``F_SEAL_FUTURE_WRITE``, ``F_SEAL_SHRINK``, ``F_SEAL_GROW``, Linux 5.1+): no
new writable mapping, no ``write``, no resize, even through a descriptor reopened read-write. Operator code
can read the bodies but never change one, nor shrink the file under the gateway. Where the seals cannot be
set the arena is off and every body goes inline. A worker of one version can
read the bodies sent to the endpoint's other versions (one arena per endpoint: the version is picked after
the body arrived); they are the same operator's versions, and mirroring shows them the traffic anyway.

Slots are first-fit in a sorted free list; a body that does not fit (the arena is busy or the body is over
its size) is received into memory of its own and sent inline, as before, and counted. A slot is freed when
every answer owed for its request (the version's, and a mirror's) has come back or failed.
"""

from __future__ import annotations

import bisect
import fcntl
import mmap
import os
from dataclasses import dataclass
from typing import Any

ARENA_BYTES = 128 * 2**20  # virtual (but counted in a worker's address-space cap): a memfd's pages exist only once written
ALIGN = 64  # the tensor after an OIP v2 JSON header starts on a cache line (NumPy's and ONNX Runtime's fast paths)
MIN_BODY = 64 * 1024  # smaller bodies are read with the head: inline
F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x10)  # Linux 5.1; Python 3.11's fcntl lacks the name
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_SEAL


@dataclass
class _Slot:
    start: int  # where the slot begins in the arena, and its length (body, alignment padding)
    length: int
    body: memoryview  # the body's bytes inside it
    at: int  # the body's offset in the arena
    owed: int = 0  # answers still to come back before the slot may be reused


class Arena:
    def __init__(self, size: int = ARENA_BYTES) -> None:
        self.size = size
        self._fd = os.memfd_create("edgefleet-bodies", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self._fd, size)
        self._view = memoryview(mmap.mmap(self._fd, size))
        try:
            fcntl.fcntl(self._fd, fcntl.F_ADD_SEALS, SEALS)
            self.on = True
        except OSError:  # an older kernel: a worker could write into the bodies, so none goes there
            self.on = False
        self._free: list[tuple[int, int]] = [(0, size)] if self.on else []  # (offset, length), sorted by offset
        self._used: dict[int, _Slot] = {}  # by id() of the body's view (the dict holds the view: the id stays its own)
        self.read_only_fd = os.open(f"/proc/self/fd/{self._fd}", os.O_RDONLY | os.O_CLOEXEC)
        self.inline = 0  # large bodies that did not fit and went inline
        self.placed = 0  # bodies received into the arena

    def alloc(self, length: int, headers: dict[str, str]) -> Any:
        """A writable buffer of ``length`` bytes for a body (``RequestReader``'s allocator), in the arena when it fits."""
        if length < MIN_BODY:
            return bytearray(length)
        hlen = headers.get("inference-header-content-length", "")
        pad = (-int(hlen)) % ALIGN if hlen.isdigit() and int(hlen) < length else 0  # the tensor, aligned
        want = length + pad + ALIGN
        i = next((k for k, (_, n) in enumerate(self._free) if n >= want), None)
        if i is None:
            self.inline += 1
            return bytearray(length)
        start, n = self._free[i]
        if n == want:
            del self._free[i]
        else:
            self._free[i] = (start + want, n - want)
        at = start + (-start) % ALIGN + pad
        view = self._view[at:at + length]
        self._used[id(view)] = _Slot(start, want, view, at)
        self.placed += 1
        return view

    def _slot(self, body: Any) -> _Slot | None:
        slot = self._used.get(id(body))
        return slot if slot is not None and slot.body is body else None

    def ref(self, body: Any) -> tuple[int, int] | None:
        """(offset, size) of a body held in the arena, None for one held elsewhere."""
        slot = self._slot(body)
        return (slot.at, len(body)) if slot is not None else None

    def hold(self, body: Any, answers: int = 1) -> bool:
        """``answers`` more are owed for ``body`` before its slot may be reused; False: it is not in the arena."""
        slot = self._slot(body)
        if slot is not None:
            slot.owed += answers
        return slot is not None

    def release(self, body: Any) -> None:
        """One answer owed for ``body`` came back or failed; the last one frees its slot."""
        slot = self._slot(body)
        if slot is None:
            return
        slot.owed -= 1
        if slot.owed <= 0:
            self._free_slot(slot)

    def discard(self, body: Any) -> None:
        """A body received into the arena whose request never reached a worker (refused, or a route without one)."""
        slot = self._slot(body)
        if slot is not None and slot.owed == 0:
            self._free_slot(slot)

    def _free_slot(self, slot: _Slot) -> None:
        del self._used[id(slot.body)]
        bisect.insort(self._free, (slot.start, slot.length))
        merged: list[tuple[int, int]] = []
        for start, n in self._free:
            if merged and merged[-1][0] + merged[-1][1] == start:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((start, n))
        self._free = merged

    def status(self) -> dict[str, Any]:
        return {"bytes": self.size, "in_use": sum(s.length for s in self._used.values()), "slots": len(self._used),
                "bodies": self.placed, "inline_large_bodies": self.inline, "on": self.on}

    def close(self) -> None:
        """Close the descriptors; the mapping goes when the last body viewing it does."""
        self._used.clear()
        os.close(self._fd)
        os.close(self.read_only_fd)
