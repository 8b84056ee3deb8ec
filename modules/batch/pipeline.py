"""Scoring a run of parts in one process, with reading, scoring and writing overlapped.

Three stages, each in its own thread, joined by queues one batch deep: a reader streams the parts'
rows (pyarrow decodes without the GIL), the caller's thread feeds the model (onnxruntime runs without
it too) and a writer encodes and writes the part files. Memory stays a handful of batches whatever
the input's size. A part file is committed (written beside, fsynced, renamed) only after its last
batch, and after its monitoring sample: a failure or a kill leaves only whole parts behind, and a
bad batch still lets the parts before it be committed.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from modules.batch.columns import BatchError, feed_arrays, output_columns
from modules.batch.io import PartWriter, read_part
from modules.batch.monitor import Sampler
from modules.batch.plan import Part
from modules.errors import InputError

if TYPE_CHECKING:
    from collections.abc import Callable

    from modules.batch.engine import Job

DEPTH = 1  # batches waiting between two stages
POLL_S = 0.2  # how soon a stage blocked on a full or empty queue notices that another one failed
BATCH, END, DONE, FAILED = "batch", "end", "done", "failed"


class _Stopped(Exception):
    """Another stage failed: this one gives up quietly (the failure is raised by the caller)."""


def _put(q: queue.Queue[Any], item: tuple[Any, ...], stop: threading.Event) -> None:
    while True:
        if stop.is_set():
            raise _Stopped
        try:
            q.put(item, timeout=POLL_S)
            return
        except queue.Full:
            continue


def _get(q: queue.Queue[Any], stop: threading.Event) -> tuple[Any, ...]:
    while True:
        if stop.is_set():
            raise _Stopped
        try:
            return q.get(timeout=POLL_S)  # type: ignore[no-any-return]
        except queue.Empty:
            continue


def _read(job: Job, parts: list[Part], out: queue.Queue[Any], stop: threading.Event) -> None:
    try:
        for part in parts:
            source = job.sources[part.source]
            for batch in read_part(source, part, job.read_columns, job.batch_rows, job.schema):
                _put(out, (BATCH, part, batch), stop)
            _put(out, (END, part, None), stop)
        _put(out, (DONE, None, None), stop)
    except _Stopped:
        pass
    except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread, which raises it
        try:
            _put(out, (FAILED, None, exc), stop)
        except _Stopped:
            pass


def _commit(sample: Sampler, writer: PartWriter) -> int:
    sample.commit()  # the part's sample first: a part present always has its sample
    return writer.commit()


class _Writer:
    """The writing stage: part files from the scored batches. A finished part is committed (its footer
    written, fsynced, renamed) by a second thread while the next part is written: an fsync can take tens
    of milliseconds on a busy disk."""

    def __init__(self, job: Job, report: Callable[[int], None] | None, stop: threading.Event) -> None:
        self.job, self.report, self.stop = job, report, stop
        self.items: queue.Queue[Any] = queue.Queue(DEPTH)
        self.error: BaseException | None = None
        self.rows = 0
        self.thread = threading.Thread(target=self._run, name="score-write", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        writer: PartWriter | None = None
        committing: list[Any] = []
        with ThreadPoolExecutor(1, thread_name_prefix="score-commit") as commits:
            try:
                while True:
                    kind, part, value = _get(self.items, self.stop)
                    if kind in (DONE, FAILED):  # FAILED: scoring failed after the parts handed over before it
                        break
                    if writer is None:
                        writer = PartWriter(Path(self.job.parts_dir) / part.name)
                    if kind == BATCH:
                        writer.write(value)
                        if self.report is not None:
                            self.report(value.num_rows)
                        continue
                    committing.append(commits.submit(_commit, value, writer))
                    writer = None
                    while len(committing) > 1:  # one part behind at most
                        self.rows += committing.pop(0).result()
                for fut in committing:
                    self.rows += fut.result()
            except _Stopped:
                pass
            except BaseException as exc:  # noqa: BLE001 - raised by the caller's thread
                self.error = exc
                self.stop.set()
            finally:
                if writer is not None:
                    writer.abort()


def _scored(job: Job, runner: Any, batch: pa.RecordBatch, row: int) -> tuple[dict[str, Any], Any, pa.RecordBatch]:
    """(model inputs, outputs, the output batch) for one batch whose first row is job row ``row``."""
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
    return inputs, out, pa.RecordBatch.from_arrays(arrays, names=[*job.keep, *cols])


def score_parts(job: Job, parts: list[Part], runner: Any, report: Callable[[int], None] | None = None) -> int:
    """Score ``parts`` in order, each into its part file; returns the rows written. Raises the first failure
    (a BatchError names what is wrong); the parts committed before it stay done."""
    if not parts:
        return 0
    stop = threading.Event()
    reads: queue.Queue[Any] = queue.Queue(DEPTH)
    reader = threading.Thread(target=_read, args=(job, parts, reads, stop), name="score-read", daemon=True)
    reader.start()
    writer = _Writer(job, report, stop)
    sample: Sampler | None = None
    row = parts[0].row_start
    try:
        while True:
            kind, part, value = _get(reads, stop)
            if kind == FAILED:
                raise value
            if kind == DONE:
                _put(writer.items, (DONE, None, None), stop)
                break
            if sample is None:
                sample, row = Sampler(Path(job.parts_dir), part, job.sample_every), part.row_start
            if kind == END:
                _put(writer.items, (END, part, sample), stop)
                sample = None
                continue
            inputs, out, scored = _scored(job, runner, value, row)
            sample.add(row, inputs, out)
            row += value.num_rows
            _put(writer.items, (BATCH, part, scored), stop)
        writer.thread.join()
    except BaseException:
        if not stop.is_set():  # this thread failed: the parts it finished are committed first, then all stop
            try:
                _put(writer.items, (FAILED, None, None), stop)
            except _Stopped:
                pass
            writer.thread.join()
        stop.set()
        raise
    finally:
        if stop.is_set():
            writer.thread.join()
            reader.join()
            if sample is not None:
                sample.abort()
        if writer.error is not None:
            raise writer.error
    return writer.rows
