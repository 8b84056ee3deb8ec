"""System shared memory regions as a module worker holds them (the OIP v2 / Triton shared memory extension).

The agent checks a region when an app registers it (``agent.shmem``) and hands the worker an open
file descriptor, never a path: the worker maps it (``mmap``) and reads inputs from it with
``np.frombuffer`` (no copy), writes outputs into it. Regions are kept per app: a request can only
name the regions its own app registered (:meth:`Regions.for_app`).
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from typing import Any

from modules.errors import InputError


@dataclass
class Region:
    """``size`` bytes at ``offset`` of a mapped file."""

    mapped: mmap.mmap
    offset: int
    size: int

    def view(self, what: str, offset: Any, size: Any) -> memoryview:
        """``size`` bytes at ``offset`` inside the region, or InputError naming ``what`` asked for them."""
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise InputError(f"{what}: shared_memory_offset {offset!r} is not a non-negative integer")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0 or offset + size > self.size:
            raise InputError(f"{what}: shared_memory_byte_size {size!r} at offset {offset} does not fit the "
                             f"region's {self.size} bytes")
        start = self.offset + offset
        return memoryview(self.mapped)[start:start + size]


class Regions:
    """The regions mapped in this process, by (app, region name)."""

    def __init__(self) -> None:
        self._by_app: dict[str, dict[str, Region]] = {}

    def attach(self, app: str, name: str, fd: int, offset: int, size: int) -> None:
        """Map ``size`` bytes at ``offset`` of ``fd`` (closed here) as ``app``'s region ``name``."""
        try:
            length = os.fstat(fd).st_size
            if offset < 0 or size <= 0 or offset + size > length:
                raise ValueError(f"region {name!r}: {size} bytes at offset {offset} do not fit its {length}-byte file")
            mapped = mmap.mmap(fd, offset + size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.detach(app, name)
        self._by_app.setdefault(app, {})[name] = Region(mapped, offset, size)

    def detach(self, app: str, name: str) -> None:
        region = self._by_app.get(app, {}).pop(name, None)
        if region is not None:
            try:
                region.mapped.close()
            except BufferError:  # an array still views it (a sampled record in flight): unmapped when it goes
                pass

    def for_app(self, app: str) -> dict[str, Region]:
        return self._by_app.get(app, {})
