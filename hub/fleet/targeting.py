"""Deployment targets: ``*`` (every device), ``id1,id2`` (device ids) or ``k=v,k2!=v2`` (label selector)."""

from __future__ import annotations

from dataclasses import dataclass, field

from hub.errors import Invalid
from protocol.encoding import ProtocolError
from protocol.topics import check_device_id

MAX_TERMS = 1000  # device ids or label conditions in one target; label a larger set of devices instead


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
        raise Invalid("empty target: use '*', 'id1,id2' or 'key=value,key2!=value2'")
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
    """:func:`parse_target` with the limits a new deployment revision must meet (stored ones are read as they are)."""
    target = parse_target(text)
    terms = len(target.ids) + len(target.equals) + len(target.not_equals)
    if terms > MAX_TERMS:
        raise Invalid(f"target lists {terms} terms, at most {MAX_TERMS}: give those devices a label and select it")
    try:
        for device_id in target.ids:
            check_device_id(device_id)
    except ProtocolError as exc:
        raise Invalid(f"target: {exc}") from None
    return target
