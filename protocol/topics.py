"""The versioned MQTT topic tree (see docs/protocol.md).

Every device topic is ``edgefleet/v1/devices/{device_id}/{channel}``; bundle
content travels on ``edgefleet/v1/blobs/{bundle_digest}/{part}``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from protocol.encoding import ProtocolError
from protocol.names import RESERVED_PREFIX, check_name, is_reserved_login

ROOT = "edgefleet/v1"
DIGEST_RE = re.compile(r"^[0-9a-f]{64}\Z")


class Channel(StrEnum):
    """The per-device channels, and who publishes on each."""

    DESIRED = "desired"  # hub -> device, retained, QoS 1, signed
    REPORTED = "reported"  # device -> hub, retained, QoS 1
    STATUS = "status"  # device -> hub, retained; also the last will ("offline")
    TELEMETRY = "telemetry"  # device -> hub, QoS 1 batches with sequence numbers
    DATA = "data"  # device -> hub, QoS 1 batches of sampled inputs/predictions
    BLOB_REQ = "blob-req"  # device -> hub, asks for a manifest or chunks
    CMD = "cmd"  # hub -> device, a command
    CMD_RES = "cmd-res"  # device -> hub, a command's reply


DEVICE_TO_HUB = (Channel.REPORTED, Channel.STATUS, Channel.TELEMETRY, Channel.DATA, Channel.BLOB_REQ, Channel.CMD_RES)
HUB_TO_DEVICE = (Channel.DESIRED, Channel.CMD)
MANIFEST_PART = "manifest"


def check_device_id(device_id: str) -> str:
    """A device id is a name (protocol.names) outside the hub's reserved login prefix: it is the device's broker login."""
    check_name(device_id, "device id")
    if is_reserved_login(device_id):
        raise ProtocolError(f"invalid device id {device_id!r}: the prefix {RESERVED_PREFIX!r} is reserved for the "
                            "hub's own broker logins")
    return device_id


def device_topic(device_id: str, channel: Channel) -> str:
    return f"{ROOT}/devices/{check_device_id(device_id)}/{channel.value}"


def device_wildcard(channel: Channel) -> str:
    """The subscription the hub uses to hear ``channel`` from every device."""
    return f"{ROOT}/devices/+/{channel.value}"


def blob_topic(bundle_digest: str, part: str) -> str:
    """Where the hub publishes one part of a bundle: ``manifest`` or a chunk digest."""
    return f"{ROOT}/blobs/{bundle_digest}/{part}"


def blob_wildcard(bundle_digest: str) -> str:
    return f"{ROOT}/blobs/{bundle_digest}/+"


HUB_STATUS_TOPIC = f"{ROOT}/hub/status"  # hub -> devices, retained: HubStatus (also the hub's last will)
ROOT_PREFIX = f"{ROOT}/root"  # hub -> devices, retained per version: every signed root document


def root_topic(version: int) -> str:
    """Where root version ``version`` stays retained, so a device behind by several rotations gets each link."""
    if not isinstance(version, int) or version < 1:
        raise ProtocolError(f"invalid root version {version!r}")
    return f"{ROOT_PREFIX}/{version}"


def root_wildcard() -> str:
    return f"{ROOT_PREFIX}/+"


def parse_root_topic(topic: str) -> int | None:
    """The version in a root topic, or None if ``topic`` is not one."""
    head, _, tail = topic.rpartition("/")
    if head != ROOT_PREFIX or not tail.isdigit() or tail.startswith("0"):
        return None
    return int(tail)


@dataclass(frozen=True)
class DeviceTopic:
    device_id: str
    channel: Channel


@dataclass(frozen=True)
class BlobTopic:
    bundle_digest: str
    part: str  # "manifest" or a chunk's sha256


def parse_topic(topic: str) -> DeviceTopic | BlobTopic:
    """Split a topic of the tree into its parts, or raise ProtocolError saying why not."""
    parts = topic.split("/")
    if len(parts) < 3 or "/".join(parts[:2]) != ROOT:
        raise ProtocolError(f"topic {topic!r} is not under {ROOT}/")
    if parts[2] == "devices" and len(parts) == 5:
        try:
            channel = Channel(parts[4])
        except ValueError:
            raise ProtocolError(f"topic {topic!r} has unknown channel {parts[4]!r}") from None
        return DeviceTopic(check_device_id(parts[3]), channel)
    if parts[2] == "blobs" and len(parts) == 5:
        if not DIGEST_RE.match(parts[3]):
            raise ProtocolError(f"topic {topic!r}: bundle digest is not 64 lowercase hex digits")
        if parts[4] != MANIFEST_PART and not DIGEST_RE.match(parts[4]):
            raise ProtocolError(f"topic {topic!r}: part is neither 'manifest' nor a sha256")
        return BlobTopic(parts[3], parts[4])
    raise ProtocolError(f"topic {topic!r} is not a device or blob topic")
