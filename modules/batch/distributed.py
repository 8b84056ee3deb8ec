"""The distributed engine: the same parts, scored as tasks on a Dask distributed cluster.

Each task is :func:`modules.batch.engine.score_part` on one part: the Dask worker reads its part
from the input, verifies and loads the bundle once per worker process, and writes the part file.
Input, output and the bundle must be at the same paths on every worker (a shared filesystem), and
workers need edgefleet installed in their environment. Run workers with ``--nthreads 1`` (one
model per process, as on a device); a worker lost mid-part is retried elsewhere, and the parts
already written stay done.
"""

from __future__ import annotations

import uuid

from modules.batch.columns import BatchError
from modules.batch.engine import Job, Report, score_part
from modules.batch.plan import Part


def run_dask(job: Job, parts: list[Part], scheduler: str, on_rows: Report) -> int:
    """Score ``parts`` on the cluster at ``scheduler`` (``tcp://host:8786``); returns how many workers it had."""
    try:
        from distributed import Client, as_completed
    except ImportError:
        raise BatchError("the distributed engine needs Dask: pip install 'edgefleet[batch]'") from None
    try:
        client = Client(scheduler, timeout=30)
    except OSError as exc:
        raise BatchError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from None
    with client:
        workers = len(client.scheduler_info()["workers"])
        if not parts:
            return workers
        shared = client.scatter(job, broadcast=True)  # sent to each worker once, not with every task
        run = uuid.uuid4().hex[:8]
        futures = [client.submit(score_part, shared, p, key=f"edgefleet-score-{run}-{p.index}", pure=False) for p in parts]
        try:
            for fut in as_completed(futures):
                on_rows(fut.result())  # the task's own exception (a BatchError names the column) comes out here
        finally:
            client.cancel(futures)
        return workers
