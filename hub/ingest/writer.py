"""Batched writes for the hot paths (telemetry, sampled data): one transaction per batch, off the MQTT thread."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from hub.ingest import telemetry as store
from hub.store import Connection, Database, dumps, now
from protocol.broker_url import parse_broker_url
from protocol.messages import DataBatch, TelemetryBatch
from protocol.topics import Channel, device_wildcard

log = logging.getLogger("edgefleet.hub.ingest")

TELEMETRY = "telemetry"  # queue tag: the rows are packed batches (hub/ingest/telemetry.py), not SQL parameters
DATA_SQL = ("INSERT INTO data_records (device, seq, idx, ts, module, version, input, output)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING")
# a device's records with their sample id (``data_rows``), for labels
DATA_ID_SQL = ("INSERT INTO data_records (device, seq, idx, ts, module, version, input, output, sample_id)"
               " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING")
# the latest label for a sample wins (a correction replaces it)
LABEL_SQL = ("INSERT INTO labels (sample_id, label, ts, source, created_by) VALUES (?, ?, ?, ?, ?)"
             " ON CONFLICT (sample_id) DO UPDATE SET label = excluded.label, ts = excluded.ts, source = excluded.source,"
             " created_by = excluded.created_by")
LAST_SEEN_CHUNK = 500  # ids per UPDATE (under SQLite's bound-parameter limit)
ENROLLED_TTL_S = 5.0  # how long a "not enrolled" answer is trusted before asking the database again

# Telemetry and collected data may be spread over several ingest processes through one MQTT 5
# shared-subscription group: the broker hands each message to one member.
INGEST_CHANNELS = (Channel.TELEMETRY, Channel.DATA)
SHARE_GROUP = "edgefleet-ingest"


def share_group(mqtt_url: str) -> str:
    """The hub's shared-subscription group: a secret derived from its broker password, when it has one.

    Any client may join any group: mosquitto 2.0's ACL file does not check subscriptions (a
    device's ``$share/...`` is granted) and filters only at delivery, after the group picked its
    member, so a device in the hub's group would silently take its share of every device's telemetry.
    A group name only hub logins can compute keeps it out. Without a password (an open broker) there
    is nothing to keep anyone out of, and the plain name is used.
    """
    password = parse_broker_url(mqtt_url).password
    if not password:
        return SHARE_GROUP
    secret = hashlib.sha256(b"edgefleet share group\0" + password.encode()).hexdigest()[:24]
    return f"{SHARE_GROUP}-{secret}"


def shared_wildcard(channel: Channel, group: str = SHARE_GROUP) -> str:
    return f"$share/{group}/{device_wildcard(channel)}"


class EnrolledCache:
    """Is a device enrolled? Asked once per ingested message, so answered from memory where it can be.

    A "yes" is kept until :meth:`forget` (decommission; other processes rely on the broker cutting
    the device's login), a "no" for ``ttl_s`` so a device enrolled a moment ago is let in soon.
    """

    def __init__(self, db: Database, ttl_s: float = ENROLLED_TTL_S) -> None:
        self.db, self.ttl_s = db, ttl_s
        self._known: set[str] = set()
        self._unknown: dict[str, float] = {}

    def __call__(self, device_id: str) -> bool:
        if device_id in self._known:
            return True
        if time.monotonic() < self._unknown.get(device_id, 0.0):
            return False
        if self.db.one("SELECT 1 FROM devices WHERE id = ?", (device_id,)) is not None:
            self._known.add(device_id)
            self._unknown.pop(device_id, None)
            return True
        self._unknown[device_id] = time.monotonic() + self.ttl_s
        return False

    def forget(self, device_id: str) -> None:
        self._known.discard(device_id)


SHADOW_SQL = ("INSERT INTO shadow_points (device, seq, idx, ts, module, version, live_version, mirrored, dropped,"
              " compared, disagreements, errors, p95, live_p95, live_classes, shadow_classes)"
              " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING")


def shadow_rows(msg: TelemetryBatch) -> list[tuple[Any, ...]]:
    """A telemetry batch's shadow comparisons (protocol ShadowPoint), one row each."""
    return [(msg.device, msg.seq, i, p.ts, p.module, p.version, p.live_version, p.mirrored, p.dropped, p.compared,
             p.disagreements, p.errors, p.latency_ms.p95, p.live_latency_ms.p95, dumps(p.live_classes),
             dumps(p.shadow_classes)) for i, p in enumerate(msg.shadow)]


def sample_id(device: str, seq: int, idx: int, request_id: str = "") -> str:
    """A device record's id for labels: ``device/request-id`` when its request carried one, else ``device/seq/idx``."""
    return f"{device}/{request_id}" if request_id else f"{device}/{seq}/{idx}"


def data_rows(msg: DataBatch) -> list[tuple[Any, ...]]:
    return [(msg.device, msg.seq, i, r.ts, r.module, r.version, dumps(r.input), dumps(r.output),
             sample_id(msg.device, msg.seq, i, r.id)) for i, r in enumerate(msg.records)]


def label_rows(msg: DataBatch) -> list[tuple[Any, ...]]:
    """Labels a device sent (its device channel for ground truth), keyed like its records."""
    return [(f"{msg.device}/{lb.id}", dumps(lb.label), lb.ts or msg.ts, "device", msg.device) for lb in msg.labels]


def touch_last_seen(tx: Connection, devices: set[str], t: float | None = None) -> None:
    """A device heard from through telemetry or data is seen now: one UPDATE per batch (per 500 devices)."""
    ids, t = sorted(devices), t if t is not None else now()
    for i in range(0, len(ids), LAST_SEEN_CHUNK):
        chunk = ids[i:i + LAST_SEEN_CHUNK]
        tx.execute(f"UPDATE devices SET last_seen = ? WHERE id IN ({','.join('?' * len(chunk))})", (t, *chunk))


class BatchWriter:
    """Collects rows for up to ``flush_s`` or ``batch_rows`` rows, then commits them together.

    A telemetry batch is one row (its points packed) plus its rollups. ``ON CONFLICT DO NOTHING``
    on the (device, seq, …) keys drops replays (QoS 1 redelivery, an agent resending its
    outbox), so ``on_telemetry_rows`` hears only new points.
    """

    def __init__(self, db: Database, flush_s: float, batch_rows: int,
                 on_telemetry_rows: Callable[[int], None] = lambda n: None) -> None:
        self.db, self.flush_s, self.batch_rows = db, flush_s, batch_rows
        self.on_telemetry_rows = on_telemetry_rows
        self._thread = threading.Thread(target=self._run, name="hub-ingest-writer", daemon=True)
        # Producers only append under the lock; the writer wakes every flush_s, or early for a full batch.
        # (A queue.get per message woke the writer for every message: a thread switch each, on one GIL.)
        self._items: list[tuple[str, list[tuple[Any, ...]]]] = []
        self._rows = 0  # rows in _items
        self._pending = 0  # row sets queued but not yet committed
        self._stopping = False
        self._cond = threading.Condition()
        self.failed = 0  # records the database refused (each alone: its neighbours were stored)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued, then end the thread."""
        if self._thread.is_alive():
            with self._cond:
                self._stopping = True
                self._cond.notify_all()
            self._thread.join(timeout)

    def telemetry(self, msg: TelemetryBatch) -> None:
        packed = store.pack(msg)  # here, on the caller's thread: the writer thread only talks to SQLite
        if packed is not None:
            self._put(TELEMETRY, [packed])
        if msg.shadow:
            self._put(SHADOW_SQL, shadow_rows(msg))

    def data(self, rows: list[tuple[Any, ...]]) -> None:
        self._put(DATA_SQL, rows)

    def data_batch(self, msg: DataBatch) -> None:
        """A device's data message: its sampled records and any labels it carries."""
        if msg.records:
            self._put(DATA_ID_SQL, data_rows(msg))
        if msg.labels:
            self._put(LABEL_SQL, label_rows(msg))

    def _put(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        with self._cond:
            self._items.append((sql, rows))
            self._pending += 1
            self._rows += len(rows)
            if self._rows >= self.batch_rows:
                self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """True once everything queued so far is committed."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending == 0, timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopping or self._rows >= self.batch_rows, self.flush_s)
                batch, self._items, self._rows = self._items, [], 0
                stopping = self._stopping
            if batch:
                self._write(batch)
                with self._cond:
                    self._pending -= len(batch)
                    self._cond.notify_all()
            if stopping:
                return

    def _write(self, batch: list[tuple[str, list[tuple[Any, ...]]]]) -> None:
        try:
            self._commit(batch)
        except Exception as exc:  # never end the writer; and one bad record must not take the others with it
            log.warning("a batch of %d row set(s) failed (%r): writing its records one by one", len(batch), exc)
            for sql, rows in batch:
                for row in rows:  # a telemetry batch (one device's message) or one data record
                    try:
                        self._commit([(sql, [row])])
                    except Exception as one:
                        self.failed += 1
                        kind, device = ("telemetry", row.device) if sql is TELEMETRY else ("data", row[0])
                        log.error("could not store a %s record of device %r: %r", kind, device, one)

    def _commit(self, batch: list[tuple[str, list[tuple[Any, ...]]]]) -> None:
        """One transaction; replays are ignored (ON CONFLICT DO NOTHING), so writing a record again is harmless."""
        with self.db.transaction() as tx:
            for sql, rows in batch:
                if sql is not TELEMETRY:
                    tx.executemany(sql, rows)
            new_telemetry = store.store(tx, (p for sql, rows in batch if sql is TELEMETRY for p in rows))
            touch_last_seen(tx, {p.device if sql is TELEMETRY else p[0] for sql, rows in batch for p in rows})
        self.on_telemetry_rows(new_telemetry)
