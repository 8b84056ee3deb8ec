"""Planning a batch job: cut the input into numbered parts, and decide what a resumed job still has to do.

Pure code. A *unit* is the smallest piece of an input file a worker can read alone: a Parquet row
group, or a run of CSV lines between two byte offsets found by :func:`csv_boundaries`. A *part*
is one or more consecutive units of one file; each part becomes one output file, written whole
or not at all, so the set of part files present is the job's checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

JOB_VERSION = 1
PART_PREFIX = "part-"


@dataclass(frozen=True)
class Source:
    """One input file as planned: ``units`` rows per unit; CSV also ``offsets`` (byte start of each unit, then the end)."""

    path: str
    size: int
    mtime_ns: int
    format: str  # "parquet" or "csv"
    units: tuple[int, ...]
    offsets: tuple[int, ...] = ()

    @property
    def rows(self) -> int:
        return sum(self.units)


@dataclass(frozen=True)
class Part:
    index: int
    source: int  # index into the job's sources
    first: int  # first unit
    count: int  # number of units
    row_start: int  # the job-wide number of its first row (error messages, progress)
    rows: int

    @property
    def name(self) -> str:
        return part_name(self.index)


def part_name(index: int) -> str:
    return f"{PART_PREFIX}{index:05d}.parquet"


def plan_parts(sources: list[Source], part_rows: int) -> list[Part]:
    """Consecutive units of each file, grouped until a part holds at least ``part_rows`` rows."""
    if part_rows < 1:
        raise ValueError("part_rows must be at least 1")
    parts: list[Part] = []
    row = 0
    for s, source in enumerate(sources):
        first, rows = 0, 0
        for u, n in enumerate(source.units):
            rows += n
            if rows >= part_rows or u == len(source.units) - 1:
                parts.append(Part(len(parts), s, first, u - first + 1, row, rows))
                row += rows
                first, rows = u + 1, 0
    return parts


def pending(parts: list[Part], present: Iterable[str]) -> list[Part]:
    """The parts whose output file is not there yet (part files appear only complete: see the writer)."""
    done = set(present)
    return [p for p in parts if p.name not in done]


def job_record(sources: list[Source], parts: list[Part], bundle: str, options: dict[str, Any]) -> dict[str, Any]:
    """What a job is: resuming is allowed only into a job with the very same record."""
    return {"v": JOB_VERSION, "bundle": bundle, "options": options,
            "sources": [asdict(s) | {"units": list(s.units), "offsets": list(s.offsets)} for s in sources],
            "parts": len(parts)}


def resume_refusal(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """Why a job found in the output cannot be continued by this one (None: it can)."""
    if saved.get("v") != current["v"]:
        return "it was written by another version of edgefleet score"
    if saved.get("bundle") != current["bundle"]:
        return f"it scored with bundle {str(saved.get('bundle'))[:12]}…, this job with {current['bundle'][:12]}…"
    if saved.get("options") != current["options"]:
        changed = sorted(k for k in set(saved.get("options", {})) | set(current["options"])
                         if saved.get("options", {}).get(k) != current["options"].get(k))
        return f"its options differ ({', '.join(changed)})"
    old = {s["path"]: s for s in saved.get("sources", [])}
    for source in current["sources"]:
        before = old.get(source["path"])
        if before is None:
            return f"input {source['path']} is new"
        if (before["size"], before["mtime_ns"]) != (source["size"], source["mtime_ns"]):
            return f"input {source['path']} changed since (size or modification time)"
    if len(old) != len(current["sources"]):
        return "input files were removed since"
    if saved != current:
        return "it was planned differently"
    return None


def csv_boundaries(blocks: Iterable[bytes], unit_rows: int) -> tuple[int, list[int], list[int]]:
    """Scan a CSV's bytes: (end of the header line, byte offsets where units start plus the end, rows per unit).

    A unit is ``unit_rows`` lines (the last may be shorter). Lines end at ``\\n`` (``\\r\\n`` too), as
    pyarrow reads CSV by default (no newlines inside quoted values).
    """
    header_end = -1
    offsets: list[int] = []
    units: list[int] = []
    pos = 0  # bytes seen before this block
    in_unit = 0  # complete lines of the current unit
    last_byte = b"\n"
    for block in blocks:
        if not block:
            continue
        nl = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 10)
        start = 0
        if header_end < 0:
            if len(nl) == 0:
                pos += len(block)
                last_byte = block[-1:]
                continue
            header_end = pos + int(nl[0]) + 1
            offsets.append(header_end)
            start = 1
        ends = nl[start:]
        while len(ends):
            need = unit_rows - in_unit
            if len(ends) < need:
                in_unit += len(ends)
                break
            cut = pos + int(ends[need - 1]) + 1
            units.append(unit_rows)
            offsets.append(cut)
            in_unit = 0
            ends = ends[need:]
        pos += len(block)
        last_byte = block[-1:]
    if header_end < 0:  # no newline at all: a header and nothing else
        return pos, [pos], []
    if last_byte != b"\n" and pos > offsets[-1]:
        in_unit += 1  # a last line without its newline
    if in_unit:
        units.append(in_unit)
        offsets.append(pos)
    return header_end, offsets, units
