"""The base of every schema (frozen msgspec Structs) and the one checked conversion into them.

Constructing a schema object does not check its constraints (the producer's side builds what it
means); :func:`validate` and :func:`protocol.messages.decode` do, for everything received.
"""

from __future__ import annotations

import re
import sys
from typing import Annotated, Any, TypeVar

import msgspec
from msgspec import Meta

from protocol.encoding import ProtocolError
from protocol.names import NAME_PATTERN, name_problem

SCHEMA_VERSION = 1
DIGEST_PATTERN = r"^[0-9a-f]{64}\Z"  # \Z, not $: "$" would also take a trailing newline

INT63_MAX = 2**63 - 1  # SQLite's INTEGER and every signed 64-bit reader: a larger number fails far from its source
_FLOAT_MAX = sys.float_info.max
# Bounds that NaN fails too (every comparison with NaN is false): finite numbers only.
Finite = Annotated[float, Meta(ge=-_FLOAT_MAX, le=_FLOAT_MAX)]
NonNegative = Annotated[int, Meta(ge=0, le=INT63_MAX)]
Positive = Annotated[int, Meta(ge=1, le=INT63_MAX)]

S = TypeVar("S", bound="Schema")
_MISSING = re.compile(r"Object missing required field `(.+)`")
_NOT_FINITE = re.compile(rf"Expected `float` [<>]= -?{re.escape(repr(_FLOAT_MAX))}")  # msgspec's words for Finite


class Schema(msgspec.Struct, frozen=True, kw_only=True):
    """Immutable; unknown fields in received documents are ignored (a newer peer may add some)."""

    def to_dict(self) -> dict[str, Any]:
        """The builtins (JSON) form: what is encoded, hashed and signed."""
        return msgspec.to_builtins(self)  # type: ignore[no-any-return]


def problem(exc: msgspec.ValidationError, obj: Any = None) -> str:
    """msgspec's "reason - at `$.a[0].b`" as "a.0.b: reason" (the field first, as the protocol's errors read).

    A name that breaks the name rule is quoted from ``obj`` (the checked document) with the rule it breaks.
    """
    text = str(exc)
    reason, sep, where = text.rpartition(" - at `")
    if not sep:
        reason, where = text, "$`"
    loc = re.sub(r"\[(\d+)\]", r".\1", where[1:-1]).lstrip(".")
    missing = _MISSING.fullmatch(reason)
    if missing:
        loc, reason = f"{loc}.{missing[1]}".lstrip("."), "Field required"
    elif _NOT_FINITE.fullmatch(reason):
        reason = "not a finite number (NaN and infinities are refused)"
    elif NAME_PATTERN[1:-2] in reason:
        value = _at(obj, loc)
        reason = f"invalid name {value!r}: {name_problem(value) or 'is not a name'}"
    return f"{loc or '<root>'}: {reason}"


def _at(obj: Any, loc: str) -> Any:
    """The value at "a.0.b" in a parsed document (None where the path does not lead)."""
    for key in filter(None, loc.split(".")):
        if isinstance(obj, list) and key.isdigit() and int(key) < len(obj):
            obj = obj[int(key)]
        elif isinstance(obj, dict):
            obj = obj.get(key)
        else:
            return None
    return obj


def validate(model: type[S], obj: Any) -> S:
    """Check a parsed document against ``model``; ProtocolError names the field and the problem."""
    if isinstance(obj, dict) and "v" in obj and obj["v"] != SCHEMA_VERSION:
        raise ProtocolError(f"unsupported schema version {obj['v']!r} (this side speaks {SCHEMA_VERSION})")
    try:
        return msgspec.convert(obj, model)
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"invalid {model.__name__}: {problem(exc, obj)}") from None
