"""Ingest that survives a killed process: durable MQTT sessions, acks after commit, and adopting a dead one's session.

With hub replicas on PostgreSQL, every process that ingests (each hub's bridge, each ingest worker)
connects with a fixed client id, ``clean_start=False`` and a session expiry, and acknowledges a
telemetry or data message only once its rows are committed (paho's manual acks). Killed between
receiving and committing, the process leaves the message unacknowledged in its broker session.
It comes back with the same id (a restarted container): the broker sends it again. It does not
come back: brokers such as mosquitto keep routing that member's share of the group to its session,
so the leader *adopts* it (:func:`adopt`): a process whose heartbeat (``mqtt_sessions``) is older
than ``HubConfig.ingest_adopt_s`` has its session taken over by a client with its id, which unsubscribes,
stores what the session held, acknowledges it, and ends the session (expiry 0). Nothing the broker
accepted is lost; a replay is stored once (``ON CONFLICT DO NOTHING``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from hub.config import HubConfig
from hub.ingest.writer import INGEST_CHANNELS, Ack, BatchWriter, EnrolledCache, share_group, shared_wildcard
from hub.store import Database, StoreError
from protocol.broker_url import parse_broker_url
from protocol.encoding import ProtocolError
from protocol.messages import DataBatch, TelemetryBatch, decode
from protocol.topics import DEVICE_TO_HUB, HUB_STATUS_TOPIC, Channel, DeviceTopic, device_wildcard, parse_topic

log = logging.getLogger("edgefleet.hub.ingest.sessions")

SESSION_EXPIRY_S = 86400  # a killed process's session (and what it holds) waits this long for it, or its adopter
HEARTBEAT_S = 1.0
STALE_S = 15.0  # a session whose owner has not beaten for this long is adopted (HubConfig.ingest_adopt_s)
IDLE_S = 1.0  # adoption ends once the session has been quiet this long


def connect_properties(expiry_s: int) -> Properties:
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = expiry_s
    return props


def end_session_properties() -> Properties:
    """DISCONNECT properties that end the session now (nothing is kept for this client id)."""
    props = Properties(PacketTypes.DISCONNECT)
    props.SessionExpiryInterval = 0
    return props


def ingest_topics(mqtt_url: str) -> list[str]:
    """The shared subscriptions of the hub's ingest group (its name derives from the hub's broker password)."""
    group = share_group(mqtt_url)
    return [shared_wildcard(ch, group) for ch in INGEST_CHANNELS]


def unsubscribe(client: mqtt.Client, topics: list[str], timeout: float = 5.0) -> bool:
    """Unsubscribe and wait for the broker's UNSUBACK (after it, no new message comes for these topics)."""
    acked: set[int] = set()
    cond = threading.Condition()
    previous = client.on_unsubscribe

    def on_unsubscribe(c: mqtt.Client, u: Any, mid: int, codes: Any, props: Any) -> None:
        with cond:
            acked.add(mid)
            cond.notify_all()
    client.on_unsubscribe = on_unsubscribe
    try:
        _, mid = client.unsubscribe(topics)
        with cond:
            return cond.wait_for(lambda: mid in acked, timeout)
    finally:
        client.on_unsubscribe = previous


class Acker:
    """Acknowledges one client's messages when asked; an ack from before a reconnect is dropped (its id is stale)."""

    def __init__(self, client: mqtt.Client) -> None:
        self.client = client
        self.generation = 0

    def reconnected(self) -> None:
        self.generation += 1

    def later(self, msg: mqtt.MQTTMessage) -> Ack:
        generation, mid, qos = self.generation, msg.mid, msg.qos

        def ack() -> None:
            if qos > 0 and generation == self.generation:
                self.client.ack(mid, qos)
        return ack

    def now(self, msg: mqtt.MQTTMessage) -> None:
        if msg.qos > 0:
            self.client.ack(msg.mid, msg.qos)


def ingest(msg: mqtt.MQTTMessage, is_enrolled: Callable[[str], bool], writer: BatchWriter,
           ack: Ack | None = None) -> Channel:
    """Validate one telemetry or data message and queue its rows (``ack`` runs once they are stored).

    Raises ProtocolError for a message to refuse; returns its channel.
    """
    where = parse_topic(msg.topic)
    if not isinstance(where, DeviceTopic) or where.channel not in INGEST_CHANNELS:
        raise ProtocolError("not a telemetry or data topic")
    if not is_enrolled(where.device_id):
        raise ProtocolError(f"device {where.device_id!r} is not enrolled")
    message = decode(where.channel, msg.payload)
    if getattr(message, "device", None) != where.device_id:
        raise ProtocolError(f"message names another device than the topic's {where.device_id!r}")
    if where.channel is Channel.TELEMETRY:
        assert isinstance(message, TelemetryBatch)
        writer.telemetry(message, ack)
    else:
        assert isinstance(message, DataBatch)
        writer.data_batch(message, ack)
    return where.channel


# --- heartbeats ------------------------------------------------------------------------------------


class Heartbeat:
    """Says every :data:`HEARTBEAT_S` that ``client_id``'s owner is alive (``mqtt_sessions``, database clock)."""

    def __init__(self, db: Database, client_id: str) -> None:
        self.db, self.client_id = db, client_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ingest-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self.beat()
        self._thread.start()
        return self

    def beat(self) -> None:
        with self.db.batch() as tx:
            tx.upsert("mqtt_sessions", {"client_id": self.client_id, "seen_at": tx.clock()}, key=["client_id"])

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.beat()
            except StoreError as exc:
                log.warning("session heartbeat of %s not written: %s", self.client_id, exc)

    def stop(self, ended: bool) -> None:
        """Stop beating; ``ended``: the session was closed cleanly, so nobody need adopt it."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        if ended:
            forget(self.db, self.client_id)


def forget(db: Database, client_id: str) -> None:
    with db.batch() as tx:
        tx.execute("DELETE FROM mqtt_sessions WHERE client_id = ?", (client_id,))


def stale(db: Database, older_than_s: float = STALE_S) -> list[str]:
    """Client ids whose owner stopped beating ``older_than_s`` ago."""
    with db.batch() as tx:
        cutoff = tx.clock() - older_than_s
        return [r["client_id"] for r in tx.query("SELECT client_id FROM mqtt_sessions WHERE seen_at < ?"
                                                 " ORDER BY client_id", (cutoff,))]


# --- adoption --------------------------------------------------------------------------------------


def adopt(config: HubConfig, db: Database, client_id: str, max_s: float = 60.0) -> dict[str, Any]:
    """Take over ``client_id``'s session: store the telemetry and data it holds, then end it.

    Other channels in it (a dead hub's status and reported messages) were heard by the live
    replicas too: they are acknowledged, not handled. Returns counts.
    """
    url = parse_broker_url(config.mqtt_url)
    writer = BatchWriter(db, config.writer_flush_s, config.writer_batch_rows)
    enrolled = EnrolledCache(db)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5, manual_ack=True)
    if url.username:
        client.username_pw_set(url.username, url.password)
    if url.tls:
        client.tls_set(ca_certs=config.tls_ca_certs())
    acker = Acker(client)
    counts = {"stored": 0, "other": 0, "rejected": 0}
    state: dict[str, Any] = {"last": time.monotonic(), "present": None}
    connected = threading.Event()

    def on_connect(c: mqtt.Client, u: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            log.warning("adopting %s: the broker refused: %s", client_id, rc)
            return
        state["present"] = bool(flags.session_present)
        connected.set()

    def on_message(c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        state["last"] = time.monotonic()
        where = parse_topic(msg.topic) if msg.topic != HUB_STATUS_TOPIC else None
        if not isinstance(where, DeviceTopic) or where.channel not in INGEST_CHANNELS:
            counts["other"] += 1
            acker.now(msg)
            return
        try:
            ingest(msg, enrolled, writer, acker.later(msg))
            counts["stored"] += 1
        except Exception as exc:
            counts["rejected"] += 1
            log.warning("adopting %s: rejected message on %s: %s", client_id, msg.topic, str(exc)[:300])
            acker.now(msg)

    client.on_connect, client.on_message = on_connect, on_message
    writer.start()
    client.connect_async(url.host, url.port, keepalive=30, clean_start=False,
                         properties=connect_properties(SESSION_EXPIRY_S))
    client.loop_start()
    deadline = time.monotonic() + max_s
    try:
        if not connected.wait(10):
            raise TimeoutError(f"could not connect as {client_id} to adopt its session")
        if state["present"]:
            # no new messages for this session from here on; then store what it already holds
            topics = ingest_topics(config.mqtt_url) + [device_wildcard(ch) for ch in DEVICE_TO_HUB] + [HUB_STATUS_TOPIC]
            unsubscribe(client, topics, 10)
            while time.monotonic() < deadline and time.monotonic() - state["last"] < IDLE_S:
                time.sleep(0.1)
            writer.wait_idle(max(1.0, deadline - time.monotonic()))
    finally:
        writer.stop()  # the last acks go out before the session ends
        client.disconnect(properties=end_session_properties())
        client.loop_stop()
    forget(db, client_id)
    if state["present"]:
        log.warning("adopted the MQTT session of %s: %d message(s) stored, %d other, %d rejected", client_id,
                    counts["stored"], counts["other"], counts["rejected"])
    return {"client_id": client_id, "session_present": state["present"], **counts}
