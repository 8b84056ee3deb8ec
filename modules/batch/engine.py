"""Scoring parts: the worker side (load the verified bundle once per process, stream a part through it)
and the embedded engine, a pool of processes on this machine.

A worker reads its own part of the input and writes its own part file, so only part numbers and
row counts cross between processes, never rows.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from modules.batch.columns import Feed
from modules.batch.pipeline import score_parts
from modules.batch.plan import Part, Source

if TYPE_CHECKING:
    from concurrent.futures import ProcessPoolExecutor

Report = Callable[[int], None]


@dataclass
class Job:
    """All a worker needs to score any part of the job: no rows, so it is small enough to send with each task."""

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
    sample_every: int = 0  # > 0: every k-th row's inputs and outputs go to the part's monitoring sample (monitor.py)

    def __post_init__(self) -> None:
        cols = list(self.keep) + [c for f in self.feeds for c in f.columns]
        self.read_columns = list(dict.fromkeys(cols))


def load_checked(files: Path, manifest: Any, threads: int = 1) -> Any:
    """Load a verified bundle's files, the model on ``threads`` cores (ONNX Runtime, LiteRT), and run its
    health check. Its threads do not spin between calls: the reading and writing threads need the cores."""
    from modules.runners import health_check, load_runner, load_sample

    config = {"threads": threads} if threads != 1 and manifest.runtime != "python" else None
    runner = load_runner(files, manifest, config, spin=False)
    health_check(runner, load_sample(files, manifest))
    return runner


def load_verified(bundle_dir: Path, root: dict[str, Any] | None) -> Any:
    """Verify a bundle as a device does (signature, expiry, every file's hash), load it, run its health check."""
    import json

    from modules.bundle import FILES_DIR, ROOT_FILE, verify_pulled
    from protocol.signing import load_trusted_root

    pinned = root if root is not None else json.loads((bundle_dir / ROOT_FILE).read_bytes())
    return load_checked(bundle_dir / FILES_DIR, verify_pulled(bundle_dir, load_trusted_root(pinned)))


_runners: dict[tuple[str, str], Any] = {}
_runners_lock = threading.Lock()  # a Dask worker may run tasks in threads


def runner_for(job: Job) -> Any:
    return _runner(job.bundle_dir, job.root, job.digest)


def _runner(bundle_dir: str, root: dict[str, Any] | None, digest: str) -> Any:
    key = (bundle_dir, digest)
    with _runners_lock:
        if key not in _runners:
            _runners[key] = load_verified(Path(bundle_dir), root)
        return _runners[key]


def _preload(bundle_dir: str, root: dict[str, Any] | None, digest: str) -> None:
    """A worker loads the runner before its first part (a failure is reported by that part, with its context)."""
    _runner(bundle_dir, root, digest)


def score_part(job: Job, part: Part, report: Report | None = None) -> int:
    """Score one part into its part file; returns its row count. Raises BatchError naming what is wrong."""
    return score_parts(job, [part], runner_for(job), report)


# --- the embedded engines: this process, or a process pool ------------------------------------------


class InlineEngine:
    """Scores in this process, with the bundle it has verified already (once): no worker to start, nothing
    imported twice. The model uses ``threads`` cores (onnxruntime's own threads); reading and writing
    overlap it in two threads (pipeline.py). The default where processes would gain nothing: two cores or
    fewer, or a single part to score."""

    def __init__(self, threads: int) -> None:
        self.threads = max(1, threads)
        self.runner: Any = None

    def load(self, bundle_dir: Path, manifest: Any) -> None:
        from modules.bundle import FILES_DIR

        self.runner = load_checked(bundle_dir / FILES_DIR, manifest, self.threads)

    def run(self, job: Job, parts: list[Part], on_rows: Report) -> None:
        if parts:
            score_parts(job, parts, self.runner, on_rows)

    def close(self) -> None:
        self.runner = None


# --- the process pool ------------------------------------------------------------

_queue: Any = None
WARM_MODULES = ["modules.batch.engine", "modules.runners", "onnxruntime"]  # what the fork server imports once


def _exit_with(owner: int) -> None:
    """Exit when the job's process is gone, even by kill -9: a worker must not write parts for a dead job.

    Neither the pipes (a worker holds both ends of its queues) nor the parent-death signal (its parent
    is the fork server) tell it, so a thread waits on the owner's pidfd.
    """
    import select

    try:
        fd = os.pidfd_open(owner)
    except ProcessLookupError:
        os._exit(1)
    except (AttributeError, OSError):  # no pidfd (not Linux >= 5.3): look every half second
        while True:
            time.sleep(0.5)
            try:
                os.kill(owner, 0)
            except ProcessLookupError:
                os._exit(1)
    select.select([fd], [], [])  # readable once the owner has exited
    os._exit(1)


def _init_worker(queue: Any, owner: int) -> None:
    global _queue
    threading.Thread(target=_exit_with, args=(owner,), name="owner-watch", daemon=True).start()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the owner's to handle
    _queue = queue


def _pool_task(job: Job, part: Part) -> int:
    return score_part(job, part, _queue.put)


class LocalEngine:
    """The embedded engine: up to ``workers`` processes on this machine, each loading the runner once.

    Workers fork from a fresh server process that imported the scoring code once: as safe as spawning
    (no fork of this process and its threads) without every worker importing NumPy, pyarrow and
    onnxruntime again, or the command line's own ``__main__``. The server starts (and imports) while
    the caller verifies the bundle; the first worker forks and loads the bundle (:meth:`preload`) while
    it plans the job; no more workers start than there are parts.
    """

    def __init__(self, workers: int) -> None:
        import multiprocessing as mp
        from multiprocessing import forkserver

        self.workers = max(1, workers)
        self.ctx = mp.get_context("forkserver")
        self.ctx.set_forkserver_preload(WARM_MODULES)  # a module that does not import is skipped
        self.queue = self.ctx.SimpleQueue()
        self.pool: ProcessPoolExecutor | None = None
        self._ensure_running = forkserver.ensure_running
        self._warm = threading.Thread(target=self._start, name="score-warm", daemon=True)
        self._warm.start()
        self._preloading: threading.Thread | None = None

    def _start(self) -> None:
        from concurrent.futures import ProcessPoolExecutor

        self._ensure_running()
        self.pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=self.ctx, initializer=_init_worker,
                                        initargs=(self.queue, os.getpid()))

    def preload(self, bundle_dir: str, root: dict[str, Any] | None, digest: str) -> None:
        """The first worker forks and loads the (verified) bundle now, while the caller plans the job; the others
        fork when there are parts for them (a one-part job keeps one worker).

        From a thread: forking a worker through the server blocks its caller (a round trip to the server).
        """

        def load() -> None:
            self._warm.join()
            assert self.pool is not None
            self.pool.submit(_preload, bundle_dir, root, digest)

        self._preloading = threading.Thread(target=load, name="score-preload", daemon=True)
        self._preloading.start()

    def run(self, job: Job, parts: list[Part], on_rows: Report) -> None:
        """Score ``parts``; raise the first failure (the parts already written stay done)."""
        from concurrent.futures import FIRST_EXCEPTION, wait

        if not parts:
            return
        self._warm.join()
        if self._preloading is not None:
            self._preloading.join()
        assert self.pool is not None
        reader = threading.Thread(target=self._drain, args=(on_rows,), name="score-progress", daemon=True)
        reader.start()
        try:
            futures = [self.pool.submit(_pool_task, job, p) for p in parts]
            finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for fut in futures:
                if fut in finished and fut.exception() is not None:
                    raise fut.exception()  # type: ignore[misc]
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.queue.put(None)
            reader.join()

    def _drain(self, on_rows: Report) -> None:
        while (n := self.queue.get()) is not None:
            on_rows(n)

    def close(self) -> None:
        self._warm.join()
        if self._preloading is not None:
            self._preloading.join()
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
