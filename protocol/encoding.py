"""Canonical encoding: the one byte form every signed or hashed document has.

Canonical JSON here is UTF-8, keys sorted, no insignificant white space, and
no floats in signed documents (their text form differs between languages).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


class ProtocolError(ValueError):
    """A message or document that breaks the protocol; the text says how."""


def canonical_json(obj: Any) -> bytes:
    """Encode ``obj`` as canonical JSON bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digest_of(obj: Any) -> str:
    """The sha256 of a document's canonical form: how documents are named."""
    return sha256_hex(canonical_json(obj))


def parse_json(payload: bytes, max_bytes: int) -> Any:
    """Parse a JSON payload, refusing oversize, non-UTF-8 and non-JSON input with a precise reason."""
    if len(payload) > max_bytes:
        raise ProtocolError(f"payload too large: {len(payload)} bytes > limit {max_bytes}")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"payload is not UTF-8: {exc.reason} at byte {exc.start}") from None
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"payload is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None


def _no_constant(name: str) -> Any:
    # Python's json takes NaN and Infinity, which JSON does not have; a NaN poisons every sum it joins
    raise ProtocolError(f"payload is not JSON: {name} is not a JSON number")
