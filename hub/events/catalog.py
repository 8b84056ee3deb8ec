"""The events a webhook can subscribe to, and which audit actions announce them (pure: no I/O).

Most events are announced by the audit record of the change (``hub/audit.py``), so an event exists
exactly when its change committed. Alerts publish theirs directly (they are not operators' actions).
"""

from __future__ import annotations

from typing import Any

EVENTS: tuple[str, ...] = (
    "model.registered",   # a model version was registered
    "model.evaluated",    # metrics were recorded on a model version
    "alias.moved",        # an alias (e.g. champion) now names another version (or was set for the first time)
    "alias.deleted",
    "rollout.started",    # a deployment revision started rolling out
    "rollout.succeeded",  # every wave passed its gates: the revision is stable
    "rollout.rolled_back",  # a gate failed (or an operator rolled back): devices are back on the stable revision
    "rollout.halted",     # a gate failed with on_failure=halt: waiting for an operator
    "rollout.aborted",
    "alert.fired",
    "alert.resolved",
)
PING = "ping"  # sent to one webhook on request (``edgefleet webhook ping``), never subscribed to
ALL = "*"

# audit action -> event name
AUDIT_EVENTS: dict[str, str] = {
    "model.registered": "model.registered",
    "model.evaluated": "model.evaluated",
    "alias.moved": "alias.moved",
    "alias.deleted": "alias.deleted",
    "rollout.created": "rollout.started",
    "rollout.succeeded": "rollout.succeeded",
    "rollout.rolled_back": "rollout.rolled_back",
    "rollout.halted": "rollout.halted",
    "rollout.aborted": "rollout.aborted",
}


def check_events(names: list[str]) -> list[str]:
    """The subscription's event names, deduplicated in order; ValueError naming the unknown ones."""
    unknown = [n for n in names if n != ALL and n not in EVENTS]
    if unknown:
        raise ValueError(f"unknown event(s) {unknown}: choose from {', '.join(EVENTS)} (or '*' for all)")
    if not names:
        raise ValueError(f"name at least one event: {', '.join(EVENTS)} (or '*' for all)")
    return list(dict.fromkeys(names))


def wants(subscribed: list[str], event: str) -> bool:
    return event in subscribed or (ALL in subscribed and event != PING)


def audit_event(action: str) -> str | None:
    """The event an audit action announces, if any."""
    return AUDIT_EVENTS.get(action)


def event_data(action: str, subject: str, actor: str, detail: dict[str, Any]) -> dict[str, Any]:
    """An event's ``data`` from its audit record; rollout events name their deployment."""
    data = dict(detail)
    if action.startswith("rollout."):
        data["deployment"] = subject
    data.setdefault("actor", actor)
    return data
