"""The MQTT session glue: subscriptions, routing inbound topics to their handlers, presence both ways.

The session knows topics, not what the messages mean: each inbound message goes to the handler the
agent wired for it (``Handlers``), after the checks that need no state (a topic we cannot parse, or
one for another device, is refused and counted). It announces the device online (retained) on every
connect and offline before a clean disconnect (the will covers the unclean ones), and follows the
hub's presence, which the reporter's outbox drain waits on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from agent.mqtt import AsyncMqttClient, MessageHandler, MqttOffline, Will
from protocol.broker_url import BrokerURL
from protocol.encoding import ProtocolError, parse_json
from protocol.messages import HubStatus, Status, validate
from protocol.topics import (
    HUB_STATUS_TOPIC,
    BlobTopic,
    Channel,
    device_topic,
    parse_root_topic,
    parse_topic,
    root_wildcard,
)

log = logging.getLogger("edgefleet.agent")


class MqttClient(Protocol):
    """What the agent needs from an MQTT session (``AsyncMqttClient`` or a test double)."""

    connected: asyncio.Event
    on_message: MessageHandler | None
    on_connect: Callable[[], None] | None

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None: ...
    async def subscribe(self, topic: str, qos: int = 1) -> None: ...
    async def unsubscribe(self, topic: str) -> None: ...


ClientFactory = Callable[[str, BrokerURL, Will], MqttClient]
Spawn = Callable[[Coroutine[Any, Any, Any]], None]


def default_client_factory(client_id: str, broker: BrokerURL, will: Will) -> MqttClient:
    return AsyncMqttClient(client_id, broker, will=will)


class HubPresence:
    """The hub's retained presence. None: no hub announces it (an older hub): send anyway."""

    def __init__(self) -> None:
        self.online: bool | None = None
        self.changed = asyncio.Event()

    def set(self, online: bool | None) -> None:
        self.online = online
        self.changed.set()


@dataclass
class Handlers:
    """Where the session hands each kind of inbound message (topic, payload; blob parts by bundle and part)."""

    desired: Callable[[str, bytes], None]
    root: Callable[[str, int, bytes], None]
    command: Callable[[str, bytes], None]
    blob: Callable[[str, str, bytes], None]
    connected: Callable[[], None]  # after every (re)connect: what the hub may have missed goes again


class Session:
    """One device's MQTT session over ``client``."""

    def __init__(self, device_id: str, client: MqttClient, clock: Callable[[], float], rejected: Counter[str],
                 spawn: Spawn) -> None:
        self.device_id, self.client, self.clock, self.rejected, self.spawn = device_id, client, clock, rejected, spawn
        self.hub = HubPresence()
        self.handlers: Handlers | None = None

    def topic(self, channel: Channel) -> str:
        return device_topic(self.device_id, channel)

    def reject(self, key: str, topic: str, reason: str) -> None:
        """Count and log a refused message: the agent goes on with what it has."""
        self.rejected[key] += 1
        log.warning("%s: rejected message on %s: %s", self.device_id, topic, reason)

    async def start(self, handlers: Handlers) -> None:
        self.handlers = handlers
        self.client.on_message = self.route
        self.client.on_connect = self._on_connected
        await self.client.subscribe(self.topic(Channel.DESIRED))
        await self.client.subscribe(self.topic(Channel.CMD))
        await self.client.subscribe(HUB_STATUS_TOPIC)
        await self.client.subscribe(root_wildcard())
        await self.client.start()

    def route(self, topic: str, payload: bytes) -> None:
        """Hand one inbound message to its handler, or refuse it here."""
        assert self.handlers is not None
        if topic == HUB_STATUS_TOPIC:
            self._on_hub_status(topic, payload)
            return
        root_version = parse_root_topic(topic)
        if root_version is not None:
            self.handlers.root(topic, root_version, payload)
            return
        try:
            parsed = parse_topic(topic)
        except ProtocolError as exc:
            self.reject("topic", topic, str(exc))
            return
        if isinstance(parsed, BlobTopic):
            self.handlers.blob(parsed.bundle_digest, parsed.part, payload)
            return
        if parsed.device_id != self.device_id:
            self.reject(parsed.channel.value, topic, f"topic is for device {parsed.device_id!r}")
        elif parsed.channel == Channel.DESIRED:
            self.handlers.desired(topic, payload)
        elif parsed.channel == Channel.CMD:
            self.handlers.command(topic, payload)

    def _on_hub_status(self, topic: str, payload: bytes) -> None:
        if not payload:  # the retained status was cleared: no hub announces presence, send when connected
            self.hub.set(None)
            return
        try:
            status = validate(HubStatus, parse_json(payload, 4096))
        except ProtocolError as exc:
            self.reject("hub-status", topic, str(exc))
            return
        assert isinstance(status, HubStatus)
        self.hub.set(status.online)

    def _on_connected(self) -> None:
        async def announce() -> None:
            with contextlib.suppress(MqttOffline, TimeoutError):
                await asyncio.wait_for(self.client.publish(
                    self.topic(Channel.STATUS), Status(device=self.device_id, online=True, ts=self.clock()).encode(),
                    qos=1, retain=True), 10.0)
        self.spawn(announce())
        if self.hub.online is not None:
            # A restarted broker forgets the retained "online": wait for the hub to say it again.
            self.hub.online = False
        assert self.handlers is not None
        self.handlers.connected()

    async def reply(self, channel: Channel, payload: bytes) -> None:
        """Publish an answer (e.g. a command's) if the broker takes it within 10 s; dropped otherwise."""
        with contextlib.suppress(MqttOffline, TimeoutError):
            await asyncio.wait_for(self.client.publish(self.topic(channel), payload), 10.0)

    async def close(self) -> None:
        """Say "offline" ourselves (a clean disconnect suppresses the last will), then disconnect."""
        if self.client.connected.is_set():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.client.publish(
                    self.topic(Channel.STATUS), Status(device=self.device_id, online=False, ts=self.clock()).encode(),
                    qos=1, retain=True), 3.0)
        await self.client.stop()


def last_will(device_id: str) -> Will:
    """"offline", retained: what the broker publishes for us when the link dies."""
    return device_topic(device_id, Channel.STATUS), Status(device=device_id, online=False).encode(), 1, True
