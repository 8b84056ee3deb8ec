"""The audit log: who did what to which subject, when. Written in the same transaction as the change.

A record whose action is a public event (``hub/events/catalog.py``) also queues that event for the
webhooks subscribed to it, in the same transaction.
"""

from __future__ import annotations

from typing import Any

from hub.events.outbox import publish_audit
from hub.store import Database, dumps, loads, now

CONTROLLER = "controller"  # the actor for what the rollout controller decides on its own


def record(db: Database, actor: str, action: str, subject: str, **detail: Any) -> None:
    """Append one event; joins the caller's transaction when there is one."""
    with db.transaction() as tx:
        tx.execute("INSERT INTO audit (ts, actor, action, subject, detail) VALUES (?, ?, ?, ?, ?)",
                   (now(), actor, action, subject, dumps(detail)))
        publish_audit(tx, actor, action, subject, detail)


def events(db: Database, subject: str | None = None, action: str | None = None, limit: int = 200,
           since_id: int = 0) -> list[dict[str, Any]]:
    where, params = ["id > ?"], [since_id]
    if subject:
        where.append("subject = ?")
        params.append(subject)
    if action:
        where.append("action LIKE ?")
        params.append(action.replace("*", "%"))
    rows = db.query(f"SELECT * FROM audit WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?", (*params, limit))
    return [r | {"detail": loads(r["detail"], {})} for r in rows]
