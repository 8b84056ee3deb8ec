"""The hub <-> device contract: topics, schemas, canonical encoding, signatures.

Pure code with no I/O (sans-IO): no sockets, no MQTT client, no database.
The written specification is docs/protocol.md.
"""

from __future__ import annotations

from typing import Any

# Re-exported on first use: ``import protocol.encoding`` (as a bundle check does) must not import every
# message schema with it.
_FROM = {"ProtocolError": "encoding", "canonical_json": "encoding", "digest_of": "encoding", "sha256_hex": "encoding",
         "SCHEMA_VERSION": "messages", "decode": "messages", "ROOT": "topics", "Channel": "topics",
         "blob_topic": "topics", "device_topic": "topics", "parse_topic": "topics"}


def __getattr__(name: str) -> Any:
    if name not in _FROM:
        raise AttributeError(f"module 'protocol' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"protocol.{_FROM[name]}"), name)
    globals()[name] = value
    return value

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
