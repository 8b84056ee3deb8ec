"""The hub's MQTT side: hears every device channel, stores what is valid, serves bundle parts.

It must never die on input: every rejection (bad topic, bad payload, unknown
device, device mismatch, a failing handler) is logged at WARNING with the topic
and reason, counted per channel, and the next message is served.

With hub replicas on PostgreSQL (``clustered``) every replica's bridge joins the ingest group's shared
subscription for telemetry and data (each message to one member), hears the other channels itself,
and answers bundle-part requests only while it is the leader (one copy per wave, from one place).
Each replica's last will says "hub offline"; a replica that hears it while connected says
"online" again, so devices hold their telemetry only when no replica is left.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from hub import audit
from hub.config import HubConfig
from hub.errors import NotFound
from hub.fleet.device_state import device_state
from hub.ingest import sessions
from hub.ingest.writer import INGEST_CHANNELS, Ack, BatchWriter, share_group, shared_wildcard
from hub.mqtt.blob_carousel import Carousel
from hub.mqtt.ratelimit import DeviceBudgets
from hub.registry.bundles import bundle_chunks, release_envelope
from hub.store import Database, dumps, is_postgres_url, loads, now
from hub.store.blobs import BlobStore
from hub.trust.roots_publish import announce, offline_will
from protocol.broker_url import parse_broker_url
from protocol.encoding import ProtocolError, canonical_json, parse_json, sha256_hex
from protocol.messages import (
    BlobRequest,
    CommandReply,
    DataBatch,
    HubStatus,
    ReportedState,
    Status,
    TelemetryBatch,
    decode,
)
from protocol.schema import validate
from protocol.topics import (
    DEVICE_TO_HUB,
    HUB_STATUS_TOPIC,
    MANIFEST_PART,
    Channel,
    DeviceTopic,
    blob_topic,
    device_wildcard,
    parse_topic,
)

log = logging.getLogger("edgefleet.hub.bridge")


class Rejected(Exception):
    """A message the hub refuses; the text is the reason logged."""


class Bridge:
    def __init__(self, config: HubConfig, db: Database, store: BlobStore,
                 is_enrolled: Callable[[str], bool], is_leader: Callable[[], bool] = lambda: True) -> None:
        self.config, self.db, self.store, self.is_enrolled, self.is_leader = config, db, store, is_enrolled, is_leader
        self.clustered = is_postgres_url(config.database)  # other replicas may share the work
        self.on_ready: Callable[[], None] = lambda: None  # set by the hub: re-send retained desired states
        self.received: dict[str, int] = defaultdict(int)
        self.rejected: dict[str, int] = defaultdict(int)
        self.processed: dict[str, int] = defaultdict(int)  # handled either way; tests wait on it
        self.telemetry_rows = 0
        self.blob_bytes_sent = 0
        self.command_replies: dict[str, dict[str, Any]] = {}
        self.on_command_reply: Callable[[str, CommandReply], None] = lambda device, msg: None
        self._counter_lock = threading.Lock()
        self.carousel = (Carousel(config.blob_gather_s, max(config.blob_hold_max_s, config.blob_gather_s),
                                  config.blob_covered_s) if config.blob_gather_s > 0 else None)
        self._carousel_lock = threading.Lock()
        self.budgets = DeviceBudgets(config.blob_device_burst_bytes, config.blob_device_rate_bps)
        self._carousel_wake = threading.Event()
        self._carousel_thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._sub_mid: int | None = None
        self._stopping = False
        self.writer = BatchWriter(db, config.writer_flush_s, config.writer_batch_rows, self._count_rows)
        self._handlers: dict[Channel, Callable[..., None]] = {
            Channel.STATUS: self._on_status, Channel.REPORTED: self._on_reported,
            Channel.TELEMETRY: self._on_telemetry, Channel.DATA: self._on_data,
            Channel.BLOB_REQ: self._on_blob_request, Channel.CMD_RES: self._on_command_reply,
        }
        url = parse_broker_url(config.mqtt_url)
        self._url = url
        # replicas: a durable session whose telemetry and data are acknowledged once stored (hub/ingest/sessions.py)
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=config.mqtt_client_id,
                                  protocol=mqtt.MQTTv5, manual_ack=self.clustered)
        self.acker = sessions.Acker(self.client)
        self._heartbeat: sessions.Heartbeat | None = None
        if url.username:
            self.client.username_pw_set(url.username, url.password)
        if url.tls:
            self.client.tls_set(ca_certs=config.tls_ca_certs())
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)
        self.client.will_set(*offline_will(), qos=1, retain=True)  # devices hold telemetry while the hub is away
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message

    # --- lifecycle -------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Connected and subscribed: the hub hears devices."""
        return self._ready.is_set()

    def wait_ready(self, timeout: float) -> bool:
        return self._ready.wait(timeout)

    def start(self) -> None:
        self.writer.start()
        if self.carousel is not None:
            self._carousel_thread = threading.Thread(target=self._carousel_loop, name="edgefleet-blob-carousel",
                                                     daemon=True)
            self._carousel_thread.start()
        # connect_async + loop_start: the network thread connects, and reconnects after any loss
        extra: dict[str, Any] = {}
        if self.clustered:
            self._heartbeat = sessions.Heartbeat(self.db, self.config.mqtt_client_id).start()
            extra = {"clean_start": False, "properties": sessions.connect_properties(sessions.SESSION_EXPIRY_S)}
        self.client.connect_async(self._url.host, self._url.port, keepalive=30, **extra)
        self.client.loop_start()
        log.info("MQTT bridge connecting to %s", self._url.public())

    def stop(self) -> None:
        self._stopping = True
        if self.clustered and self._ready.is_set():  # nothing new for this session; store and ack the rest; end it
            sessions.unsubscribe(self.client, sessions.ingest_topics(self.config.mqtt_url))
            self.writer.stop()
        self.client.disconnect(reasoncode=mqtt.ReasonCode(mqtt.PacketTypes.DISCONNECT, "Disconnect with will message"),
                               properties=sessions.end_session_properties() if self.clustered else None)
        self.client.loop_stop()
        self._carousel_wake.set()
        if self._carousel_thread is not None:
            self._carousel_thread.join(10)
        self.writer.stop()
        if self._heartbeat is not None:
            self._heartbeat.stop(ended=True)
        self._ready.clear()

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> mqtt.MQTTMessageInfo:
        # while disconnected paho keeps QoS>0 messages and sends them after reconnecting
        return self.client.publish(topic, payload, qos=qos, retain=retain)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            log.warning("broker refused the hub's connection: %s", reason_code)
            return
        self.acker.reconnected()  # acks owed on the old connection are void: those messages come again
        # "online" is what the broker says now: every device's retained status arrives with the subscription below
        # (this same thread handles it after this), and a broker that lost them (restarted) has each device that
        # is really connected publish "online" again. A device stranded meanwhile must not stay "online".
        try:
            with self.db.transaction() as tx:
                tx.execute("UPDATE devices SET online = 0 WHERE online = 1")
        except Exception:
            log.exception("could not reset the devices' online flags")
        # with ingest workers or other replicas, telemetry and data are shared with them (hub/ingest/workers.py)
        group = share_group(self.config.mqtt_url) if self.config.ingest_workers > 0 or self.clustered else None
        topics = [(shared_wildcard(ch, group) if group and ch in INGEST_CHANNELS else device_wildcard(ch), 1)
                  for ch in DEVICE_TO_HUB]
        if self.clustered:
            topics.append((HUB_STATUS_TOPIC, 1))
        result, mid = client.subscribe(topics)
        self._sub_mid = mid
        log.info("MQTT bridge connected to %s", self._url.public())

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        if mid != self._sub_mid:
            return
        failed = [str(rc) for rc in reason_codes if rc.is_failure]
        if failed:
            log.error("broker refused the hub's subscriptions: %s", failed)
            return
        try:
            self.on_ready()
        except Exception:
            log.exception("re-sending desired states after connecting failed")
        try:
            announce(self.publish, self.config.data_dir / "keys")  # roots, then "online": devices may send
        except Exception:
            log.exception("announcing the hub and its roots failed")
        self._ready.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                       properties: Any) -> None:
        self._ready.clear()
        if self._stopping:
            log.info("MQTT bridge disconnected")
        else:
            log.warning("MQTT bridge lost the broker (%s); reconnecting", reason_code)

    # --- inbound ---------------------------------------------------------------------------

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == HUB_STATUS_TOPIC:
            self._on_hub_status(msg.payload)
            self._ack(msg)
            return
        channel = "unknown"
        handed = False  # the writer acknowledges a telemetry or data message once it is stored
        try:
            where = parse_topic(msg.topic)
            if not isinstance(where, DeviceTopic):
                raise Rejected("not a device topic")
            channel = where.channel.value
            self._count(self.received, channel)
            handler = self._handlers.get(where.channel)
            if handler is None:
                raise Rejected(f"the hub does not accept channel {channel!r} from devices")
            if not self.is_enrolled(where.device_id):
                raise Rejected(f"device {where.device_id!r} is not enrolled")
            message = decode(where.channel, msg.payload)
            claimed = getattr(message, "device", where.device_id)
            if claimed != where.device_id:
                raise Rejected(f"message names device {claimed!r} but came on the topic of {where.device_id!r}")
            if where.channel == Channel.CMD_RES:  # a reply counts only for a command sent to that device
                self.on_command_reply(where.device_id, message)
            if where.channel in INGEST_CHANNELS:
                handler(message, self.acker.later(msg) if self.clustered else None)
                handed = True
            else:
                handler(message)
        except (Rejected, ProtocolError, NotFound) as exc:
            self._reject(channel, msg.topic, str(exc))
        except Exception as exc:  # a bug or a failing disk must cost one message, not the bridge
            log.exception("handler failed on %s", msg.topic)
            self._reject(channel, msg.topic, f"handler error: {exc!r}")
        finally:
            self._count(self.processed, channel)
            if not handed:
                self._ack(msg)

    def _ack(self, msg: mqtt.MQTTMessage) -> None:
        if self.clustered:
            self.acker.now(msg)

    def _on_hub_status(self, payload: bytes) -> None:
        """Another replica's will said "offline" (or it stopped): this one is still here, so say "online"."""
        try:
            online = validate(HubStatus, parse_json(payload, 4096)).online if payload else False
        except ProtocolError:
            return
        if not online and not self._stopping and self._ready.is_set():
            self.publish(HUB_STATUS_TOPIC, HubStatus(online=True, ts=time.time()).encode(), 1, True)

    def _reject(self, channel: str, topic: str, reason: str) -> None:
        self._count(self.rejected, channel)
        log.warning("rejected message on %s: %s", topic, reason[:500])

    def _count(self, counter: dict[str, int], key: str, n: int = 1) -> None:
        with self._counter_lock:
            counter[key] += n

    def _count_rows(self, n: int) -> None:
        with self._counter_lock:
            self.telemetry_rows += n

    def _on_status(self, msg: Status) -> None:
        with self.db.transaction() as tx:
            tx.execute("UPDATE devices SET online = ?, last_seen = ? WHERE id = ?", (int(msg.online), now(), msg.device))
        if msg.online and self.carousel is not None:  # a new connection may have lost its session: ask anew
            with self._carousel_lock:
                self.carousel.reconnected(msg.device)

    def _on_reported(self, msg: ReportedState) -> None:
        reported = dumps(msg.to_dict())
        with self.db.transaction() as tx:
            row = tx.one("SELECT desired, reported FROM devices WHERE id = ?", (msg.device,))
            state = device_state(row["desired"], reported) if row else None  # the device list filters on it
            tx.execute("UPDATE devices SET reported = ?, last_seen = ?, state = ? WHERE id = ?",
                       (reported, now(), state, msg.device))
            if msg.facts:
                tx.execute("UPDATE devices SET facts = ? WHERE id = ?", (dumps(msg.facts), msg.device))
            before = loads(row["reported"]) or {} if row else {}
            if row and msg.source == "offline" and (before.get("source"), before.get("revision")) != (
                    "offline", msg.revision):  # first heard of: the device installed it from a package
                audit.record(self.db, f"device:{msg.device}", "device.offline_install", msg.device,
                             revision=msg.revision, modules=[f"{m.name}:{m.version} {m.state}" for m in msg.modules])

    def _on_telemetry(self, msg: TelemetryBatch, ack: Ack | None = None) -> None:
        self.writer.telemetry(msg, ack)

    def _on_data(self, msg: DataBatch, ack: Ack | None = None) -> None:
        self.writer.data_batch(msg, ack)

    def _on_command_reply(self, msg: CommandReply) -> None:
        self.command_replies[msg.id] = msg.to_dict()
        while len(self.command_replies) > 1000:  # keep memory bounded until commands are stored
            self.command_replies.pop(next(iter(self.command_replies)))

    # --- bundle transfer -------------------------------------------------------------------

    def _on_blob_request(self, msg: BlobRequest) -> None:
        if not self.is_leader():  # one replica serves parts, so a wave gets one copy; devices ask again after failover
            return
        known = bundle_chunks(self.db, msg.bundle)  # NotFound -> rejected
        unknown = [c for c in msg.chunks if c not in known]
        if unknown:
            raise Rejected(f"bundle {msg.bundle[:12]}… has no chunk(s) {[c[:12] for c in unknown[:3]]}")
        chunks = list(dict.fromkeys(msg.chunks))
        if self.carousel is None:  # per-device transfer: every request gets its own copy, at once
            with self._carousel_lock:
                parts = self._admit(msg.device, [MANIFEST_PART] * msg.manifest + chunks)
            for part in parts:
                self._send(msg.bundle, part, self._part(msg.bundle, part))
            return
        with self._carousel_lock:
            self.carousel.request(msg.bundle, msg.device, msg.manifest, chunks, time.monotonic(),
                                  admit=lambda parts: self._admit(msg.device, parts))
        self._carousel_wake.set()

    def _admit(self, device: str, parts: list[str]) -> list[str]:
        """The parts ``device`` may make the hub publish now (its byte budget); under ``_carousel_lock``."""
        t = time.monotonic()
        admitted = self.budgets.admit(device, parts, t)
        if len(admitted) < len(parts) and self.budgets.should_warn(device, t):
            log.warning("device %s asks for more bundle bytes than its budget (%d bytes, %d/s): %d part(s) not"
                        " published now (edgefleet_hub_blob_requests_limited_total)", device, self.budgets.burst,
                        self.budgets.rate, len(parts) - len(admitted))
        return admitted

    def _carousel_loop(self) -> None:
        """Publish each pass when it is due (the carousel decides when; this thread keeps time)."""
        assert self.carousel is not None
        while not self._stopping:
            self._carousel_wake.clear()  # before looking: a request arriving meanwhile wakes the wait below
            with self._carousel_lock:
                t = time.monotonic()
                passes = self.carousel.due(t)
                wait = self.carousel.next_deadline() - t
            for bundle, parts in passes:
                for part in parts:
                    try:
                        self._send(bundle, part, self._part(bundle, part))
                    except Exception as exc:  # a damaged store costs that part (devices ask again), not the thread
                        self._reject(Channel.BLOB_REQ.value, blob_topic(bundle, part), f"cannot serve: {exc}")
            if not passes:
                self._carousel_wake.wait(min(max(wait, 0.0), 60.0))

    def _part(self, bundle: str, part: str) -> bytes:
        """A part's bytes: the signed release envelope, or a chunk read from the store and checked."""
        if part == MANIFEST_PART:
            return canonical_json(release_envelope(self.db, bundle))
        row = self.db.one("SELECT blob, offset, length FROM chunks WHERE digest = ?", (part,))
        if row is None:
            raise Rejected(f"chunk {part[:12]}… is not in the chunk index")
        data = self.store.read_range(row["blob"], row["offset"], row["length"])
        if sha256_hex(data) != part:  # never send a device bytes it will refuse; say the store is damaged
            raise Rejected(f"stored bytes of chunk {part[:12]}… do not match its digest (blob store damaged)")
        return data

    def _send(self, bundle: str, part: str, payload: bytes) -> None:
        self.publish(blob_topic(bundle, part), payload, qos=1, retain=False)
        with self._counter_lock:
            self.blob_bytes_sent += len(payload)
