"""Ingest worker processes: more CPU for telemetry and collected data than one hub process has.

Each worker joins the MQTT 5 shared-subscription group ``edgefleet-ingest`` for the
telemetry and data channels (the hub's bridge joins it too), so the broker hands
every message to exactly one of them. A worker validates like the bridge does and
writes to the same SQLite database in batches; ``ON CONFLICT DO NOTHING`` keeps
(device, seq) unique whichever process stored it. With a clustered broker the
same group spans broker nodes (docs/monitoring.md).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from collections import Counter
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from hub.config import HubConfig
from hub.ingest.writer import INGEST_CHANNELS, BatchWriter, EnrolledCache, data_rows, shared_wildcard
from hub.store import Database, open_database
from protocol.broker_url import parse_broker_url
from protocol.encoding import ProtocolError
from protocol.messages import DataBatch, TelemetryBatch, decode
from protocol.topics import Channel, DeviceTopic, parse_topic

log = logging.getLogger("edgefleet.hub.ingest_worker")

STATS_EVERY_S = 1.0


class IngestWorker:
    def __init__(self, config: HubConfig, index: int) -> None:
        self.config = config
        self.index = index
        self.db = open_database(config.database)
        self.writer = BatchWriter(self.db, config.writer_flush_s, config.writer_batch_rows)
        self.received: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self._is_enrolled = EnrolledCache(self.db)
        url = parse_broker_url(config.mqtt_url)
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{config.mqtt_client_id}-ingest-{index}",
                                  protocol=mqtt.MQTTv5)
        if url.username:
            self.client.username_pw_set(url.username, url.password)
        if url.tls:
            self.client.tls_set(ca_certs=config.tls_ca_certs())
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self._url = url

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            log.warning("broker refused ingest worker: %s", reason_code)
            return
        client.subscribe([(shared_wildcard(ch), 1) for ch in INGEST_CHANNELS])

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        channel = "unknown"
        try:
            where = parse_topic(msg.topic)
            if not isinstance(where, DeviceTopic) or where.channel not in INGEST_CHANNELS:
                raise ProtocolError("not a telemetry or data topic")
            channel = where.channel.value
            self.received[channel] += 1
            if not self._is_enrolled(where.device_id):
                raise ProtocolError(f"device {where.device_id!r} is not enrolled")
            message = decode(where.channel, msg.payload)
            if getattr(message, "device", None) != where.device_id:
                raise ProtocolError(f"message names another device than the topic's {where.device_id!r}")
            if where.channel is Channel.TELEMETRY:
                assert isinstance(message, TelemetryBatch)
                self.writer.telemetry(message)
            else:
                assert isinstance(message, DataBatch)
                self.writer.data(data_rows(message))
        except ProtocolError as exc:
            self.rejected[channel] += 1
            log.warning("rejected message on %s: %s", msg.topic, str(exc)[:500])
        except Exception as exc:  # one bad message must not end the worker
            self.rejected[channel] += 1
            log.exception("ingest failed on %s: %r", msg.topic, exc)

    def run(self, stop: threading.Event) -> None:
        self.writer.start()
        self.client.connect_async(self._url.host, self._url.port, keepalive=30)
        self.client.loop_start()
        while not stop.wait(STATS_EVERY_S):
            self._save_stats()
        self.client.disconnect()
        self.client.loop_stop()
        self.writer.stop()
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
    IngestWorker(config, index).run(stop)


def spawn(config: HubConfig, db: Database) -> list[mp.process.BaseProcess]:
    """Start ``config.ingest_workers`` worker processes; stop them with :func:`stop_all`."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_main, args=(config, i), name=f"edgefleet-ingest-{i}", daemon=True)
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
