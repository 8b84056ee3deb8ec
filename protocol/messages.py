"""Message schemas for every channel, and the one decoder that checks them.

Each JSON message carries ``v`` (the schema version, now 1). Unknown fields are
ignored, so a newer peer can add fields without breaking an older one; a
different ``v`` is refused.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, field

from protocol.encoding import ProtocolError, canonical_json, digest_of, parse_json
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


MAX_CONFIG_KEYS = 64
MAX_CONFIG_BYTES = 8 * 1024  # a module's configuration, as canonical JSON
ConfigKey = Annotated[str, Meta(pattern=r"^[a-z][a-z0-9_.-]{0,63}$")]
# strings, integers and booleans: signed documents hold no floats (a threshold travels as "0.5")
ConfigValue = str | Annotated[int, Meta(ge=-(2**63 - 1), le=2**63 - 1)] | bool
ModuleConfig = Annotated[dict[ConfigKey, ConfigValue], Meta(max_length=MAX_CONFIG_KEYS)]


def config_digest(config: dict[str, Any]) -> str:
    """A configuration's identity (sha256 of its canonical JSON); "" for none (``{}``)."""
    return digest_of(config) if config else ""


def check_config(config: dict[str, Any]) -> None:
    """Refuse a configuration larger than MAX_CONFIG_BYTES (keys and value types are checked by the schema)."""
    size = len(canonical_json(config))
    if size > MAX_CONFIG_BYTES:
        raise ValueError(f"module config is {size} bytes of JSON; at most {MAX_CONFIG_BYTES}")
ShadowCompare = Literal["auto", "argmax", "threshold", "tolerance"]


class ShadowSpec(Schema, frozen=True, kw_only=True):
    """A candidate version run beside the live one on the same inputs; its outputs are never served.

    ``compare``: ``argmax`` (classifiers: same top class), ``threshold`` (a single score: same side of
    0.5), ``tolerance`` (regression: every value within ``tolerance_ppm`` millionths), ``auto`` (argmax
    for a last dimension above 1, else threshold for values in 0..1, else tolerance).
    """

    version: Positive
    bundle: Digest
    size: NonNegative
    sample_ppm: Ppm = 1_000_000  # share of live inferences mirrored to the candidate
    max_queue: Annotated[int, Meta(ge=1, le=10_000)] = 64  # mirrored inputs waiting; more are dropped and counted
    # the candidate runs at most this share of the time (it rests in proportion after each inference): its CPU
    # stays bounded whatever the live load, and what arrives meanwhile waits in the queue or is dropped
    max_duty_ppm: Annotated[int, Meta(ge=1, le=1_000_000)] = 500_000
    compare: ShadowCompare = "auto"
    tolerance_ppm: Ppm = 10_000  # 0.01: integers only, signed documents hold no floats


class DesiredModule(Schema, frozen=True, kw_only=True):
    name: Name
    version: Positive
    bundle: Digest  # manifest digest
    size: NonNegative  # total bytes of the bundle's files
    deployment: OptionalName = ""
    collect_rate_ppm: Ppm = 0  # sampled share, parts per million
    bake: BakePolicy | None = None  # None: commit right after the health check (agents before it ignore the field)
    # Raised by the hub to ask again for a bundle this device gave up on (failed or rolled back): the agent
    # installs it once more when ``retry`` exceeds the one its failed install was for (docs/protocol.md §6).
    retry: NonNegative = 0
    # the module's configuration, applied without a new bundle (through the same health check, bake and rollback)
    config: ModuleConfig = {}
    shadow: ShadowSpec | None = None  # a candidate evaluated beside this version (agents before it ignore it)

    def __post_init__(self) -> None:
        check_config(self.config)

    def to_dict(self) -> dict[str, Any]:
        return _without_null_bake(super().to_dict())

    def candidate(self) -> DesiredModule | None:
        """The shadow's candidate as a module entry of its own (installed beside this one, never served)."""
        s = self.shadow
        return None if s is None else DesiredModule(name=self.name, version=s.version, bundle=s.bundle, size=s.size,
                                                    deployment=self.deployment)


def _without_null_bake(module: dict[str, Any]) -> dict[str, Any]:
    # Absent, not null, empty or 0: a module without a bake, shadow, config or retry signs and hashes exactly as before
    # the fields existed.
    for key in ("bake", "shadow"):
        if module.get(key, 0) is None:
            del module[key]
    if module.get("config", 0) == {}:
        del module["config"]
    if module.get("retry", 1) == 0:
        del module["retry"]
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


class ShadowReport(Schema, frozen=True, kw_only=True):
    """The install state of a module's shadow candidate (``running`` once it is mirrored to)."""

    version: NonNegative
    bundle: Digest
    state: InstallState
    error: str = ""


class ModuleReport(Schema, frozen=True, kw_only=True):
    name: Name
    version: NonNegative
    bundle: Digest
    state: InstallState
    error: str = ""
    progress: Annotated[float, Meta(ge=0, le=1)] = 0.0  # share of bytes present, 0..1 (NaN fails the bounds)
    config: Annotated[str, Meta(pattern=r"^([0-9a-f]{64})?$")] = ""  # config_digest of the config applied ("" none)
    accelerator: Annotated[str, Meta(max_length=1024)] = ""  # what the module runs on (modules/accel.py), if known
    shadow: ShadowReport | None = None  # only while the desired entry has a shadow


class HoldReport(Schema, frozen=True, kw_only=True):
    """An application's hold on installs (agent/deferral.py), while it lasts; times on the device's clock."""

    since: Finite
    until: Finite
    reason: Annotated[str, Meta(max_length=200)] = ""


class ReportedState(Message, frozen=True, kw_only=True):
    device: Name
    revision: NonNegative  # the desired revision the modules below answer
    modules: Annotated[list[ModuleReport], Meta(max_length=64)] = []
    error: str = ""  # a refused desired state, and why
    facts: Facts = {}  # hardware / OS / agent version
    hold: HoldReport | None = None  # installs held by an application (additive: older hubs ignore it)
    ts: Finite
    source: Literal["hub", "offline"] = "hub"  # how the applied desired state came: from the hub, or a package


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


ClassCounts = Annotated[dict[Annotated[str, Meta(max_length=32)], NonNegative], Meta(max_length=64)]


class ShadowPoint(Schema, frozen=True, kw_only=True):
    """One interval of a shadow candidate (``version``) against the live version, on the same inputs."""

    ts: Finite
    module: Name
    version: NonNegative  # the candidate's
    live_version: NonNegative
    mirrored: NonNegative  # live inferences handed to the candidate
    dropped: NonNegative  # not mirrored: the candidate's queue was full (the live path never waits)
    compared: NonNegative  # answered by both
    disagreements: NonNegative  # of those, how many differ (compare rule of the ShadowSpec)
    errors: NonNegative  # the candidate failed where the live version answered
    latency_ms: LatencyMs = field(default_factory=LatencyMs)  # the candidate's
    live_latency_ms: LatencyMs = field(default_factory=LatencyMs)  # the live version's, same inputs
    live_classes: ClassCounts = {}  # predicted class (argmax/threshold) -> count, for output drift
    shadow_classes: ClassCounts = {}


class TelemetryBatch(Message, frozen=True, kw_only=True):
    device: Name
    seq: NonNegative  # per device; the hub stores each (device, seq) once
    ts: Finite
    points: Annotated[list[TelemetryPoint], Meta(max_length=10_000)]
    agent: Annotated[dict[Annotated[str, Meta(max_length=64)], Finite], Meta(max_length=MAX_FACTS)] = {}  # rss_mb, ...
    shadow: Annotated[list[ShadowPoint], Meta(max_length=64)] = []  # shadow candidates' comparisons


SampleId = Annotated[str, Meta(max_length=64)]


class DataRecord(Schema, frozen=True, kw_only=True):
    ts: Finite
    module: Name
    version: NonNegative
    input: Any
    output: Any
    id: SampleId = ""  # the caller's request id, to send its label later (ground truth); "" when none was given


class Label(Schema, frozen=True, kw_only=True):
    """Ground truth for an earlier prediction of this device: the ``id`` its request carried."""

    id: Annotated[str, Meta(min_length=1, max_length=64)]
    label: Any  # a class (int or str), a number (regression), or a list of them, one per row of the batch
    ts: Finite = 0.0


class DataBatch(Message, frozen=True, kw_only=True):
    device: Name
    seq: NonNegative
    ts: Finite
    records: Annotated[list[DataRecord], Meta(max_length=10_000)]
    labels: Annotated[list[Label], Meta(max_length=10_000)] = []  # ground truth for earlier records (by ``id``)


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
