"""Deployment targets: ``*`` (every device), ``id1,id2`` (device ids) or ``k=v,k2!=v2`` (label selector).

:func:`check_target` is what the API applies to a target an operator types: a typo (``site==berlin``,
``site~berlin``, ``=berlin``) is refused with the reason instead of being stored as a selector that
matches nothing. :func:`parse_target` reads targets already stored, as it always has.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from hub.errors import Invalid
from protocol.encoding import ProtocolError
from protocol.topics import check_device_id

MAX_TERMS = 1000  # device ids or label conditions in one target; label a larger set of devices instead
LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,62}$")
OPERATOR_CHARS = set("=!~<>*")  # in a value they mean a mistyped operator, not part of the value
FORMS = "use '*', device ids 'id1,id2' or label conditions 'key=value,key2!=value2'"


@dataclass(frozen=True)
class Target:
    everyone: bool = False
    ids: frozenset[str] = frozenset()
    equals: tuple[tuple[str, str], ...] = field(default=())
    not_equals: tuple[tuple[str, str], ...] = field(default=())

    def matches(self, device_id: str, labels: dict[str, str]) -> bool:
        if self.everyone:
            return True
        if self.ids:
            return device_id in self.ids
        return all(labels.get(k) == v for k, v in self.equals) and all(labels.get(k) != v for k, v in self.not_equals)


def parse_target(text: str) -> Target:
    text = text.strip()
    if text == "*":
        return Target(everyone=True)
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise Invalid(f"empty target: {FORMS}")
    selectors = [p for p in parts if "=" in p]
    if not selectors:
        return Target(ids=frozenset(parts))
    if len(selectors) != len(parts):
        raise Invalid(f"target {text!r} mixes device ids and label conditions")
    equals, not_equals = [], []
    for p in parts:
        negated = "!=" in p
        key, _, value = p.partition("!=" if negated else "=")
        if not key.strip():
            raise Invalid(f"label condition {p!r} has no key")
        (not_equals if negated else equals).append((key.strip(), value.strip()))
    return Target(equals=tuple(equals), not_equals=tuple(not_equals))


def check_target(text: str) -> Target:
    """Parse a target typed by an operator, refusing anything that is not exactly one of the three forms."""
    target = parse_target(text)
    if target.everyone:
        return target
    terms = len(target.ids) + len(target.equals) + len(target.not_equals)
    if terms > MAX_TERMS:
        raise Invalid(f"target lists {terms} terms, at most {MAX_TERMS}: give those devices a label and select it")
    parts = [p.strip() for p in text.split(",")]
    if any(not p for p in parts):
        raise Invalid(f"target {text!r} has an empty item (a stray comma): {FORMS}")
    for p in parts:
        if "=" not in p:
            bad = sorted(set(p) & OPERATOR_CHARS)
            if bad:
                raise Invalid(f"target item {p!r} is neither a device id nor a label condition: {bad[0]!r} is not "
                              f"an operator (use '=' or '!='); {FORMS}")
            try:
                check_device_id(p)
            except ProtocolError as exc:
                raise Invalid(f"target item {p!r} is neither a device id nor a label condition ({exc}); {FORMS}") from None
            continue
        negated = "!=" in p
        key, op, value = p.partition("!=" if negated else "=")
        key, value = key.strip(), value.strip()
        if not key:
            raise Invalid(f"label condition {p!r} has no key")
        if not LABEL_KEY_RE.match(key):
            raise Invalid(f"label condition {p!r}: key {key!r} is not a label key (letters, digits, '_', '.', '/', '-')")
        if value.startswith("="):
            raise Invalid(f"label condition {p!r}: use {op!r} once ({key}{op}{value.lstrip('=')}), not '{op}='")
        if not value:
            raise Invalid(f"label condition {p!r} has no value")
        bad = sorted(set(value) & OPERATOR_CHARS)
        if bad:
            raise Invalid(f"label condition {p!r}: {bad[0]!r} in the value looks like a mistyped operator")
    return target
