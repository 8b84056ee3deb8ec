"""The offline package: a device's signed desired state with everything needed to install it, in one tar file.

An air-gapped device gets what the MQTT (or HTTP) path would have brought, as files: every root version
(so a device pinned to an old root walks the rotations), the director-signed desired state exactly as
the hub publishes it, each desired bundle's signed release and its chunks. The index is not signed:
it only lists members; everything it lists is signed (roots, desired state, releases) or
content-addressed (chunks), and is verified by the same chain as online. See docs/protocol.md.

Pure: names, the index schema and the checks on member names; reading the tar is the caller's.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from msgspec import Meta

from protocol.encoding import ProtocolError, canonical_json
from protocol.messages import Digest
from protocol.names import Name, OptionalName
from protocol.schema import SCHEMA_VERSION, Finite, NonNegative, Positive, Schema

INDEX = "edgefleet-offline.json"  # the first member
DESIRED = "desired.json"
MAX_PACKAGE_MEMBERS = 100_000
MAX_JSON_MEMBER_BYTES = 1024 * 1024  # a root, desired state, release or the index
MAX_JSON_BYTES = 64 * 1024 * 1024  # all of them together (read into memory; chunks are read one at a time)
_MEMBER = re.compile(r"\A(?:edgefleet-offline\.json|desired\.json|roots/[1-9][0-9]{0,9}\.json"
                     r"|releases/[0-9a-f]{64}\.json|chunks/[0-9a-f]{64})\Z")


class OfflineIndex(Schema, frozen=True, kw_only=True):
    """``edgefleet-offline.json``: what the package holds (informational; the signed members decide)."""

    v: Literal[1] = SCHEMA_VERSION
    type: Literal["offline-package"] = "offline-package"
    device: Name
    revision: Positive  # the desired state's revision
    deployment: OptionalName = ""
    created: Finite
    roots: Annotated[list[Positive], Meta(max_length=10_000)]  # root versions, oldest first
    releases: Annotated[list[Digest], Meta(max_length=64)]
    chunks: Annotated[list[Digest], Meta(max_length=MAX_PACKAGE_MEMBERS)]
    bytes: NonNegative = 0  # the chunks' total size


def root_member(version: int) -> str:
    return f"roots/{version}.json"


def release_member(bundle: str) -> str:
    return f"releases/{bundle}.json"


def chunk_member(digest: str) -> str:
    return f"chunks/{digest}"


def check_member(name: str, size: int, is_file: bool) -> None:
    """Refuse a member that is not a regular file with one of the package's names, or a JSON member too large."""
    if not is_file:
        raise ProtocolError(f"package member {name[:80]!r} is not a regular file")
    if not _MEMBER.match(name):
        raise ProtocolError(f"package member {name[:80]!r} is not one of an offline package's names")
    if not name.startswith("chunks/") and size > MAX_JSON_MEMBER_BYTES:
        raise ProtocolError(f"package member {name} is {size} bytes (at most {MAX_JSON_MEMBER_BYTES})")


def encode_index(index: OfflineIndex) -> bytes:
    return canonical_json(index.to_dict())
