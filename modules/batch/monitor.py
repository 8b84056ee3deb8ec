"""A batch job's monitoring sample: every k-th row's inputs and outputs, for the hub's drift reports.

Each worker keeps the sample of its part beside the part file (``_edgefleet_sample-00000.jsonl``,
written whole before the part, so a resumed job has the sample of every part done); :func:`collect`
gathers them when the job ends. A record is one batch's sampled rows in the layout devices send
(``{"input": {tensor: rows}, "output": {tensor: rows}}``, the first dimension the rows), so the hub
compares them with the model's baseline exactly as it does devices' collected data.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from modules.batch.plan import Part

SAMPLE_PREFIX = "_edgefleet_sample-"
DEFAULT_ROWS = 5000  # enough for stable drift statistics (the hub reads at most 50 000 rows per window)


def sample_every(total_rows: int, rows: int = DEFAULT_ROWS) -> int:
    """The step k that keeps about ``rows`` of ``total_rows`` (every row when there are fewer)."""
    return max(1, math.ceil(total_rows / max(rows, 1)))


def _rows(value: Any, idx: np.ndarray) -> list[Any]:
    return np.asarray(value)[idx].tolist()


class Sampler:
    """The sample of one part; nothing at all when ``every`` is 0."""

    def __init__(self, parts_dir: Path, part: Part, every: int) -> None:
        self.every = every
        self.path = parts_dir / f"{SAMPLE_PREFIX}{part.index:05d}.jsonl"
        self.tmp = parts_dir / f".{self.path.name}.tmp"
        self.file = self.tmp.open("w") if every > 0 else None

    def add(self, first_row: int, inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
        """The rows of a batch starting at job row ``first_row`` whose number is a multiple of ``every``."""
        if self.file is None:
            return
        n = len(next(iter(inputs.values()))) if inputs else 0
        idx = np.arange((-first_row) % self.every, n, self.every)
        if idx.size == 0:
            return
        record = {"input": {k: _rows(v, idx) for k, v in inputs.items()},
                  "output": {k: _rows(v, idx) for k, v in outputs.items()}}
        self.file.write(json.dumps(record, default=str) + "\n")

    def commit(self) -> None:
        if self.file is not None:
            self.file.close()
            os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if self.file is not None:
            self.file.close()
            self.tmp.unlink(missing_ok=True)


def collect(parts_dir: Path, remove: bool = True) -> list[dict[str, Any]]:
    """Every part's sample records, in part order; the sample files go unless ``remove`` is false."""
    out: list[dict[str, Any]] = []
    for path in sorted(parts_dir.glob(f"{SAMPLE_PREFIX}*.jsonl")):
        out += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if remove:
            path.unlink()
    return out


def sample_rows(records: list[dict[str, Any]]) -> int:
    """How many rows the records hold."""
    return sum(len(next(iter(r["input"].values()), [])) for r in records)
