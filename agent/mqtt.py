"""paho-mqtt 2.x on an asyncio loop, with no thread per client.

paho's socket callbacks hand the socket to ``loop.add_reader/add_writer`` and a
small task calls ``loop_misc()`` for keep-alives (paho's own asyncio example), so
thousands of clients share one event loop. The TCP connect is done by asyncio as
well (``sock_connect``); only a TLS handshake, when configured, blocks briefly.

Publishing: ``publish`` with QoS 1 returns after the PUBACK. While the client is
offline it raises :class:`MqttOffline` at once instead of queueing in memory:
durable store-and-forward is the outbox's job, and retained state is re-published
by the agent after each reconnect. A QoS 1 message already handed to paho when the
link drops fails its ``publish`` call with MqttOffline too: paho may still re-send it
after the reconnect, but a broker that restarted may take it before the hub has
subscribed again, so only a PUBACK on a live connection counts. The caller (the
outbox) sends it again; the hub stores each ``(device, seq)`` once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.limits import MAX_PACKET_BYTES
from protocol.broker_url import BrokerURL

log = logging.getLogger("edgefleet.agent.mqtt")

Will = tuple[str, bytes, int, bool]  # topic, payload, qos, retain
MessageHandler = Callable[[str, bytes], None]


class MqttOffline(ConnectionError):
    """The client is not connected; nothing was queued."""


class _Client(mqtt.Client):
    """A paho client that takes a socket already connected by asyncio."""

    preconnected: socket.socket | None = None

    def _create_socket_connection(self) -> socket.socket:  # paho calls this inside reconnect()
        sock, self.preconnected = self.preconnected, None
        if sock is None:
            return super()._create_socket_connection()
        return sock


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter: uniform(0, min(cap, base * 2**attempt))."""
    return (rng or random).uniform(0.0, min(cap, base * (2 ** min(attempt, 30))))


class AsyncMqttClient:
    """One MQTT 5 session driven by the running asyncio loop; reconnects by itself."""

    def __init__(
        self,
        client_id: str,
        broker: BrokerURL,
        will: Will | None = None,
        clean_start: bool = False,
        session_expiry: int = 3600,
        keepalive: int = 30,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        connect_timeout: float = 10.0,
    ) -> None:
        self.client_id = client_id
        self.broker = broker
        self.keepalive = keepalive
        self.backoff_base, self.backoff_cap = backoff_base, backoff_cap
        self.connect_timeout = connect_timeout
        self.clean_start = clean_start
        self.session_expiry = session_expiry
        self.on_message: MessageHandler | None = None
        self.on_connect: Callable[[], None] | None = None  # called on the loop after every CONNACK
        self.connected = asyncio.Event()
        self.reconnects = 0
        self.last_error = ""  # why the last connection attempt failed, for logs and health
        self._subs: dict[str, int] = {}
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._connack: asyncio.Future[None] | None = None
        self._lost = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._misc: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sock: Any = None

        c = _Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        c.max_inflight_messages_set(100)
        if broker.username is not None:
            c.username_pw_set(broker.username, broker.password)
        if broker.tls:  # the CA pinned at enrolment, else the system's trust store; host names are checked
            c.tls_set_context(ssl.create_default_context(cadata=broker.ca_pem))
        if will is not None:
            topic, payload, qos, retain = will
            c.will_set(topic, payload, qos=qos, retain=retain)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_ack
        c.on_unsubscribe = self._on_ack
        c.on_socket_open = self._on_socket_open
        c.on_socket_close = self._on_socket_close
        c.on_socket_register_write = self._on_register_write
        c.on_socket_unregister_write = self._on_unregister_write
        self._client = c

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start connecting in the background; wait on ``connected`` to know when it is up."""
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._task = self._loop.create_task(self._run(), name=f"mqtt-{self.client_id}")

    async def stop(self, timeout: float = 2.0) -> None:
        """Disconnect cleanly (no last will) and stop reconnecting."""
        self._stopping = True
        if self.connected.is_set():
            self._client.disconnect()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), timeout)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._drop_socket()
        self._fail_pending(MqttOffline("client stopped"))

    async def _run(self) -> None:
        attempt = 0
        while not self._stopping:
            try:
                await self._connect_once()
            except (OSError, TimeoutError, ConnectionError) as exc:
                attempt += 1
                delay = backoff_delay(attempt, self.backoff_base, self.backoff_cap)
                # a certificate problem will not fix itself: say it louder than a refused connection
                level = logging.WARNING if isinstance(exc, ssl.SSLError) else logging.INFO
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.log(level, "%s: connect to %s failed (%s); retry in %.1fs", self.client_id, self.broker.public(),
                        self.last_error, delay)
                self._drop_socket()
                await asyncio.sleep(delay)
                continue
            attempt = 0
            await self._lost.wait()
            if self._stopping:
                return
            self.reconnects += 1
            # Jitter even the first retry, so a broker restart is not met by every device at once.
            await asyncio.sleep(backoff_delay(1, self.backoff_base, self.backoff_cap))

    async def _connect_once(self) -> None:
        loop = asyncio.get_running_loop()
        self._lost.clear()
        infos = await loop.getaddrinfo(self.broker.host, self.broker.port, type=socket.SOCK_STREAM)
        family, type_, proto, _, addr = infos[0]
        sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, addr), self.connect_timeout)
        except BaseException:
            sock.close()
            raise
        sock.settimeout(self.connect_timeout)  # as socket.create_connection leaves it; paho then goes non-blocking
        self._client.preconnected = sock
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.session_expiry
        props.MaximumPacketSize = MAX_PACKET_BYTES  # the broker drops anything larger instead of sending it
        self._connack = loop.create_future()
        rc = self._client.connect(
            self.broker.host, self.broker.port, keepalive=self.keepalive, clean_start=self.clean_start, properties=props
        )
        if rc != mqtt.MQTT_ERR_SUCCESS:
            raise ConnectionError(f"paho connect failed: {mqtt.error_string(rc)}")
        await asyncio.wait_for(asyncio.shield(self._connack), self.connect_timeout)

    # --- API ---------------------------------------------------------------------------------

    async def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Publish; with QoS 1 wait for the PUBACK. Raises MqttOffline when not connected."""
        if not self.connected.is_set():
            raise MqttOffline(f"not connected to {self.broker.public()}")
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise MqttOffline(f"publish on {topic} failed: {mqtt.error_string(info.rc)}")
        if qos == 0:
            return
        fut = self._pending.get(info.mid)
        fut = asyncio.get_running_loop().create_future()
        self._pending[info.mid] = fut
        await fut

    async def subscribe(self, topic: str, qos: int = 1) -> None:
        """Subscribe now if connected, and again after every reconnect."""
        self._subs[topic] = qos
        if self.connected.is_set():
            rc, mid = self._client.subscribe(topic, qos=qos)
            if rc == mqtt.MQTT_ERR_SUCCESS and mid is not None:
                await self._wait_ack(mid)

    async def unsubscribe(self, topic: str) -> None:
        if self._subs.pop(topic, None) is not None and self.connected.is_set():
            rc, mid = self._client.unsubscribe(topic)
            if rc == mqtt.MQTT_ERR_SUCCESS and mid is not None:
                await self._wait_ack(mid)

    async def _wait_ack(self, mid: int, timeout: float = 10.0) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._pending[mid] = fut
        with contextlib.suppress(TimeoutError, MqttOffline):
            await asyncio.wait_for(fut, timeout)

    # --- paho callbacks (all run on the loop thread) -----------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        fut = self._connack
        if reason.is_failure:
            if fut is not None and not fut.done():
                fut.set_exception(ConnectionError(f"broker refused the connection: {reason}"))
            return
        self.connected.set()
        for topic, qos in self._subs.items():  # the broker may have dropped the session: subscribe again
            client.subscribe(topic, qos=qos)
        if fut is not None and not fut.done():
            fut.set_result(None)
        log.info("%s: connected to %s%s", self.client_id, self.broker.public(),
                 f" (reconnect {self.reconnects})" if self.reconnects else "")
        if self.on_connect is not None:
            self.on_connect()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        self._lost.set()
        fut = self._connack
        if fut is not None and not fut.done():
            fut.set_exception(ConnectionError(f"disconnected before CONNACK: {reason}"))
        if was and not self._stopping:
            log.info("%s: connection lost (%s)", self.client_id, reason)
        # No ack on this connection will come now (see the module docstring for QoS 1 publishes).
        self._fail_pending(MqttOffline("connection lost"))

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if self.on_message is None:
            return
        try:
            self.on_message(msg.topic, msg.payload)
        except Exception:  # a handler bug must not take the session down
            log.exception("%s: message handler failed on %s", self.client_id, msg.topic)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        self._resolve(mid, None if not reason.is_failure else MqttOffline(f"publish refused: {reason}"))

    def _on_ack(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        self._resolve(mid, None)

    def _resolve(self, mid: int, exc: Exception | None) -> None:
        # No future for QoS 0 publishes; an ack cannot precede publish() registering its future,
        # because paho's writes only happen from the loop's writer callback.
        fut = self._pending.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_exception(exc) if exc else fut.set_result(None)

    def _fail_pending(self, exc: Exception) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(exc)
        self._pending.clear()

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        assert self._loop is not None
        self._sock = sock
        self._loop.add_reader(sock, client.loop_read)
        if self._misc is None or self._misc.done():
            self._misc = self._loop.create_task(self._misc_loop())

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._drop_socket()

    def drop_link(self) -> None:
        """Cut the connection as a dead link would: no DISCONNECT, so the broker publishes the last will.

        The session reconnects with backoff as after any loss. For fault injection (the simulator's flaky devices).
        """
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)

    def _drop_socket(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None and self._loop is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(sock)
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_writer(sock)
        if self._misc is not None:
            self._misc.cancel()
            self._misc = None

    def _on_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        assert self._loop is not None
        self._loop.add_writer(sock, client.loop_write)

    def _on_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if self._loop is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_writer(sock)

    async def _misc_loop(self) -> None:
        # Keep-alive pings and timeouts; staggered so thousands of clients do not tick together.
        await asyncio.sleep(random.uniform(0, 1.0))
        while self._client.loop_misc() == mqtt.MQTT_ERR_SUCCESS:
            await asyncio.sleep(1.0)
