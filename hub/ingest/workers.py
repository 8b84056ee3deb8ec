"""Ingest worker processes: more CPU for telemetry and collected data than one hub process has.

Each worker joins the MQTT 5 shared-subscription group ``edgefleet-ingest`` for the
telemetry and data channels (the hub's bridge joins it too), so the broker hands
every message to exactly one of them. A worker validates like the bridge does and
writes to the same database in batches; ``ON CONFLICT DO NOTHING`` keeps
(device, seq) unique whichever process stored it. With a clustered broker the
same group spans broker nodes (docs/monitoring.md).

The hub starts ``ingest_workers`` of them beside itself; ``edgefleet hub ingest`` runs them on
their own, on any machine that reaches the broker and the (PostgreSQL) database
(:func:`run_standalone`, docs/scaling.md).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import threading
import time
import zlib
from collections import Counter
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from hub.config import HubConfig
from hub.fleet.broker_auth import worker_login
from hub.ingest import sessions
from hub.ingest.writer import BatchWriter, EnrolledCache
from hub.store import Database, is_postgres_url, open_database
from protocol.broker_url import parse_broker_url
from protocol.encoding import ProtocolError
from protocol.topics import DeviceTopic, parse_topic

log = logging.getLogger("edgefleet.hub.ingest_worker")

STATS_EVERY_S = 1.0


class IngestWorker:
    def __init__(self, config: HubConfig, index: int) -> None:
        self.config = config
        self.index = index
        self.db = open_database(config.database)
        # on PostgreSQL (replicas): a durable session, messages acknowledged once stored (hub/ingest/sessions.py)
        self.durable = is_postgres_url(config.database)
        self.writer = BatchWriter(self.db, config.writer_flush_s, config.writer_batch_rows)
        self.received: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self._is_enrolled = EnrolledCache(self.db)
        url = parse_broker_url(config.mqtt_url)
        self.client_id = f"{config.mqtt_client_id}-ingest-{index}"
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5,
                                  manual_ack=self.durable)
        if url.username:  # isolated: a login of its own (the broker binds the client id to it, see broker_auth)
            self.client.username_pw_set(worker_login(url.username, index) if config.isolate else url.username,
                                        url.password)
        if url.tls:
            self.client.tls_set(ca_certs=config.tls_ca_certs())
        self.acker = sessions.Acker(self.client)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self._url = url

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            log.warning("broker refused ingest worker: %s", reason_code)
            return
        self.acker.reconnected()
        client.subscribe([(topic, 1) for topic in sessions.ingest_topics(self.config.mqtt_url)])

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        channel = "unknown"
        try:
            where = parse_topic(msg.topic)
            channel = where.channel.value if isinstance(where, DeviceTopic) else channel
            self.received[channel] += 1
            sessions.ingest(msg, self._is_enrolled, self.writer, self.acker.later(msg) if self.durable else None)
        except ProtocolError as exc:
            self._refused(msg, channel)
            log.warning("rejected message on %s: %s", msg.topic, str(exc)[:500])
        except Exception as exc:  # one bad message must not end the worker
            self._refused(msg, channel)
            log.exception("ingest failed on %s: %r", msg.topic, exc)

    def _refused(self, msg: mqtt.MQTTMessage, channel: str) -> None:
        self.rejected[channel] += 1
        if self.durable:  # refused for good: the broker need not send it again
            self.acker.now(msg)

    def run(self, stop: threading.Event) -> None:
        heartbeat = sessions.Heartbeat(self.db, self.client_id).start() if self.durable else None
        self.writer.start()
        extra = ({"clean_start": False, "properties": sessions.connect_properties(sessions.SESSION_EXPIRY_S)}
                 if self.durable else {})
        self.client.connect_async(self._url.host, self._url.port, keepalive=30, **extra)
        self.client.loop_start()
        while not stop.wait(STATS_EVERY_S):
            self._save_stats()
        if self.durable:  # no more messages for this session, store and acknowledge the rest, then end it
            sessions.unsubscribe(self.client, sessions.ingest_topics(self.config.mqtt_url))
        self.writer.stop()
        self.client.disconnect(properties=sessions.end_session_properties() if self.durable else None)
        self.client.loop_stop()
        if heartbeat is not None:
            heartbeat.stop(ended=True)
        self._save_stats()
        self.db.close()

    def _save_stats(self) -> None:
        """Counters where the hub's /metrics can read them (this process has no HTTP port of its own)."""
        with self.db.transaction() as tx:
            tx.upsert("ingest_workers", {"idx": self.index, "pid": os.getpid(), "received": sum(self.received.values()),
                                         "rejected": sum(self.rejected.values()), "updated_at": time.time()},
                      key=["idx"])

def _main(config: HubConfig, index: int) -> None:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s ingest-{index} %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    parent = mp.parent_process()
    if parent is not None:  # the hub killed outright (SIGKILL) must not leave its workers behind

        def watch_parent() -> None:
            parent.join()
            stop.set()

        threading.Thread(target=watch_parent, name="ingest-parent-watch", daemon=True).start()
    IngestWorker(config, index).run(stop)


def spawn(config: HubConfig, db: Database | None = None, first_index: int = 0) -> list[mp.process.BaseProcess]:
    """Start ``config.ingest_workers`` worker processes; stop them with :func:`stop_all`."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_main, args=(config, first_index + i), name=f"edgefleet-ingest-{i}", daemon=True)
             for i in range(config.ingest_workers)]
    for p in procs:
        p.start()
    log.info("started %d ingest worker(s) in shared-subscription group", len(procs))
    return procs


def stop_all(procs: list[mp.process.BaseProcess], timeout: float = 10.0) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()  # SIGTERM: the worker flushes its batch and disconnects
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            p.kill()
            p.join(5)


def run_standalone(config: HubConfig) -> None:
    """``edgefleet hub ingest``: ``config.ingest_workers`` workers on this machine until SIGTERM or Ctrl-C.

    Their client ids are ``{mqtt_client_id}-ingest-{index}``, and the indexes (also their rows in
    ``ingest_workers``) are drawn from ``mqtt_client_id``: the same after a restart (the broker keeps
    their durable sessions for them), distinct between machines.
    """
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    first = 1000 + zlib.crc32(config.mqtt_client_id.encode()) % 1_000_000 * 100
    procs = spawn(config, first_index=first)
    log.info("ingest workers %d..%d on %s, database %s", first, first + len(procs) - 1, config.mqtt_url.split("@")[-1],
             config.database.split("@")[-1])
    while not stop.wait(1.0):
        dead = [p for p in procs if not p.is_alive()]
        if dead:  # a worker that died is replaced: the group keeps its members
            log.warning("%d ingest worker(s) exited; starting them again", len(dead))
            for p in dead:
                i = procs.index(p)
                procs[i] = spawn(HubConfig(**{**config.__dict__, "ingest_workers": 1}), first_index=first + i)[0]
    stop_all(procs)
