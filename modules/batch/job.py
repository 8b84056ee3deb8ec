"""A batch job on disk: where its parts and checkpoint live, starting or resuming it, and finishing it.

Output ``out.parquet`` / ``out.csv`` (a file): parts go to ``out.parquet.parts/`` and are merged
into the file at the end, then that directory goes. Any other output path is a directory of part
files (``part-00000.parquet`` …, a Parquet dataset) with the job record ``_edgefleet_job.json``.
A part file appears only complete (written beside, then renamed), so after a kill -9 the parts
present are done and the others are scored again: no row twice, none missing.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from modules.batch.columns import BatchError, Feed, kept_columns, plan_feeds
from modules.batch.engine import Job
from modules.batch.io import describe_input, file_format, input_files, merge_parts, read_schema
from modules.batch.monitor import SAMPLE_PREFIX
from modules.batch.plan import PART_PREFIX, Part, job_record, part_name, pending, plan_parts, resume_refusal
from modules.batch.remote import INPUT_DIR
from protocol.manifest import Manifest

FILE_SUFFIXES = (".parquet", ".csv")


@dataclass
class Layout:
    output: Path
    single: bool  # one output file, merged from the parts at the end
    work: Path  # the parts, the job record, the pulled bundle

    @property
    def record(self) -> Path:
        return self.work / ("job.json" if self.single else "_edgefleet_job.json")

    @property
    def bundle(self) -> Path:
        return self.work / ("bundle" if self.single else "_edgefleet_bundle")


def layout_for(output: Path) -> Layout:
    output = output.resolve()
    if output.suffix.lower() in FILE_SUFFIXES:
        return Layout(output, True, output.with_name(output.name + ".parts"))
    return Layout(output, False, output)


def _discard(layout: Layout) -> None:
    """``--overwrite``: remove an earlier job's files (only those: a directory is never removed wholesale)."""
    if layout.single:
        layout.output.unlink(missing_ok=True)
    if not layout.work.is_dir():
        return
    if not layout.record.exists() and any(layout.work.iterdir()):
        raise BatchError(f"{layout.work} holds files of no edgefleet job: remove them yourself or choose another output")
    for path in [*layout.work.glob(f"{PART_PREFIX}*.parquet"), *layout.work.glob(f".{PART_PREFIX}*.tmp"),
                 *layout.work.glob(f"{SAMPLE_PREFIX}*"), *layout.work.glob(f".{SAMPLE_PREFIX}*"), layout.record]:
        path.unlink(missing_ok=True)
    shutil.rmtree(layout.bundle, ignore_errors=True)
    shutil.rmtree(layout.work / INPUT_DIR, ignore_errors=True)
    if layout.single and not any(layout.work.iterdir()):
        layout.work.rmdir()


def claim(layout: Layout, overwrite: bool) -> None:
    """Refuse to write over something that is not this job's, unless told to; start afresh with ``overwrite``."""
    if overwrite:
        _discard(layout)
    if layout.record.exists():
        return  # a job was here: prepare() decides whether this one may continue it
    if layout.single and layout.output.exists():
        raise BatchError(f"{layout.output} already exists: remove it or give --overwrite")
    if not layout.single and layout.output.exists() and any(layout.output.iterdir()):
        raise BatchError(f"{layout.output} is a non-empty directory that holds no edgefleet job: "
                         "choose another output or give --overwrite")
    layout.work.mkdir(parents=True, exist_ok=True)


def _csv_typed(schema: pa.Schema, feeds: list[Feed]) -> pa.Schema:
    """CSV types are guessed from the first block; a model's columns are read as its dtype instead, so a
    later 1.5 in a column of integers reads, and a typo fails on its own line, naming the column."""
    want: dict[str, pa.DataType] = {}
    for feed in feeds:
        if feed.dtype is not None:
            kind = np.dtype(feed.dtype).kind
            typ = pa.float64() if kind == "f" else pa.int64() if kind in "iu" else pa.bool_() if kind == "b" else None
            want |= {c: typ for c in feed.columns if typ is not None}
    return pa.schema([f.with_type(want[f.name]) if f.name in want
                      else f.with_type(pa.string()) if pa.types.is_null(f.type) else f for f in schema])


def _loose(schema: pa.Schema) -> pa.Schema:
    """For planning a CSV's feeds: a text column may still hold numbers past the first block."""
    return pa.schema([f.with_type(pa.float64()) if pa.types.is_string(f.type) or pa.types.is_null(f.type) else f
                      for f in schema])


def prepare(input_path: Path, layout: Layout, manifest: Manifest, bundle_dir: Path, root: dict[str, Any] | None, *,
            columns: dict[str, list[str]], keep: str, part_rows: int, batch_rows: int) -> tuple[Job, list[Part], list[Part]]:
    """Plan (or re-plan) the job and check it against the record in the output: (job, all parts, parts to do)."""
    files = input_files(input_path)
    sources = [describe_input(f, part_rows) for f in files]
    schema = read_schema(sources[0])
    for source in sources[1:]:
        other = read_schema(source)
        for f in schema:
            if f.name not in other.names or other.field(f.name).type != f.type:
                got = other.field(f.name).type if f.name in other.names else "missing"
                raise BatchError(f"column {f.name!r} is {f.type} in {Path(sources[0].path).name} but {got} in "
                                 f"{Path(source.path).name}: the files of a job must share their schema")
    if sources[0].format == "csv":
        feeds = plan_feeds(manifest.inputs, _loose(schema), columns)
        schema = _csv_typed(schema, feeds)
    else:
        feeds = plan_feeds(manifest.inputs, schema, columns)
    kept = kept_columns(keep, schema)
    parts = plan_parts(sources, part_rows)
    record = job_record(sources, parts, manifest.digest(),
                        {"columns": columns, "keep": kept, "part_rows": part_rows,
                         "output": "csv" if layout.single and file_format(layout.output) == "csv" else "parquet"})
    if layout.record.exists():
        saved = json.loads(layout.record.read_text())
        why = resume_refusal(saved, record)
        if why is not None:
            raise BatchError(f"{layout.output} holds another job ({why}): give --overwrite to start afresh")
    else:
        tmp = layout.record.with_name(layout.record.name + ".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, layout.record)
    for stale in [*layout.work.glob(f".{PART_PREFIX}*.tmp"), *layout.work.glob(f".{SAMPLE_PREFIX}*.tmp")]:
        # a killed worker's unfinished part (or sample)
        stale.unlink(missing_ok=True)
    present = [p.name for p in layout.work.glob(f"{PART_PREFIX}*.parquet")]
    job = Job(str(bundle_dir), root, sources, schema, feeds, kept, str(layout.work), batch_rows, manifest.digest())
    return job, parts, pending(parts, present)


def finish(layout: Layout, parts: list[Part]) -> int:
    """All parts are done: merge them into the output file, or leave the directory of parts; returns the rows."""
    paths = [layout.work / part_name(p.index) for p in parts]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise BatchError(f"parts {missing[:3]} are missing: run the same command again to finish the job")
    if layout.single:
        rows = merge_parts(paths, layout.output)
        shutil.rmtree(layout.work)
        return rows
    import pyarrow.parquet as pq

    shutil.rmtree(layout.bundle, ignore_errors=True)
    shutil.rmtree(layout.work / INPUT_DIR, ignore_errors=True)  # a URL input's copy
    return sum(pq.ParquetFile(p).metadata.num_rows for p in paths)
