"""Message schemas for every channel, and the one decoder that checks them.

Each JSON message carries ``v`` (the schema version, now 1). Unknown fields are
ignored, so a newer peer can add fields without breaking an older one; a
different ``v`` is refused.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, field

from protocol.encoding import ProtocolError, canonical_json, parse_json
from protocol.names import Name, OptionalName
from protocol.schema import DIGEST_PATTERN, SCHEMA_VERSION, Finite, NonNegative, Positive, Schema, validate
from protocol.topics import Channel

MAX_MESSAGE_BYTES = 512 * 1024  # JSON messages; bundle chunks are raw bytes (CHUNK_SIZE, spans up to MAX_SPAN_BYTES)
MAX_FACTS = 256  # entries in a device's facts, its agent stats, a command's arguments

InstallState = Literal[
    "pending", "downloading", "verifying", "staged", "activating", "health_check", "baking",
    "running", "rolling_back", "rolled_back", "failed", "removed",
]
# Every name is a protocol.names name (it becomes a directory and a topic level), every integer fits in
# 63 bits (SQLite, and any signed 64-bit reader), every float is finite, every list and map is capped.
Digest = Annotated[str, Meta(pattern=DIGEST_PATTERN)]
Ppm = Annotated[int, Meta(ge=0, le=1_000_000)]
Facts = Annotated[dict[Annotated[str, Meta(max_length=64)], Annotated[str, Meta(max_length=1024)]],
                  Meta(max_length=MAX_FACTS)]


class Message(Schema, frozen=True, kw_only=True):
    v: Literal[1] = SCHEMA_VERSION

    def encode(self) -> bytes:
        return canonical_json(self.to_dict())


# --- desired state (hub -> device), carried inside a signed envelope -------------------------


class BakePolicy(Schema, frozen=True, kw_only=True):
    """Probation after the health check: the new version serves while its inference error rate is watched.

    Rolled back as soon as at least ``min_inferences`` were answered and more than ``max_error_ppm``
    of them failed; committed when ``seconds`` pass without that (also with fewer inferences).
    """

    seconds: Annotated[int, Meta(ge=1, le=7 * 86_400)]
    max_error_ppm: Ppm = 50_000  # 5 %; integers only: signed documents hold no floats
    min_inferences: Annotated[int, Meta(ge=1, le=1_000_000)] = 20


class DesiredModule(Schema, frozen=True, kw_only=True):
    name: Name
    version: Positive
    bundle: Digest  # manifest digest
    size: NonNegative  # total bytes of the bundle's files
    deployment: OptionalName = ""
    collect_rate_ppm: Ppm = 0  # sampled share, parts per million
    bake: BakePolicy | None = None  # None: commit right after the health check (agents before it ignore the field)

    def to_dict(self) -> dict[str, Any]:
        return _without_null_bake(super().to_dict())


def _without_null_bake(module: dict[str, Any]) -> dict[str, Any]:
    # Absent, not null: a module without a bake signs and hashes exactly as before the field existed.
    if module.get("bake", 0) is None:
        del module["bake"]
    return module


class DesiredState(Message, frozen=True, kw_only=True):
    """The ``signed`` part of a desired-state envelope (director role)."""

    type: Literal["desired"] = "desired"
    device: Name
    revision: Positive  # strictly increasing per device
    expires: NonNegative  # unix seconds; an expired state is refused
    modules: Annotated[list[DesiredModule], Meta(max_length=64)] = []
    # the newest release-policy envelope (protocol/policy.py), signed by the release role; absent when none,
    # so states without one sign and hash exactly as before the field existed
    policy: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["modules"] = [_without_null_bake(m) for m in d["modules"]]
        if d.get("policy", 0) is None:
            del d["policy"]
        return d


class HubStatus(Message, frozen=True, kw_only=True):
    """Retained on ``edgefleet/v1/hub/status``: whether the hub is subscribed and storing device messages."""

    online: bool
    ts: Finite = 0.0


# --- device -> hub ---------------------------------------------------------------------------


class ModuleReport(Schema, frozen=True, kw_only=True):
    name: Name
    version: NonNegative
    bundle: Digest
    state: InstallState
    error: str = ""
    progress: Annotated[float, Meta(ge=0, le=1)] = 0.0  # share of bytes present, 0..1 (NaN fails the bounds)


class ReportedState(Message, frozen=True, kw_only=True):
    device: Name
    revision: NonNegative  # the desired revision the modules below answer
    modules: Annotated[list[ModuleReport], Meta(max_length=64)] = []
    error: str = ""  # a refused desired state, and why
    facts: Facts = {}  # hardware / OS / agent version
    ts: Finite


class Status(Message, frozen=True, kw_only=True):
    device: Name
    online: bool
    ts: Finite = 0.0


class LatencyMs(Schema, frozen=True, kw_only=True):
    p50: Finite = 0.0
    p95: Finite = 0.0
    p99: Finite = 0.0


class TelemetryPoint(Schema, frozen=True, kw_only=True):
    ts: Finite
    module: Name
    version: NonNegative
    inferences: NonNegative
    errors: NonNegative
    latency_ms: LatencyMs = field(default_factory=LatencyMs)


class TelemetryBatch(Message, frozen=True, kw_only=True):
    device: Name
    seq: NonNegative  # per device; the hub stores each (device, seq) once
    ts: Finite
    points: Annotated[list[TelemetryPoint], Meta(max_length=10_000)]
    agent: Annotated[dict[Annotated[str, Meta(max_length=64)], Finite], Meta(max_length=MAX_FACTS)] = {}  # rss_mb, ...


class DataRecord(Schema, frozen=True, kw_only=True):
    ts: Finite
    module: Name
    version: NonNegative
    input: Any
    output: Any


class DataBatch(Message, frozen=True, kw_only=True):
    device: Name
    seq: NonNegative
    ts: Finite
    records: Annotated[list[DataRecord], Meta(max_length=10_000)]


class BlobRequest(Message, frozen=True, kw_only=True):
    """Asks the hub to publish a bundle's manifest and/or some of its chunks."""

    device: Name
    bundle: Digest
    manifest: bool = False
    chunks: Annotated[list[Digest], Meta(max_length=4096)] = []


class Command(Message, frozen=True, kw_only=True):
    id: Name
    name: Name  # e.g. "ping", "infer", "report"
    args: Annotated[dict[str, Any], Meta(max_length=MAX_FACTS)] = {}


class CommandReply(Message, frozen=True, kw_only=True):
    id: Name  # the command's
    ok: bool
    result: Any = None
    error: str = ""


SCHEMAS: dict[Channel, type[Message]] = {
    Channel.REPORTED: ReportedState,
    Channel.STATUS: Status,
    Channel.TELEMETRY: TelemetryBatch,
    Channel.DATA: DataBatch,
    Channel.BLOB_REQ: BlobRequest,
    Channel.CMD: Command,
    Channel.CMD_RES: CommandReply,
}
_DECODERS = {channel: msgspec.json.Decoder(model) for channel, model in SCHEMAS.items()}


def decode(channel: Channel, payload: bytes) -> Message:
    """Decode a payload received on ``channel`` (not DESIRED: see protocol.signing)."""
    model = SCHEMAS.get(channel)
    if model is None:
        raise ProtocolError(f"channel {channel.value!r} carries no plain JSON message")
    if len(payload) <= MAX_MESSAGE_BYTES:
        try:  # fast path: msgspec parses and validates in one pass
            return _DECODERS[channel].decode(payload)  # type: ignore[no-any-return]
        except msgspec.DecodeError:
            pass  # the slow path below names the problem precisely (not JSON, wrong version, which field)
    return validate(model, parse_json(payload, MAX_MESSAGE_BYTES))
