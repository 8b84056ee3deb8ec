"""Message schemas for every channel, and the one decoder that checks them.

Each JSON message carries ``v`` (the schema version, now 1). Unknown fields are
ignored, so a newer peer can add fields without breaking an older one; a
different ``v`` is refused.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protocol.encoding import ProtocolError, canonical_json, parse_json
from protocol.topics import Channel

SCHEMA_VERSION = 1
MAX_MESSAGE_BYTES = 512 * 1024  # JSON messages; bundle chunks are raw bytes and sized by CHUNK_SIZE

InstallState = Literal[
    "pending", "downloading", "verifying", "staged", "activating", "health_check",
    "running", "rolling_back", "rolled_back", "failed", "removed",
]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    v: Literal[1] = SCHEMA_VERSION

    def encode(self) -> bytes:
        return canonical_json(self.model_dump(mode="json"))


# --- desired state (hub -> device), carried inside a signed envelope -------------------------


class DesiredModule(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    name: str = Field(min_length=1, max_length=64)
    version: int = Field(ge=1)
    bundle: str = Field(pattern=r"^[0-9a-f]{64}$")  # manifest digest
    size: int = Field(ge=0)  # total bytes of the bundle's files
    deployment: str = ""
    collect_rate_ppm: int = Field(default=0, ge=0, le=1_000_000)  # sampled share, parts per million


class DesiredState(Message):
    """The ``signed`` part of a desired-state envelope (director role)."""

    type: Literal["desired"] = "desired"
    device: str
    revision: int = Field(ge=1)  # strictly increasing per device
    expires: int = Field(ge=0)  # unix seconds; an expired state is refused
    modules: list[DesiredModule] = Field(default_factory=list, max_length=64)


class HubStatus(Message):
    """Retained on ``edgefleet/v1/hub/status``: whether the hub is subscribed and storing device messages."""

    online: bool
    ts: float = 0.0


# --- device -> hub ---------------------------------------------------------------------------


class ModuleReport(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    name: str
    version: int
    bundle: str
    state: InstallState
    error: str = ""
    progress: float = 0.0  # share of bytes present, 0..1


class ReportedState(Message):
    device: str
    revision: int = Field(ge=0)  # the desired revision the modules below answer
    modules: list[ModuleReport] = Field(default_factory=list, max_length=64)
    error: str = ""  # a refused desired state, and why
    facts: dict[str, str] = Field(default_factory=dict)  # hardware / OS / agent version
    ts: float


class Status(Message):
    device: str
    online: bool
    ts: float = 0.0


class LatencyMs(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    p50: float = 0.0
    p95: float = 0.0
    p99: float = 0.0


class TelemetryPoint(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    ts: float
    module: str
    version: int
    inferences: int = Field(ge=0)
    errors: int = Field(ge=0)
    latency_ms: LatencyMs = LatencyMs()


class TelemetryBatch(Message):
    device: str
    seq: int = Field(ge=0)  # per device; the hub stores each (device, seq) once
    ts: float
    points: list[TelemetryPoint] = Field(max_length=10_000)
    agent: dict[str, float] = Field(default_factory=dict)  # rss_mb, cpu_percent, outbox_dropped, ...


class DataRecord(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    ts: float
    module: str
    version: int
    input: Any
    output: Any


class DataBatch(Message):
    device: str
    seq: int = Field(ge=0)
    ts: float
    records: list[DataRecord] = Field(max_length=10_000)


class BlobRequest(Message):
    """Asks the hub to publish a bundle's manifest and/or some of its chunks."""

    device: str
    bundle: str = Field(pattern=r"^[0-9a-f]{64}$")
    manifest: bool = False
    chunks: list[str] = Field(default_factory=list, max_length=4096)


class Command(Message):
    id: str = Field(min_length=1, max_length=64)
    name: str = Field(min_length=1, max_length=64)  # e.g. "ping", "infer", "report"
    args: dict[str, Any] = Field(default_factory=dict)


class CommandReply(Message):
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


def validate(model: type[Message], obj: Any) -> Message:
    """Check a parsed document against ``model``; ProtocolError names the first problems."""
    if isinstance(obj, dict) and "v" in obj and obj["v"] != SCHEMA_VERSION:
        raise ProtocolError(f"unsupported schema version {obj['v']!r} (this side speaks {SCHEMA_VERSION})")
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()[:5]
        )
        raise ProtocolError(f"invalid {model.__name__}: {problems}") from None


def decode(channel: Channel, payload: bytes) -> Message:
    """Decode a payload received on ``channel`` (not DESIRED: see protocol.signing)."""
    model = SCHEMAS.get(channel)
    if model is None:
        raise ProtocolError(f"channel {channel.value!r} carries no plain JSON message")
    if len(payload) <= MAX_MESSAGE_BYTES:
        try:  # fast path: pydantic parses and validates in one pass (about 2x json.loads + validate)
            return model.model_validate_json(payload)
        except ValidationError:
            pass  # the slow path below names the problem precisely (not JSON, wrong version, which field)
    return validate(model, parse_json(payload, MAX_MESSAGE_BYTES))
