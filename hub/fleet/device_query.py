"""The device list's search and filters as SQL over ``devices`` (pure: builds the clause, runs nothing).

Labels and desired modules are stored as canonical JSON (sorted keys, no spaces: ``hub.store.dumps``), so
``"site":"berlin"`` occurs in a row's ``labels`` exactly when its label ``site`` is ``berlin`` (a quote
inside a value is escaped, so a value cannot fake a pair) and ``"deployment":"edge"`` in ``desired``
exactly when a module the device is given comes from deployment ``edge``. ``instr`` keeps that match
case-sensitive and needs no escaping (a PostgreSQL store spells it ``strpos``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from hub.errors import Invalid
from hub.fleet.device_state import STATES
from hub.fleet.targeting import check_target

STATUSES = ("online", "offline", *STATES)


def _json_text(s: str) -> str:
    """``s`` as it appears inside a JSON string written by ``hub.store.dumps`` (without the quotes)."""
    return json.dumps(s)[1:-1]


def _like(s: str) -> str:
    return "%" + s.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


@dataclass(frozen=True)
class DeviceFilter:
    """``q``: a piece of the device id, of a label key or value, or the start of a module name (case-insensitive);
    ``status``: online, offline or a device state (idle, pending, installing, running, failed);
    ``label``: label conditions ``k=v,k2!=v2`` (as in targets); ``deployment``: devices given a module by it."""

    q: str = ""
    status: str = ""
    label: str = ""
    deployment: str = ""

    def __post_init__(self) -> None:
        if self.status and self.status not in STATUSES:
            raise Invalid(f"status {self.status!r} is not one of {', '.join(STATUSES)}")
        if self.label:
            target = check_target(self.label)
            if target.everyone or target.ids:
                raise Invalid(f"label filter {self.label!r} is not label conditions: use 'key=value,key2!=value2'")

    @property
    def empty(self) -> bool:
        return not (self.q or self.status or self.label or self.deployment)

    def where(self, *, status: bool = True) -> tuple[str, list[object]]:
        """`` WHERE …`` (or "") and its parameters; ``status=False`` leaves the status out (for counts by status)."""
        terms: list[str] = []
        params: list[object] = []
        if self.q:
            pattern = _like(self.q)
            name = '%"name":"' + _like(_json_text(self.q))[1:]  # a module name that starts with q
            terms.append("(id LIKE ? ESCAPE '\\' OR labels LIKE ? ESCAPE '\\' OR desired LIKE ? ESCAPE '\\')")
            params += [pattern, _like(_json_text(self.q)), name]
        if status and self.status in ("online", "offline"):
            terms.append("online = ?")
            params.append(int(self.status == "online"))
        elif status and self.status:
            terms.append("state = ?")
            params.append(self.status)
        if self.label:
            target = check_target(self.label)
            for (k, v), negated in [*((p, False) for p in target.equals), *((p, True) for p in target.not_equals)]:
                terms.append(f"instr(labels, ?) {'=' if negated else '>'} 0")
                params.append(json.dumps({k: v}, separators=(",", ":"))[1:-1])
        if self.deployment:
            terms.append("instr(COALESCE(desired, ''), ?) > 0")
            params.append(json.dumps({"deployment": self.deployment}, separators=(",", ":"))[1:-1])
        return (" WHERE " + " AND ".join(terms) if terms else ""), params
