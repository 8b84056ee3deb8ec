"""The hub <-> device contract: topics, schemas, canonical encoding, signatures.

Pure code with no I/O (sans-IO): no sockets, no MQTT client, no database.
The written specification is docs/protocol.md.
"""

from protocol.encoding import ProtocolError, canonical_json, digest_of, sha256_hex
from protocol.messages import SCHEMA_VERSION, decode
from protocol.topics import ROOT, Channel, blob_topic, device_topic, parse_topic

__all__ = [
    "ROOT",
    "SCHEMA_VERSION",
    "Channel",
    "ProtocolError",
    "blob_topic",
    "canonical_json",
    "decode",
    "device_topic",
    "digest_of",
    "parse_topic",
    "sha256_hex",
]
