"""The base of every schema (frozen msgspec Structs) and the one checked conversion into them.

Constructing a schema object does not check its constraints (the producer's side builds what it
means); :func:`validate` and :func:`protocol.messages.decode` do, for everything received.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec

from protocol.encoding import ProtocolError

SCHEMA_VERSION = 1
DIGEST_PATTERN = r"^[0-9a-f]{64}\Z"  # \Z, not $: "$" would also take a trailing newline

S = TypeVar("S", bound="Schema")
_MISSING = re.compile(r"Object missing required field `(.+)`")


class Schema(msgspec.Struct, frozen=True, kw_only=True):
    """Immutable; unknown fields in received documents are ignored (a newer peer may add some)."""

    def to_dict(self) -> dict[str, Any]:
        """The builtins (JSON) form: what is encoded, hashed and signed."""
        return msgspec.to_builtins(self)  # type: ignore[no-any-return]


def problem(exc: msgspec.ValidationError) -> str:
    """msgspec's "reason - at `$.a[0].b`" as "a.0.b: reason" (the field first, as the protocol's errors read)."""
    text = str(exc)
    reason, sep, where = text.rpartition(" - at `")
    if not sep:
        reason, where = text, "$`"
    loc = re.sub(r"\[(\d+)\]", r".\1", where[1:-1]).lstrip(".")
    missing = _MISSING.fullmatch(reason)
    if missing:
        loc, reason = f"{loc}.{missing[1]}".lstrip("."), "Field required"
    return f"{loc or '<root>'}: {reason}"


def validate(model: type[S], obj: Any) -> S:
    """Check a parsed document against ``model``; ProtocolError names the field and the problem."""
    if isinstance(obj, dict) and "v" in obj and obj["v"] != SCHEMA_VERSION:
        raise ProtocolError(f"unsupported schema version {obj['v']!r} (this side speaks {SCHEMA_VERSION})")
    try:
        return msgspec.convert(obj, model)
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"invalid {model.__name__}: {problem(exc)}") from None
