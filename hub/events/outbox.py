"""The outbox: an event becomes delivery rows in the transaction of the change it announces.

So a webhook never hears of a change that rolled back, and a hub that stops between the commit and
the send still sends it after a restart (the sender, ``webhooks.py``, reads the rows).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from typing import Any

from hub.events.catalog import audit_event, event_data, wants
from hub.store import Connection, loads, now

Target = tuple[int | None, str]  # (webhook id, or None for an alert rule's own URL; url)


def event_body(event_id: str, event: str, ts: float, data: dict[str, Any]) -> str:
    """The JSON every receiver gets: ``{"id", "event", "ts", "data"}`` (signed as these exact bytes)."""
    return json.dumps({"id": event_id, "event": event, "ts": ts, "data": data}, sort_keys=True,
                      separators=(",", ":"), default=str)


def enqueue(tx: Connection, event: str, data: dict[str, Any], targets: Iterable[Target]) -> str | None:
    """One delivery per target, pending now; returns the event id (None when nobody is to hear of it)."""
    targets = list(targets)
    if not targets:
        return None
    event_id, ts = uuid.uuid4().hex, now()
    body = event_body(event_id, event, ts, data)
    tx.insert_many("webhook_deliveries", ("event_id", "event", "webhook", "url", "body", "next_at", "created_at"),
                   [(event_id, event, hook, url, body, ts, ts) for hook, url in targets])
    return event_id


def publish(tx: Connection, event: str, data: dict[str, Any], also: Iterable[str] = ()) -> str | None:
    """Announce ``event`` to every webhook subscribed to it, and to the URLs in ``also`` (unsigned)."""
    subscribed = [(r["id"], r["url"]) for r in tx.query("SELECT id, url, events FROM webhooks ORDER BY id")
                  if wants(loads(r["events"], []), event)]
    return enqueue(tx, event, data, subscribed + [(None, url) for url in also if url])


def publish_audit(tx: Connection, actor: str, action: str, subject: str, detail: dict[str, Any]) -> str | None:
    """The event an audit record announces, if it is one (``hub/audit.py`` calls this for every record)."""
    event = audit_event(action)
    if event is None:
        return None
    data = event_data(action, subject, actor, detail)
    if action.startswith("rollout.") and "rollout" in detail:
        data |= _rollout_facts(tx, int(detail["rollout"]))
    return publish(tx, event, data)


def _rollout_facts(tx: Connection, rollout: int) -> dict[str, Any]:
    """What a CI job wants to know of a rollout event: the revision, its module, the one it replaces, why."""
    r = tx.one("SELECT deployment, revision, from_revision, reason FROM rollouts WHERE id = ?", (rollout,))
    if r is None:
        return {}

    def module(revision: int | None) -> str | None:
        row = revision and tx.one("SELECT module_name, module_version FROM deployment_revisions "
                                  "WHERE deployment = ? AND revision = ?", (r["deployment"], revision))
        return f"{row['module_name']}:{row['module_version']}" if row else None

    return {"revision": r["revision"], "module": module(r["revision"]), "from_revision": r["from_revision"],
            "from_module": module(r["from_revision"]), "reason": r["reason"]}
