"""Batch I/O: find and describe the input files, stream a part's rows, write part files whole, merge them.

Memory stays constant: a worker holds one batch of rows (and, reading Parquet, one row group's
column chunks), whatever the size of the input.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from modules.batch.columns import BatchError
from modules.batch.plan import Part, Source, csv_boundaries

SCAN_BLOCK = 8 * 1024 * 1024
CSV_BLOCK = 4 * 1024 * 1024


def input_files(path: Path) -> list[Path]:
    """The files a job reads: one CSV or Parquet file, or every Parquet file under a directory (sorted)."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.parquet") if p.is_file()
                       and not any(part.startswith(("_", ".")) for part in p.relative_to(path).parts))
        if not files:
            raise BatchError(f"directory {path} holds no .parquet files")
        return files
    if not path.is_file():
        raise BatchError(f"input {path} does not exist")
    return [path]


def file_format(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    return "csv" if suffixes and suffixes[-1] in (".csv", ".tsv", ".txt") else "parquet"


def describe_input(path: Path, unit_rows: int) -> Source:
    """Stat and cut one input file into units (Parquet: its row groups; CSV: runs of ``unit_rows`` lines)."""
    st = path.stat()
    fmt = file_format(path)
    if fmt == "parquet":
        try:
            meta = pq.ParquetFile(path).metadata
        except (pa.ArrowInvalid, OSError) as exc:
            raise BatchError(f"{path} is not a Parquet file: {exc}") from None
        units = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
        return Source(str(path.resolve()), st.st_size, st.st_mtime_ns, fmt, units)

    def blocks() -> Iterator[bytes]:
        with path.open("rb") as f:
            while block := f.read(SCAN_BLOCK):
                yield block

    _, offsets, units = csv_boundaries(blocks(), unit_rows)
    return Source(str(path.resolve()), st.st_size, st.st_mtime_ns, fmt, tuple(units), tuple(offsets))


def read_schema(source: Source) -> pa.Schema:
    """The input's schema: Parquet's own; a CSV's as pyarrow infers it from the first block."""
    if source.format == "parquet":
        return pq.read_schema(source.path)
    try:
        with pacsv.open_csv(source.path, read_options=pacsv.ReadOptions(block_size=CSV_BLOCK)) as reader:
            return reader.schema
    except pa.ArrowInvalid as exc:
        raise BatchError(f"{source.path}: {exc}") from None


class _Range(io.RawIOBase):
    """Bytes ``start..end`` of a file, as a file: pyarrow's CSV reader streams one part through it."""

    def __init__(self, path: str, start: int, end: int) -> None:
        self._f = open(path, "rb")  # noqa: SIM115 - closed with this object
        self._f.seek(start)
        self._left = end - start

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        n = min(len(buf), self._left)
        if n <= 0:
            return 0
        got = self._f.readinto(memoryview(buf)[:n])
        self._left -= got or 0
        return got or 0

    def close(self) -> None:
        self._f.close()
        super().close()


_CSV_COLUMN = re.compile(r"In CSV column #(\d+): (?:Row #\d+: )?(.*)", re.S)


def _first_unreadable(source: Source, part: Part, names: list[str], column: str, typ: pa.DataType) -> int | None:
    """The part's first row whose ``column`` does not read as ``typ`` (only on the error path: reads the part again)."""
    raw = _Range(source.path, source.offsets[part.first], source.offsets[part.first + part.count])
    try:
        table = pacsv.read_csv(io.BufferedReader(raw, CSV_BLOCK),
                               read_options=pacsv.ReadOptions(column_names=names, block_size=CSV_BLOCK),
                               convert_options=pacsv.ConvertOptions(column_types={column: pa.string()},
                                                                    include_columns=[column]))
    except pa.ArrowInvalid:
        return None
    finally:
        raw.close()
    for i, text in enumerate(table.column(0).to_pylist()):
        try:
            pa.array([text]).cast(typ)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return i
    return None


def _csv_error(exc: Exception, source: Source, part: Part, schema: pa.Schema) -> BatchError:
    text, names, where = str(exc), schema.names, Path(source.path).name
    m = _CSV_COLUMN.search(text)
    if m:
        col, why = int(m.group(1)), m.group(2).strip()
        name = names[col] if col < len(names) else f"#{col}"
        bad = _first_unreadable(source, part, names, name, schema.field(name).type) if col < len(names) else None
        at = (f"row {part.row_start + bad}, line {part.row_start + bad + 2} of {where}" if bad is not None
              else f"{where} rows {part.row_start}…{part.row_start + part.rows - 1}")
        return BatchError(f"column {name!r}: {why} ({at})")
    return BatchError(f"{where} rows {part.row_start}…{part.row_start + part.rows - 1}: {text}")


def read_part(source: Source, part: Part, columns: list[str], batch_rows: int,
              schema: pa.Schema) -> Iterator[pa.RecordBatch]:
    """Stream a part's rows, ``columns`` only, in batches of at most ``batch_rows``, typed as ``schema``."""
    if source.format == "parquet":
        pf = pq.ParquetFile(source.path)
        groups = list(range(part.first, part.first + part.count))
        yield from pf.iter_batches(batch_size=batch_rows, row_groups=groups, columns=columns)
        return
    names = schema.names
    raw = _Range(source.path, source.offsets[part.first], source.offsets[part.first + part.count])
    try:
        reader = pacsv.open_csv(
            io.BufferedReader(raw, CSV_BLOCK),
            read_options=pacsv.ReadOptions(column_names=names, block_size=CSV_BLOCK),
            convert_options=pacsv.ConvertOptions(column_types={n: schema.field(n).type for n in columns},
                                                 include_columns=columns))
        with reader:
            while True:
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    return
                for start in range(0, batch.num_rows, batch_rows):
                    yield batch.slice(start, batch_rows)
    except pa.ArrowInvalid as exc:
        raise _csv_error(exc, source, part, schema) from None
    finally:
        raw.close()


def writer_options(schema: pa.Schema) -> dict[str, Any]:
    """Parquet writer options: no dictionary for floating-point columns (model outputs are nearly all distinct:
    building the dictionary and falling back to plain cost more than the rest of a job, for a larger file)."""
    return {"use_dictionary": [f.name for f in schema if not (pa.types.is_floating(f.type) or pa.types.is_nested(f.type))]}


class PartWriter:
    """Writes one part file beside its final name, then renames it: a part file exists whole or not at all."""

    def __init__(self, final: Path) -> None:
        self.final = final
        self.tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        self._writer: pq.ParquetWriter | None = None
        self.rows = 0

    def write(self, batch: pa.RecordBatch) -> None:
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.tmp, batch.schema, **writer_options(batch.schema))
        self._writer.write_batch(batch)
        self.rows += batch.num_rows

    def commit(self, schema: pa.Schema | None = None) -> int:
        if self._writer is None:  # a part with no rows still gets its (empty) file: it is done
            self._writer = pq.ParquetWriter(self.tmp, schema or pa.schema([]))
        self._writer.close()
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())  # the rename below must not land before the data
        os.replace(self.tmp, self.final)
        return self.rows

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self.tmp.unlink(missing_ok=True)


def merge_parts(parts: list[Path], output: Path) -> int:
    """Concatenate part files in order into ``output`` (Parquet or CSV by its extension), written then renamed."""
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    rows = 0
    writer: Any = None
    schema: pa.Schema | None = None
    try:
        for path in parts:
            pf = pq.ParquetFile(path)
            if pf.metadata.num_rows == 0 and pf.schema_arrow.names == []:
                continue
            for batch in pf.iter_batches(batch_size=65536):
                if writer is None:
                    schema = batch.schema
                    writer = (pacsv.CSVWriter(str(tmp), schema) if file_format(output) == "csv"
                              else pq.ParquetWriter(tmp, schema, **writer_options(schema)))
                if batch.schema != schema:
                    batch = batch.cast(schema)
                writer.write_batch(batch)
                rows += batch.num_rows
        if writer is None:
            tmp.write_bytes(b"")
        else:
            writer.close()
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return rows
