"""Sampled request inputs and outputs into the hub's ``data_records`` table, beside device-collected data.

Workers choose the samples (:class:`Sampler`) and send them with their answers; the gateway writes
them (:class:`Collector`): a sandboxed worker cannot reach the hub's database, and the gateway, not
the worker, names the endpoint, module and version of each row.

Endpoint rows use ``device = "endpoint:NAME"`` and are tagged by two columns (hub/store/schema.py):
``source`` ('device' for rows from devices, 'endpoint' here) and ``endpoint`` (its name);
``module``/``version`` name the module version that answered.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
from typing import Any

from hub.store import open_database

log = logging.getLogger("edgefleet.endpoint.collect")

# sample_id ``endpoint:NAME/REQUEST-ID``: the id the answer carried (x-request-id), for its label later
INSERT = ("INSERT INTO data_records (device, seq, idx, ts, module, version, input, output, source, endpoint, sample_id)"
          " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'endpoint', ?, ?) ON CONFLICT DO NOTHING")


class Sampler:
    """In the worker: keeps ``rate_ppm`` of the requests (every 1e6/rate-th: no RNG on the hot path)."""

    def __init__(self, rate_ppm: int) -> None:
        self.rate = rate_ppm
        self._credit = 0

    def take(self) -> bool:
        self._credit += self.rate
        if self._credit < 1_000_000:
            return False
        self._credit -= 1_000_000
        return True


class Collector:
    """In the gateway: writes one version's samples in batches from a thread."""

    _instances = itertools.count()

    def __init__(self, db_path: str, endpoint: str, module: str, version: int, flush_s: float = 0.5) -> None:
        self.db_path, self.endpoint, self.module, self.version = db_path, endpoint, module, version
        self.flush_s = flush_s
        # (seq, idx) is unique across gateway restarts and versions: seq from the start time (ms), the pid and this
        # collector's number in the process; idx counts its samples
        self._seq = int(time.time() * 1000) * 1_000_000 + (os.getpid() % 1000) * 1000 + next(self._instances) % 1000
        self._n = 0
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="collector", daemon=True)
        self._thread.start()

    def add(self, inputs_json: str, outputs_json: str, request_id: str = "") -> None:
        self._n += 1
        source = f"endpoint:{self.endpoint}"
        self._queue.put((source, self._seq, self._n, time.time(), self.module, self.version, inputs_json,
                         outputs_json, self.endpoint, f"{source}/{request_id}" if request_id else None))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(5)

    def _run(self) -> None:
        db = open_database(self.db_path)  # opening it brings an older hub database's schema up to date
        stopping = False
        while not stopping:
            rows = []
            try:
                item = self._queue.get(timeout=self.flush_s)
                while True:
                    if item is None:
                        stopping = True
                        break
                    rows.append(item)
                    item = self._queue.get_nowait()
            except queue.Empty:
                pass
            if rows:
                try:
                    with db.transaction() as tx:
                        tx.executemany(INSERT, rows)
                except Exception:  # losing samples must not stop scoring; say so
                    log.exception("could not write %d sampled record(s)", len(rows))
        db.close()
