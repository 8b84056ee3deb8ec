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
from protocol.schema import DIGEST_PATTERN, SCHEMA_VERSION, Schema, validate
from protocol.topics import Channel

MAX_MESSAGE_BYTES = 512 * 1024  # JSON messages; bundle chunks are raw bytes (CHUNK_SIZE, spans up to MAX_SPAN_BYTES)

InstallState = Literal[
    "pending", "downloading", "verifying", "staged", "activating", "health_check", "baking",
    "running", "rolling_back", "rolled_back", "failed", "removed",
]
Name = Annotated[str, Meta(min_length=1, max_length=64)]
Digest = Annotated[str, Meta(pattern=DIGEST_PATTERN)]
NonNegative = Annotated[int, Meta(ge=0)]
Ppm = Annotated[int, Meta(ge=0, le=1_000_000)]


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
    version: Annotated[int, Meta(ge=1)]
    bundle: Digest  # manifest digest
    size: NonNegative  # total bytes of the bundle's files
    deployment: str = ""
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
    device: str
    revision: Annotated[int, Meta(ge=1)]  # strictly increasing per device
    expires: NonNegative  # unix seconds; an expired state is refused
    modules: Annotated[list[DesiredModule], Meta(max_length=64)] = []

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["modules"] = [_without_null_bake(m) for m in d["modules"]]
        return d


class HubStatus(Message, frozen=True, kw_only=True):
    """Retained on ``edgefleet/v1/hub/status``: whether the hub is subscribed and storing device messages."""

    online: bool
    ts: float = 0.0


# --- device -> hub ---------------------------------------------------------------------------


class ModuleReport(Schema, frozen=True, kw_only=True):
    name: str
    version: int
    bundle: str
    state: InstallState
    error: str = ""
    progress: float = 0.0  # share of bytes present, 0..1


class ReportedState(Message, frozen=True, kw_only=True):
    device: str
    revision: NonNegative  # the desired revision the modules below answer
    modules: Annotated[list[ModuleReport], Meta(max_length=64)] = []
    error: str = ""  # a refused desired state, and why
    facts: dict[str, str] = {}  # hardware / OS / agent version
    ts: float


class Status(Message, frozen=True, kw_only=True):
    device: str
    online: bool
    ts: float = 0.0


class LatencyMs(Schema, frozen=True, kw_only=True):
    p50: float = 0.0
    p95: float = 0.0
    p99: float = 0.0


class TelemetryPoint(Schema, frozen=True, kw_only=True):
    ts: float
    module: str
    version: int
    inferences: NonNegative
    errors: NonNegative
    latency_ms: LatencyMs = field(default_factory=LatencyMs)


class TelemetryBatch(Message, frozen=True, kw_only=True):
    device: str
    seq: NonNegative  # per device; the hub stores each (device, seq) once
    ts: float
    points: Annotated[list[TelemetryPoint], Meta(max_length=10_000)]
    agent: dict[str, float] = {}  # rss_mb, cpu_percent, outbox_dropped, ...


class DataRecord(Schema, frozen=True, kw_only=True):
    ts: float
    module: str
    version: int
    input: Any
    output: Any


class DataBatch(Message, frozen=True, kw_only=True):
    device: str
    seq: NonNegative
    ts: float
    records: Annotated[list[DataRecord], Meta(max_length=10_000)]


class BlobRequest(Message, frozen=True, kw_only=True):
    """Asks the hub to publish a bundle's manifest and/or some of its chunks."""

    device: str
    bundle: Digest
    manifest: bool = False
    chunks: Annotated[list[str], Meta(max_length=4096)] = []


class Command(Message, frozen=True, kw_only=True):
    id: Name
    name: Name  # e.g. "ping", "infer", "report"
    args: dict[str, Any] = {}


class CommandReply(Message, frozen=True, kw_only=True):
    id: str
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
