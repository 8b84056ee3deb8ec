"""Table columns <-> a module's tensors: which columns feed which input, and how outputs become columns.

Inputs (``--columns x=a,b,c`` overrides the defaults):

* an input of shape ``[N]`` reads the column of its name;
* an input of shape ``[N, k]`` reads the list column of its name, else, when it is the module's
  only input, all the table's columns in order (there must be ``k``);
* a python module without a declared signature gets every column (or those ``--columns`` names)
  as a 1-D array keyed by column name, or a ``[N, k]`` array for a ``--columns`` group.

Outputs: ``[N]`` and ``[N, 1]`` become one column of the output's name, ``[N, k]`` the columns
``name_0 … name_{k-1}``. Every refusal names the column.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from protocol.manifest import TensorSpec


class BatchError(ValueError):
    """A job that cannot run as asked; the text says why, naming the column, file or row."""


def parse_columns(pairs: list[str]) -> dict[str, list[str]]:
    """``["x=a,b,c", "mask=m"]`` -> ``{"x": ["a", "b", "c"], "mask": ["m"]}``."""
    out: dict[str, list[str]] = {}
    for pair in pairs:
        name, sep, cols = pair.partition("=")
        names = [c.strip() for c in cols.split(",") if c.strip()]
        if not sep or not name or not names:
            raise BatchError(f"--columns {pair!r} is not INPUT=COL[,COL...]")
        out[name.strip()] = names
    return out


@dataclass(frozen=True)
class Feed:
    """One model input: the columns it reads, its dtype and whether it is a matrix of scalar columns."""

    name: str
    columns: tuple[str, ...]
    dtype: str | None  # None: as the column is (python modules without a signature)
    matrix: bool  # [N, k] from k scalar columns (or a list column when len(columns) == 1 and listed)
    list_column: bool = False


def _is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_decimal(t)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _check_type(column: str, t: pa.DataType, spec: TensorSpec) -> None:
    want = np.dtype(spec.dtype) if spec.dtype != "str" else None
    if want is not None and want.kind in "biuf" and not _is_numeric(t):
        raise BatchError(f"column {column!r} is {t}; model input {spec.name!r} takes {spec.dtype}")


def plan_feeds(specs: list[TensorSpec], schema: pa.Schema, columns: dict[str, list[str]]) -> list[Feed]:
    """Which columns feed which input, checked against the table's schema before any row is read."""
    names = schema.names

    def need(column: str, spec_name: str) -> pa.DataType:
        if column not in names:
            raise BatchError(f"column {column!r} (for model input {spec_name!r}) is not in the input; it has: "
                             f"{', '.join(names)}")
        return schema.field(column).type

    if not specs:  # a python module without a signature: every column, or the --columns groups
        if not columns:
            return [Feed(n, (n,), None, False) for n in names]
        feeds = []
        for name, cols in columns.items():
            for c in cols:
                need(c, name)
            feeds.append(Feed(name, tuple(cols), None, len(cols) > 1 or name != cols[0]))
        return feeds
    unknown = sorted(set(columns) - {s.name for s in specs})
    if unknown:
        raise BatchError(f"--columns names {unknown}, which the module does not take; its inputs: "
                         f"{', '.join(s.name for s in specs)}")
    feeds = []
    for spec in specs:
        rank = len(spec.shape)
        width = spec.shape[1] if rank == 2 else None
        cols = columns.get(spec.name)
        if rank == 2 and cols is None and spec.name in names and _is_list(schema.field(spec.name).type):
            _check_type(spec.name, schema.field(spec.name).type.value_type, spec)
            feeds.append(Feed(spec.name, (spec.name,), spec.dtype, True, list_column=True))
            continue
        if cols is None:
            if rank == 2 and len(specs) == 1:
                cols = list(names)
            elif rank <= 1:
                cols = [spec.name]
            else:
                raise BatchError(f"model input {spec.name!r} has shape {spec.shape}: name its columns with "
                                 f"--columns {spec.name}=COL,COL,...")
        if rank == 2 and width is not None and len(cols) != width:
            raise BatchError(f"model input {spec.name!r} takes {width} features; {len(cols)} columns would feed it "
                             f"({', '.join(cols)}): choose them with --columns {spec.name}=COL,...")
        if rank <= 1 and len(cols) != 1:
            raise BatchError(f"model input {spec.name!r} has shape {spec.shape}: it reads one column, not {len(cols)}")
        for c in cols:
            _check_type(c, need(c, spec.name), spec)
        feeds.append(Feed(spec.name, tuple(cols), spec.dtype, rank == 2))
    return feeds


def _numpy(column: str, arr: pa.ChunkedArray | pa.Array, dtype: str | None, row0: int) -> np.ndarray:
    if arr.null_count:
        import pyarrow.compute as pc  # only here and for list columns: it takes longer to import than pyarrow

        first = pc.index(pc.is_null(arr), True).as_py()
        raise BatchError(f"column {column!r} has {arr.null_count} empty value(s) in rows {row0}…{row0 + len(arr) - 1} "
                         f"(first at row {row0 + first})")
    values = arr.to_numpy(zero_copy_only=False)
    if dtype is None:
        return values
    try:
        return values.astype(dtype, copy=False)
    except (TypeError, ValueError) as exc:
        raise BatchError(f"column {column!r} does not convert to {dtype}: {exc}") from None


def feed_arrays(feeds: list[Feed], batch: pa.RecordBatch, row0: int) -> dict[str, np.ndarray]:
    """The model's inputs for one batch; ``row0`` is the job-wide number of its first row (for errors)."""
    out: dict[str, np.ndarray] = {}
    n = batch.num_rows
    for feed in feeds:
        if feed.list_column:
            import pyarrow.compute as pc

            col = batch.column(feed.columns[0])
            lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
            if n and (lengths != lengths[0]).any():
                raise BatchError(f"column {feed.columns[0]!r} holds lists of different lengths")
            flat = _numpy(feed.columns[0], pc.list_flatten(col), feed.dtype, row0)
            out[feed.name] = flat.reshape(n, -1)
        elif feed.matrix:
            first = _numpy(feed.columns[0], batch.column(feed.columns[0]), feed.dtype, row0)
            matrix = np.empty((n, len(feed.columns)), dtype=first.dtype)
            matrix[:, 0] = first
            for j, c in enumerate(feed.columns[1:], 1):
                matrix[:, j] = _numpy(c, batch.column(c), feed.dtype or str(first.dtype), row0)
            out[feed.name] = matrix
        else:
            out[feed.name] = _numpy(feed.columns[0], batch.column(feed.columns[0]), feed.dtype, row0)
    return out


def _column(arr: np.ndarray) -> pa.Array:
    """A 1-D array as an Arrow column: numbers without a copy (nor pa.array's detour through numpy.ma)."""
    if arr.dtype.kind in "iuf" and arr.dtype.isnative and arr.flags.c_contiguous:
        return pa.Array.from_buffers(pa.from_numpy_dtype(arr.dtype), len(arr), [None, pa.py_buffer(arr)])
    return pa.array(arr)


def output_columns(outputs: dict[str, Any], rows: int) -> dict[str, pa.Array]:
    """The outputs of one batch as columns; each must have one row per input row."""
    cols: dict[str, pa.Array] = {}
    for name, value in outputs.items():
        arr = np.asarray(value)
        if arr.ndim == 0 or arr.shape[0] != rows:
            got = "a scalar" if arr.ndim == 0 else f"{arr.shape[0]} rows"
            raise BatchError(f"output {name!r} has {got} for {rows} input rows: batch scoring needs one output row "
                             "per input row")
        if arr.dtype.kind == "O" and arr.ndim == 1 and all(isinstance(v, dict) for v in arr.tolist()):
            # one map per row (skl2onnx's ZipMap: {class: probability}): a column per key, as a 2-D output's
            by_row = arr.tolist()
            for key in dict.fromkeys(k for row in by_row for k in row):
                cols[f"{name}_{key}"] = pa.array([row.get(key) for row in by_row])
            continue
        if arr.ndim > 2:
            arr = arr.reshape(rows, -1)
        if arr.ndim == 1 or arr.shape[1] == 1:
            cols[name] = _column(arr.reshape(rows))
        else:
            for j in range(arr.shape[1]):
                cols[f"{name}_{j}"] = _column(np.ascontiguousarray(arr[:, j]))
    return cols


def kept_columns(keep: str, schema: pa.Schema) -> list[str]:
    """``all``, ``none`` or a comma-separated list of input columns to copy into the output."""
    if keep == "all":
        return list(schema.names)
    if keep == "none":
        return []
    cols = [c.strip() for c in keep.split(",") if c.strip()]
    missing = [c for c in cols if c not in schema.names]
    if missing:
        raise BatchError(f"--keep names column(s) {missing} that the input does not have; it has: {', '.join(schema.names)}")
    return cols
