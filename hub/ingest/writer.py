"""Batched writes for the hot paths (telemetry, sampled data): one transaction per batch, off the MQTT thread."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from hub.ingest import telemetry as store
from hub.store import Connection, Database, TransientStoreError, dumps, now
from protocol.broker_url import parse_broker_url
from protocol.messages import DataBatch, TelemetryBatch
from protocol.topics import Channel, device_wildcard

log = logging.getLogger("edgefleet.hub.ingest")

TELEMETRY = "telemetry"  # queue tag: the rows are packed batches (hub/ingest/telemetry.py), not SQL parameters
DATA = "data"  # queue tag: the rows are data_records rows in RECORD_COLUMNS order
SHADOW = "shadow"  # queue tag: shadow_points rows in SHADOW_COLUMNS order
LABEL = "label"  # queue tag: labels rows in LABEL_COLUMNS order (the latest label for a sample wins)
DATA_COLUMNS = ("device", "seq", "idx", "ts", "module", "version", "input", "output")
RECORD_COLUMNS = (*DATA_COLUMNS, "sample_id")  # a device's records carry their sample id (``data_rows``), for labels
SHADOW_COLUMNS = ("device", "seq", "idx", "ts", "module", "version", "live_version", "mirrored", "dropped", "compared",
                  "disagreements", "errors", "p95", "live_p95", "live_classes", "shadow_classes")
LABEL_COLUMNS = ("sample_id", "label", "ts", "source", "created_by")
# a correction replaces a sample's label
LABEL_SQL = (f"INSERT INTO labels ({', '.join(LABEL_COLUMNS)}) VALUES (?, ?, ?, ?, ?)"
             " ON CONFLICT (sample_id) DO UPDATE SET label = excluded.label, ts = excluded.ts, source = excluded.source,"
             " created_by = excluded.created_by")
WRITE_ATTEMPTS = 3  # a batch that fails this often (transiently) is written record by record; retries are idempotent
ACK_WINDOW = 16  # commit early once this many messages wait for their acknowledgement (brokers allow ~20-100)
Ack = Callable[[], None]
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


SHADOW_SQL = (f"INSERT INTO shadow_points ({', '.join(SHADOW_COLUMNS)}) VALUES ({', '.join('?' * len(SHADOW_COLUMNS))})"
              " ON CONFLICT DO NOTHING")


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

    An item may carry an ``ack``: called once its rows are committed (or given up on), so an MQTT
    message is acknowledged to the broker only when it is stored (hub replicas: a process killed
    before its commit leaves the message to be delivered again). With acks waiting, the writer
    commits as soon as :data:`ACK_WINDOW` of them are queued: the broker sends a client only so
    many unacknowledged messages at a time.
    """

    def __init__(self, db: Database, flush_s: float, batch_rows: int,
                 on_telemetry_rows: Callable[[int], None] = lambda n: None) -> None:
        self.db, self.flush_s, self.batch_rows = db, flush_s, batch_rows
        self.on_telemetry_rows = on_telemetry_rows
        self._thread = threading.Thread(target=self._run, name="hub-ingest-writer", daemon=True)
        # Producers only append under the lock; the writer wakes every flush_s, or early for a full batch.
        # (A queue.get per message woke the writer for every message: a thread switch each, on one GIL.)
        self._items: list[tuple[str, list[tuple[Any, ...]], Ack | None]] = []
        self._rows = 0  # rows in _items
        self._acks = 0  # items in _items with an ack
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

    def telemetry(self, msg: TelemetryBatch, ack: Ack | None = None) -> None:
        packed = store.pack(msg)  # here, on the caller's thread: the writer thread only talks to the database
        if packed is not None:
            self._put(TELEMETRY, [packed], None if msg.shadow else ack)
        if msg.shadow:
            self._put(SHADOW, shadow_rows(msg), ack)  # the ack goes with the message's last item
        elif packed is None and ack is not None:
            ack()  # nothing to store

    def data(self, rows: list[tuple[Any, ...]], ack: Ack | None = None) -> None:
        """Records in DATA_COLUMNS order, or RECORD_COLUMNS (with a sample id; NULL when left out)."""
        self._put(DATA, [r if len(r) == len(RECORD_COLUMNS) else (*r, None) for r in rows], ack)

    def data_batch(self, msg: DataBatch, ack: Ack | None = None) -> None:
        """A device's data message: its sampled records (with their sample ids) and any labels it carries."""
        if msg.records:
            self._put(DATA, data_rows(msg), None if msg.labels else ack)
        if msg.labels:
            self._put(LABEL, label_rows(msg), ack)
        if not msg.records and not msg.labels and ack is not None:
            ack()  # nothing to store

    def _put(self, tag: str, rows: list[tuple[Any, ...]], ack: Ack | None = None) -> None:
        with self._cond:
            self._items.append((tag, rows, ack))
            self._pending += 1
            self._rows += len(rows)
            self._acks += ack is not None
            if self._rows >= self.batch_rows or self._acks >= ACK_WINDOW:
                self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """True once everything queued so far is committed."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending == 0, timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopping or self._rows >= self.batch_rows
                                    or self._acks >= ACK_WINDOW, self.flush_s)
                batch, self._items, self._rows, self._acks = self._items, [], 0, 0
                stopping = self._stopping
            if batch:
                self._write(batch)
                for _, _, ack in batch:  # stored (or given up on and logged): the broker may forget them
                    if ack is not None:
                        try:
                            ack()
                        except Exception:
                            log.exception("acknowledging a stored message failed")
                with self._cond:
                    self._pending -= len(batch)
                    self._cond.notify_all()
            if stopping:
                return

    def _write(self, batch: list[tuple[str, list[tuple[Any, ...]], Ack | None]]) -> None:
        try:
            self._commit(batch)
        except Exception as exc:  # never end the writer; and one bad record must not take the others with it
            log.warning("a batch of %d row set(s) failed (%r): writing its records one by one", len(batch), exc)
            for tag, rows, _ in batch:
                for row in rows:  # a telemetry batch (one device's message) or one data record
                    try:
                        self._commit([(tag, [row], None)])
                    except Exception as one:
                        self.failed += 1
                        device = row.device if tag is TELEMETRY else row[4] if tag is LABEL else row[0]
                        log.error("could not store a %s record of device %r: %r", tag, device, one)

    def _commit(self, batch: list[tuple[str, list[tuple[Any, ...]], Ack | None]]) -> None:
        """One batch transaction, tried again after a transient failure (a deadlock victim, a lost connection):
        replays are ignored (ON CONFLICT DO NOTHING), so writing a record again is harmless."""
        # in key order: beside other writers (other hubs, ingest workers) two batches never deadlock on their rows
        data = _in_key_order(batch, DATA, 3)
        shadow = _in_key_order(batch, SHADOW, 3)
        labels = _in_key_order(batch, LABEL, 1)  # the last one for a sample wins, as one after another would
        packed = [p for tag, rows, _ in batch if tag is TELEMETRY for p in rows]
        seen = {p.device for p in packed} | {r[0] for r in data} | {r[0] for r in shadow}
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                with self.db.batch() as tx:
                    if data:
                        tx.insert_many("data_records", RECORD_COLUMNS, data, ignore=True)
                    if shadow:
                        tx.insert_many("shadow_points", SHADOW_COLUMNS, shadow, ignore=True)
                    if labels:
                        tx.executemany(LABEL_SQL, labels)
                    new_telemetry = store.store(tx, packed)
                    touch_last_seen(tx, seen)
                break
            except TransientStoreError:
                if attempt == WRITE_ATTEMPTS:
                    raise
                log.warning("writing a batch of %d row set(s) failed; trying again", len(batch), exc_info=True)
                time.sleep(0.2 * attempt)
        self.on_telemetry_rows(new_telemetry)


def _in_key_order(batch: list[tuple[str, list[tuple[Any, ...]], Ack | None]], tag: str,
                  key: int) -> list[tuple[Any, ...]]:
    """A batch's rows of one kind, one per key (the last), sorted by it."""
    return sorted({r[:key]: r for t, rows, _ in batch if t is tag for r in rows}.values(), key=lambda r: r[:key])
