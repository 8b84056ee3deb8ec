"""The one name rule: what modules, deployments, endpoints, models, devices and bundle files may be called.

A name becomes a directory on a device, a level of an MQTT topic, a broker login and a line of the
broker's password file, so it is deliberately narrow:

* 1 to 64 characters (a bundle file name: up to 128) of ``A-Z a-z 0-9 _ . -``;
* the first one a letter, a digit or ``_`` (so never ``.``, ``..``, a hidden file or an option ``-x``).

That leaves out ``/``, ``\\``, NUL and every control character, whitespace anywhere (so no leading or
trailing blanks, no newline that would split a password-file line), ``:`` (the ``name:version`` and
``user:hash`` separator), the MQTT wildcards ``+`` ``#`` and ``$``, and non-ASCII look-alikes. Names are
case-sensitive. A bundle file path is names joined by ``/`` (at most :data:`MAX_PATH_PARTS` of them).

Checked where input enters (the msgspec schemas, the hub's API) and again right before the
filesystem is touched (agent install, bundle unpack): :func:`check_name` says which rule failed.
"""

from __future__ import annotations

import re
from typing import Annotated

from msgspec import Meta

from protocol.encoding import ProtocolError

NAME_MAX = 64
FILE_NAME_MAX = 128
MAX_PATH_PARTS = 8
NAME_CHARS = "A-Za-z0-9._-"
# \Z, not $: "$" also matches before a trailing newline, which is how "dev1\n" got into a password file
NAME_PATTERN = rf"^[A-Za-z0-9_][{NAME_CHARS}]{{0,{NAME_MAX - 1}}}\Z"
_NAME = re.compile(rf"[A-Za-z0-9_][{NAME_CHARS}]{{0,{NAME_MAX - 1}}}")

# Broker logins the hub keeps for itself (its own, its ingest workers', future ones): no device id may take one.
RESERVED_PREFIX = "edgefleet-"

Name = Annotated[str, Meta(pattern=NAME_PATTERN, description="1-64 of A-Z a-z 0-9 _ . -, not starting with . or -")]
OptionalName = Annotated[str, Meta(pattern=rf"^(?:{NAME_PATTERN[1:-2]})?\Z")]  # a name, or "" for none


def name_problem(value: object, max_length: int = NAME_MAX) -> str | None:
    """Why ``value`` is not a name (None if it is one): the first rule it breaks, in words."""
    if not isinstance(value, str):
        return f"is a {type(value).__name__}, not a string"
    if not value:
        return "is empty"
    if len(value) > max_length:
        return f"is {len(value)} characters long (at most {max_length})"
    if value in (".", ".."):
        return "is a relative directory reference"
    bad = next((c for c in value if not (c.isascii() and (c.isalnum() or c in "._-"))), None)
    if bad is not None:
        what = {"/": "a '/'", "\\": "a '\\'", "\x00": "a NUL"}.get(bad)
        if what is None:
            what = "whitespace" if bad.isspace() else ("a control character" if ord(bad) < 32 or ord(bad) == 127
                                                         else f"{bad!r}")
        return f"contains {what} (allowed: letters, digits, '_', '.', '-')"
    if value[0] in ".-":
        return f"starts with {value[0]!r}"
    return None


def check_name(value: str, what: str = "name", max_length: int = NAME_MAX) -> str:
    """``value`` if it is a name, else ProtocolError naming ``what`` and the rule it breaks."""
    if max_length == NAME_MAX and is_name(value):  # the hot path (a device id per message): one regex
        return value
    problem = name_problem(value, max_length)
    if problem is not None:
        raise ProtocolError(f"invalid {what} {value!r}: {problem}")
    return value


def is_name(value: object) -> bool:
    return isinstance(value, str) and _NAME.fullmatch(value) is not None


def check_file_path(path: str) -> str:
    """A bundle file path: 1..MAX_PATH_PARTS names (each up to FILE_NAME_MAX) joined by single ``/``."""
    if not isinstance(path, str) or not path:
        raise ProtocolError(f"unsafe file path in manifest: {path!r} is empty")
    parts = path.split("/")
    if len(parts) > MAX_PATH_PARTS:
        raise ProtocolError(f"unsafe file path in manifest: {path[:200]!r} has more than {MAX_PATH_PARTS} parts")
    for part in parts:
        problem = name_problem(part, FILE_NAME_MAX)
        if problem is not None:
            raise ProtocolError(f"unsafe file path in manifest: {path[:200]!r}: part {part!r} {problem}")
    return path


def is_reserved_login(device_id: str) -> bool:
    """Whether ``device_id`` falls in the hub's own broker-login namespace (case-insensitively: one login, one owner)."""
    return device_id.lower().startswith(RESERVED_PREFIX)
