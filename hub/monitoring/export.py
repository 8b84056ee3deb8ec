"""Collected data out of the hub, in constant memory: a cursor read in pages, written as it goes.

Formats: ``jsonl`` and ``csv`` (text, streamable over HTTP) and ``parquet``
(pyarrow, one row group per page). Each row carries the model version, the
source (device id or ``endpoint:NAME``) and timestamps.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from hub.errors import NotFound
from hub.monitoring.reports import deployment_devices
from hub.store import Database

PAGE = 20_000
COLUMNS = ["device", "seq", "idx", "ts", "module", "version", "input", "output"]


@dataclass(frozen=True)
class ExportFilter:
    deployment: str | None = None
    endpoint: str | None = None
    module: str | None = None
    version: int | None = None
    since: float | None = None
    until: float | None = None


def _where(db: Database, f: ExportFilter) -> tuple[str, list[Any], frozenset[str] | None]:
    """SQL conditions, their parameters, and the deployment's devices (rows from other sources are left out)."""
    clauses, params = [], []
    module, version, devices = f.module, f.version, None
    if f.deployment:
        row = db.one("SELECT module_name, module_version FROM deployments WHERE name = ?", (f.deployment,))
        if row is None:
            raise NotFound(f"no deployment {f.deployment!r}")
        module, version = row["module_name"], row["module_version"]
        devices = deployment_devices(db, f.deployment)
    if f.endpoint:
        clauses.append("device = ?")
        params.append(f"endpoint:{f.endpoint}")
    if module:
        clauses.append("module = ?")
        params.append(module)
    if version is not None:
        clauses.append("version = ?")
        params.append(version)
    if f.since is not None:
        clauses.append("ts >= ?")
        params.append(f.since)
    if f.until is not None:
        clauses.append("ts < ?")
        params.append(f.until)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params, devices


def count(db: Database, f: ExportFilter) -> int:
    where, params, devices = _where(db, f)
    if devices is None:
        return int(db.scalar(f"SELECT COUNT(*) FROM data_records{where}", params) or 0)
    return sum(r["n"] for r in db.query(f"SELECT device, COUNT(*) AS n FROM data_records{where} GROUP BY device", params)
               if r["device"] in devices)


def pages(db: Database, f: ExportFilter, page: int = PAGE) -> Iterator[list[tuple[Any, ...]]]:
    """Rows in (ts, device, seq, idx) order, ``page`` at a time, by keyset pagination (no OFFSET rescans)."""
    where, params, devices = _where(db, f)
    last: tuple[Any, ...] | None = None
    # A connection of its own: a streaming response resumes this generator on varying threads.
    with db.reader() as conn:
        while True:
            sql = f"SELECT {', '.join(COLUMNS)} FROM data_records{where}"
            args = list(params)
            if last is not None:
                sql += (" AND " if where else " WHERE ") + "(ts, device, seq, idx) > (?, ?, ?, ?)"
                args += [last[3], last[0], last[1], last[2]]
            rows = conn.execute(sql + " ORDER BY ts, device, seq, idx LIMIT ?", [*args, page]).fetchall()
            if not rows:
                return
            kept = rows if devices is None else [r for r in rows if r[0] in devices]
            if kept:
                yield kept
            last = rows[-1]


def jsonl_lines(batches: Iterable[list[tuple[Any, ...]]]) -> Iterator[bytes]:
    """One JSON object per line; input/output stay JSON values, not strings.

    input/output are stored as JSON text already, so they are spliced in, not parsed and re-encoded.
    """
    dumps = json.dumps
    for rows in batches:
        yield "".join(
            f'{{"device":{dumps(d)},"seq":{seq},"idx":{idx},"ts":{ts!r},"module":{dumps(m)},"version":{v},'
            f'"input":{i or "null"},"output":{o or "null"}}}\n'
            for d, seq, idx, ts, m, v, i, o in rows).encode()


def csv_lines(batches: Iterable[list[tuple[Any, ...]]]) -> Iterator[bytes]:
    """CSV with a header; input/output as JSON text."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(COLUMNS)
    for rows in batches:
        writer.writerows(rows)
        yield buf.getvalue().encode()
        buf.seek(0)
        buf.truncate()
    if buf.tell():
        yield buf.getvalue().encode()


def parquet_schema() -> Any:
    import pyarrow as pa

    return pa.schema([("device", pa.string()), ("seq", pa.int64()), ("idx", pa.int64()), ("ts", pa.float64()),
                      ("module", pa.string()), ("version", pa.int64()), ("input", pa.string()),
                      ("output", pa.string())])


def write_parquet_from_csv(stream: BinaryIO, out: Path, on_rows: Callable[[int], None] = lambda n: None) -> int:
    """Convert a CSV export stream to Parquet batch by batch (Arrow's streaming CSV reader): constant memory."""
    try:
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq
    except ImportError:
        raise RuntimeError("parquet export needs pyarrow: pip install 'edgefleet[monitoring]'") from None
    schema = parquet_schema()
    reader = pacsv.open_csv(stream, read_options=pacsv.ReadOptions(block_size=4 << 20),
                            convert_options=pacsv.ConvertOptions(column_types=schema))
    n = 0
    with pq.ParquetWriter(str(out), schema, compression="zstd") as writer:
        for batch in reader:
            writer.write_batch(batch)
            n += batch.num_rows
            on_rows(batch.num_rows)
    return n


class StreamReader(io.RawIOBase):
    """A readable file over an iterator of byte blocks (e.g. an HTTP response body)."""

    def __init__(self, blocks: Iterable[bytes]) -> None:
        self._blocks = iter(blocks)
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf:
            try:
                self._buf = next(self._blocks)
            except StopIteration:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n
