"""Endpoint telemetry: the gateway's per-version counts and latency, stored beside the devices' telemetry.

Every ``interval_s`` the gateway turns what it answered into one ``TelemetryBatch`` for the device id
``endpoint:NAME`` (as sampled data records already use) and writes it with the hub's own telemetry
store (hub/ingest/telemetry.py), so ``/api/v1/metrics/series?endpoint=NAME``, ``edgefleet metrics series
--endpoint NAME`` and the per-model-version series count cloud traffic the same way as devices'.

Latency is measured at the gateway (queueing and batching included), per request; a 4xx (bad key,
bad input) never reached the model and is not an inference; a 5xx is an error.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from hub.ingest.telemetry import pack, store
from hub.store import Database, StoreError, open_database
from protocol.messages import LatencyMs, TelemetryBatch, TelemetryPoint

log = logging.getLogger("edgefleet.endpoint.telemetry")


class EndpointTelemetry:
    """Accumulates per-version results on the event loop; :meth:`flush` writes them (call it off the loop)."""

    def __init__(self, endpoint: str, db_path: str) -> None:
        self.device = f"endpoint:{endpoint}"
        self.db_path = db_path
        self._window: dict[str, tuple[list[float], list[int]]] = {}  # label -> (latencies ms, [errors])
        self._seq = 0
        self._db: Database | None = None

    def record(self, label: str, status: int, latency_ms: float) -> None:
        if status < 500 and status != 200:
            return  # refused before the model: not an inference
        latencies, errors = self._window.setdefault(label, ([], [0]))
        latencies.append(latency_ms)
        if status >= 500:
            errors[0] += 1

    def take(self, now: float | None = None) -> TelemetryBatch | None:
        """This interval's batch (None when nothing was answered); the window starts again empty."""
        window, self._window = self._window, {}
        if not window:
            return None
        now = time.time() if now is None else now
        points = []
        for label, (latencies, errors) in sorted(window.items()):
            module, _, version = label.rpartition(":")
            p50, p95, p99 = np.percentile(np.asarray(latencies), [50, 95, 99]).tolist()
            points.append(TelemetryPoint(ts=now, module=module, version=int(version), inferences=len(latencies),
                                         errors=errors[0], latency_ms=LatencyMs(p50=p50, p95=p95, p99=p99)))
        # unique across gateway restarts: milliseconds since the epoch, strictly increasing here
        self._seq = max(self._seq + 1, int(now * 1000))
        return TelemetryBatch(device=self.device, seq=self._seq, ts=now, points=points)

    def flush(self) -> int:
        """Write the current window; the points written. Blocking (SQLite): run it in a thread."""
        batch = self.take()
        if batch is None:
            return 0
        packed = pack(batch)
        if packed is None:
            return 0
        try:
            if self._db is None:
                self._db = open_database(self.db_path)
            with self._db.transaction() as tx:
                n = store(tx, [packed])
        except StoreError as exc:  # losing one interval's counts must not stop scoring; say so
            log.error("endpoint telemetry for %s not written: %s", self.device, exc)
            return 0
        return n

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
