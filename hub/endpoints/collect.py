"""Sampled request inputs and outputs into the hub's ``data_records`` table, beside device-collected data.

Endpoint rows use ``device = "endpoint:NAME"`` and are tagged by two columns (hub/store/schema.py):
``source`` ('device' for rows from devices, 'endpoint' here) and ``endpoint`` (its name);
``module``/``version`` name the module version that answered.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Any

import numpy as np

from hub.endpoints.codec import dumps
from hub.store import open_database

log = logging.getLogger("edgefleet.endpoint.collect")

INSERT = ("INSERT INTO data_records (device, seq, idx, ts, module, version, input, output, source, endpoint)"
          " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'endpoint', ?) ON CONFLICT DO NOTHING")



class Collector:
    """Keeps ``rate_ppm`` of the requests it is offered and writes them in batches from a thread."""

    def __init__(self, db_path: str, endpoint: str, module: str, version: int, rate_ppm: int,
                 flush_s: float = 0.5) -> None:
        self.db_path, self.endpoint, self.module, self.version = db_path, endpoint, module, version
        self.rate, self.flush_s = rate_ppm, flush_s
        self._credit = 0  # deterministic sampling: every (1e6 / rate)-th request, no RNG on the hot path
        # (seq, idx) is unique across worker restarts and replicas: seq from the start time (ms) and the pid,
        # idx counts this worker's samples
        self._seq = int(time.time() * 1000) * 1_000_000 + os.getpid() % 1_000_000
        self._n = 0
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="collector", daemon=True)
        self._thread.start()

    def offer(self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        self._credit += self.rate
        if self._credit < 1_000_000:
            return
        self._credit -= 1_000_000
        self._n += 1
        self._queue.put((f"endpoint:{self.endpoint}", self._seq, self._n, time.time(), self.module,
                         self.version, dumps(inputs).decode(), dumps(outputs).decode(), self.endpoint))

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
