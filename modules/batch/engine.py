"""Scoring parts: the worker side (load the verified bundle once per process, stream a part through it)
and the embedded engine, a pool of processes on this machine.

A worker reads its own part of the input and writes its own part file, so only part numbers and
row counts cross between processes, never rows.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from modules.batch.columns import BatchError, Feed, feed_arrays, output_columns
from modules.batch.io import PartWriter, read_part
from modules.batch.plan import Part, Source
from modules.errors import InputError

Report = Callable[[int], None]


@dataclass
class Job:
    """All a worker needs to score any part of the job (pickled to every worker once)."""

    bundle_dir: str
    root: dict[str, Any] | None  # the pinned root envelope; None: the root the bundle ships (trust on first use)
    sources: list[Source]
    schema: pa.Schema
    feeds: list[Feed]
    keep: list[str]
    parts_dir: str
    batch_rows: int = 65536
    digest: str = ""
    read_columns: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        cols = list(self.keep) + [c for f in self.feeds for c in f.columns]
        self.read_columns = list(dict.fromkeys(cols))


def load_verified(bundle_dir: Path, root: dict[str, Any] | None) -> Any:
    """Verify a bundle as a device does (signature, expiry, every file's hash), load it, run its health check."""
    import json

    from modules.bundle import FILES_DIR, ROOT_FILE, verify_pulled
    from modules.runners import health_check, load_runner, load_sample
    from protocol.signing import load_trusted_root

    pinned = root if root is not None else json.loads((bundle_dir / ROOT_FILE).read_bytes())
    manifest = verify_pulled(bundle_dir, load_trusted_root(pinned))
    runner = load_runner(bundle_dir / FILES_DIR, manifest)
    health_check(runner, load_sample(bundle_dir / FILES_DIR, manifest))
    return runner


_runners: dict[tuple[str, str], Any] = {}
_runners_lock = threading.Lock()  # a Dask worker may run tasks in threads


def runner_for(job: Job) -> Any:
    key = (job.bundle_dir, job.digest)
    with _runners_lock:
        if key not in _runners:
            _runners[key] = load_verified(Path(job.bundle_dir), job.root)
        return _runners[key]


def score_part(job: Job, part: Part, report: Report | None = None) -> int:
    """Score one part into its part file; returns its row count. Raises BatchError naming what is wrong."""
    runner = runner_for(job)
    source = job.sources[part.source]
    writer = PartWriter(Path(job.parts_dir) / part.name)
    row = part.row_start
    try:
        for batch in read_part(source, part, job.read_columns, job.batch_rows, job.schema):
            n = batch.num_rows
            inputs = feed_arrays(job.feeds, batch, row)
            try:
                out = runner.predict(inputs)
            except InputError as exc:
                raise BatchError(f"rows {row}…{row + n - 1}: {exc}") from None
            except Exception as exc:  # the module's own failure: say where, keep its words
                raise BatchError(f"the model failed on rows {row}…{row + n - 1}: {exc!r}") from None
            cols = output_columns(out, n)
            clash = sorted(set(cols) & set(job.keep))
            if clash:
                raise BatchError(f"output column(s) {clash} would replace input column(s) of the same name: "
                                 "leave them out with --keep")
            arrays = [batch.column(c) for c in job.keep] + list(cols.values())
            writer.write(pa.RecordBatch.from_arrays(arrays, names=[*job.keep, *cols]))
            row += n
            if report is not None:
                report(n)
        return writer.commit()
    except BaseException:
        writer.abort()
        raise


# --- the embedded engine: a process pool ------------------------------------------------------------

_job: Job | None = None
_queue: Any = None


def _die_with_parent() -> None:
    """A kill -9 of the job must not leave its workers writing (Linux: PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return


def _init_worker(job: Job, queue: Any, parent: int) -> None:
    global _job, _queue
    _die_with_parent()
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _job, _queue = job, queue


def _pool_task(part: Part) -> int:
    assert _job is not None
    return score_part(_job, part, _queue.put)


def run_local(job: Job, parts: list[Part], workers: int, on_rows: Report) -> None:
    """Score ``parts`` with ``workers`` processes, each loading the runner once; raise the first failure."""
    if not parts:
        return
    ctx = mp.get_context("spawn")  # no fork of a process that has threads (progress display, pyarrow)
    queue = ctx.SimpleQueue()

    def drain() -> None:
        while True:
            n = queue.get()
            if n is None:
                return
            on_rows(n)

    reader = threading.Thread(target=drain, name="score-progress", daemon=True)
    reader.start()
    pool = ProcessPoolExecutor(max_workers=max(1, min(workers, len(parts))), mp_context=ctx,
                               initializer=_init_worker, initargs=(job, queue, os.getpid()))
    try:
        futures = [pool.submit(_pool_task, p) for p in parts]
        finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for fut in futures:
            if fut in finished and fut.exception() is not None:
                raise fut.exception()  # type: ignore[misc]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        queue.put(None)
        reader.join()
