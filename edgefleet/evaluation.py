"""``edgefleet model evaluate``: run a registered model version on a labelled table, here, and measure it.

The model's files are downloaded from the hub (each checked against its registered sha256) and
loaded with the runner a device uses (``modules.runners``), so the metrics are those of the very
files a bundle would carry. Tables: CSV (header row) or Parquet (needs pyarrow).
"""

from __future__ import annotations

import csv
import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.client import HubClient
from edgefleet.evalmetrics import EvaluationError, Predictions, as_labels, compute, predictions
from modules.runners import Runner, load_model_file

BATCH_ROWS = 4096


@dataclass
class Table:
    columns: dict[str, np.ndarray]
    rows: int
    sha256: str
    name: str


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1024 * 1024):
            h.update(block)
    return h.hexdigest()


def read_table(path: Path) -> Table:
    """All columns of a CSV or Parquet file (evaluation sets fit in memory; scoring at scale is ``edgefleet score``)."""
    if path.suffix.lower() in (".parquet", ".pq"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise EvaluationError("reading Parquet needs pyarrow: pip install pyarrow") from None
        table = pq.read_table(path)
        columns = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    else:
        with path.open(newline="") as f:
            reader = csv.reader(f)
            try:
                header = next(reader)
            except StopIteration:
                raise EvaluationError(f"{path} is empty: a CSV needs a header row") from None
            values: list[list[str]] = [[] for _ in header]
            for lineno, row in enumerate(reader, start=2):
                if len(row) != len(header):
                    raise EvaluationError(f"{path}:{lineno} has {len(row)} fields, the header {len(header)}")
                for i, v in enumerate(row):
                    values[i].append(v)
        columns = {name: np.asarray(col) for name, col in zip(header, values)}
    rows = len(next(iter(columns.values()))) if columns else 0
    return Table(columns, rows, file_sha256(path), path.name)


def model_inputs(runner: Runner, table: Table, features: list[str]) -> dict[str, np.ndarray]:
    """The model's inputs from the table: one column per input when the inputs are named like columns,
    else every feature column stacked into the one input's rows; a model declaring no inputs gets the
    feature columns by name."""
    specs = runner.inputs
    if not specs:  # a Python entry script that declares no signature: run(inputs) gets the feature columns by name
        return {f: table.columns[f] for f in features}
    if all(s.name in table.columns for s in specs):
        return {s.name: _column(table.columns[s.name], s.dtype, len(s.shape)) for s in specs}
    if len(specs) != 1:
        raise EvaluationError(f"the model has inputs {[s.name for s in specs]}: name the table's columns after them")
    spec = specs[0]
    missing = [f for f in features if f not in table.columns]
    if missing:
        raise EvaluationError(f"feature column(s) {missing} are not in the table (it has {sorted(table.columns)})")
    width = spec.shape[1] if len(spec.shape) == 2 else None
    if width is not None and width != len(features):
        raise EvaluationError(f"input {spec.name!r} takes {width} features per row; the table gives {len(features)} "
                              f"({', '.join(features)}): choose them with --feature")
    try:
        x = np.stack([table.columns[f].astype(np.float64) for f in features], axis=1).astype(spec.dtype)
    except (TypeError, ValueError) as exc:
        raise EvaluationError(f"feature columns are not all numbers: {exc}") from None
    return {spec.name: x}


def _column(col: np.ndarray, dtype: str, rank: int) -> np.ndarray:
    arr = col.astype(dtype) if dtype != "str" else col.astype(str)
    return arr.reshape(-1, 1) if rank == 2 else arr


def run_model(runner: Runner, inputs: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """Predict in batches of ``BATCH_ROWS`` and join the outputs."""
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, rows, BATCH_ROWS):
        out = runner.predict({k: v[start:start + BATCH_ROWS] for k, v in inputs.items()})
        for k, v in out.items():
            parts.setdefault(k, []).append(np.asarray(v))
    return {k: np.concatenate(v) for k, v in parts.items()}


def load_version(c: HubClient, name: str, version: int, into: Path) -> Runner:
    """Download ``name:version``'s files into ``into`` (checked by sha256) and load the main one in its runtime."""
    model = c.get(f"/api/v1/models/{name}/versions/{version}")
    for f in model["files"]:
        target = into / Path(f["path"]).name
        c.download(f"/api/v1/models/{name}/versions/{version}/files/{f['path']}", target)
        if file_sha256(target) != f["sha256"]:
            raise EvaluationError(f"{name}:{version} file {f['path']} arrived with a different sha256")
    return load_model_file(into / Path(model["files"][0]["path"]).name, model["framework"])


def evaluate_version(c: HubClient, name: str, version: int, table: Table, label: str, features: list[str] | None,
                     metrics: list[str], output: str | None = None, decision: float = 0.5,
                     pos_label: Any = 1) -> dict[str, float]:
    """Metrics of ``name:version`` on ``table``, computed by running it here."""
    if label not in table.columns:
        raise EvaluationError(f"label column {label!r} is not in the table (it has {sorted(table.columns)})")
    feats = features or [k for k in table.columns if k != label]
    with tempfile.TemporaryDirectory(prefix="edgefleet-eval-") as tmp:
        runner = load_version(c, name, version, Path(tmp))
        outputs = run_model(runner, model_inputs(runner, table, feats), table.rows)
    p: Predictions = predictions(outputs, output, decision)
    return compute(metrics, as_labels(table.columns[label]), p, pos_label)
