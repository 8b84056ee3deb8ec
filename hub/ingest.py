"""Batched writes for the hot paths (telemetry, sampled data): one transaction per batch, off the MQTT thread."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from hub import telemetry as store
from hub.db import Database, dumps
from protocol.messages import DataBatch, TelemetryBatch
from protocol.topics import Channel, device_wildcard

log = logging.getLogger("edgefleet.hub.ingest")

TELEMETRY = "telemetry"  # queue tag: the rows are packed batches (hub/telemetry.py), not SQL parameters
DATA_SQL = ("INSERT OR IGNORE INTO data_records (device, seq, idx, ts, module, version, input, output)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
_STOP = object()

# Telemetry and collected data may be spread over several ingest processes through one MQTT 5
# shared-subscription group: the broker hands each message to one member.
INGEST_CHANNELS = (Channel.TELEMETRY, Channel.DATA)
SHARE_GROUP = "edgefleet-ingest"


def shared_wildcard(channel: Channel) -> str:
    return f"$share/{SHARE_GROUP}/{device_wildcard(channel)}"


def data_rows(msg: DataBatch) -> list[tuple[Any, ...]]:
    return [(msg.device, msg.seq, i, r.ts, r.module, r.version, dumps(r.input), dumps(r.output))
            for i, r in enumerate(msg.records)]


class BatchWriter:
    """Collects rows for up to ``flush_s`` or ``batch_rows`` rows, then commits them together.

    A telemetry batch is one row (its points packed) plus its rollups. ``INSERT OR IGNORE``
    on the (device, seq, …) keys drops replays (QoS 1 redelivery, an agent resending its
    outbox), so ``on_telemetry_rows`` hears only new points.
    """

    def __init__(self, db: Database, flush_s: float, batch_rows: int,
                 on_telemetry_rows: Callable[[int], None] = lambda n: None) -> None:
        self.db, self.flush_s, self.batch_rows = db, flush_s, batch_rows
        self.on_telemetry_rows = on_telemetry_rows
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="hub-ingest-writer", daemon=True)
        self._pending = 0  # row sets queued but not yet committed
        self._cond = threading.Condition()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued, then end the thread."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout)

    def telemetry(self, msg: TelemetryBatch) -> None:
        packed = store.pack(msg)  # here, on the caller's thread: the writer thread only talks to SQLite
        if packed is not None:
            self._put(TELEMETRY, [packed])

    def data(self, rows: list[tuple[Any, ...]]) -> None:
        self._put(DATA_SQL, rows)

    def _put(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        with self._cond:
            self._pending += 1
        self._queue.put((sql, rows))

    def wait_idle(self, timeout: float) -> bool:
        """True once everything queued so far is committed."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending == 0, timeout)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            try:
                first = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            batch: list[tuple[str, list[tuple[Any, ...]]]] = []
            rows = 0
            deadline = time.monotonic() + self.flush_s
            item = first
            while True:
                if item is _STOP:
                    stopping = True
                    break
                batch.append(item)
                rows += len(item[1])
                remaining = deadline - time.monotonic()
                if rows >= self.batch_rows or remaining <= 0:
                    break
                try:
                    item = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if batch:
                self._write(batch)
                with self._cond:
                    self._pending -= len(batch)
                    self._cond.notify_all()

    def _write(self, batch: list[tuple[str, list[tuple[Any, ...]]]]) -> None:
        try:
            with self.db.transaction() as tx:
                for sql, rows in batch:
                    if sql is not TELEMETRY:
                        tx.conn.executemany(sql, rows)
                new_telemetry = store.store(tx.conn, (p for sql, rows in batch if sql is TELEMETRY for p in rows))
            self.on_telemetry_rows(new_telemetry)
        except Exception:  # a failed batch must not end the writer; the rows are lost and said so
            log.exception("could not write a batch of %d row set(s)", len(batch))
