"""The audit log: who did what to which subject, when. Written in the same transaction as the change.

Tamper-evident: each row stores ``hash = sha256(prev_hash + canonical row)`` where ``prev_hash`` is
the hash of the row before it, so :func:`verify` names the first row that was edited, and the first
row after one that was deleted. It does not stop someone who can rewrite the whole table from
re-computing every hash: keep :func:`verify`'s head hash somewhere else now and then to anchor it
(docs/security.md).

The API also records every successful mutating request a route did not record itself
(``hub/api/limits.py``); :func:`request_scope` lets it see whether a route did.

A record whose action is a public event (``hub/events/catalog.py``) also queues that event for the
webhooks subscribed to it, in the same transaction.
"""

from __future__ import annotations

import contextvars
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from hub.events.outbox import publish_audit
from hub.store import Connection, Database, dumps, loads, now

CONTROLLER = "controller"  # the actor for what the rollout controller decides on its own
GENESIS = "0" * 64  # prev_hash of the first row
PAGE = 5000

# a request in flight: how many rows it recorded (a list, so threads running the route share the count)
_request: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("edgefleet_audit_request", default=None)


def canonical(row: dict[str, Any]) -> str:
    """What a row's hash covers: time (to the microsecond), actor, action, subject and detail text."""
    return dumps([f"{float(row['ts']):.6f}", row["actor"], row["action"], row["subject"], row["detail"]])


def row_hash(prev_hash: str, row: dict[str, Any]) -> str:
    return hashlib.sha256((prev_hash + canonical(row)).encode()).hexdigest()


def _head(tx: Connection) -> str:
    """The hash the next row chains to; rows written before the chain existed are chained first (once)."""
    last = tx.one("SELECT id, hash FROM audit WHERE hash IS NOT NULL ORDER BY id DESC LIMIT 1")
    if last is not None:
        return str(last["hash"])
    prev = GENESIS  # no chained row yet: chain whatever older hubs wrote, in order
    for row in tx.query("SELECT * FROM audit ORDER BY id"):
        this = row_hash(prev, row)
        tx.execute("UPDATE audit SET prev_hash = ?, hash = ? WHERE id = ?", (prev, this, row["id"]))
        prev = this
    return prev


def seal(db: Database) -> None:
    """Chain the rows an older hub wrote without hashes (at start; a no-op once any row is chained)."""
    with db.transaction() as tx:
        _head(tx)


def record(db: Database, actor: str, action: str, subject: str, **detail: Any) -> None:
    """Append one event; joins the caller's transaction when there is one."""
    with db.transaction() as tx:
        prev = _head(tx)
        row = {"ts": round(now(), 6), "actor": actor, "action": action, "subject": subject, "detail": dumps(detail)}
        tx.insert("audit", row | {"prev_hash": prev, "hash": row_hash(prev, row)})
        publish_audit(tx, actor, action, subject, detail)
    counter = _request.get()
    if counter is not None:
        counter[0] += 1


@contextmanager
def request_scope() -> Iterator[list[int]]:
    """Count the rows recorded while handling one request (``[n]``), in this context and threads it starts."""
    counter = [0]
    token = _request.set(counter)
    try:
        yield counter
    finally:
        _request.reset(token)


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


def verify(db: Database) -> dict[str, Any]:
    """Walk the chain from the first row: ``ok``, rows checked, the head (id, hash), and the first broken link."""
    prev, prev_id, checked, after = GENESIS, None, 0, 0
    with db.reader() as conn:
        while rows := conn.query("SELECT * FROM audit WHERE id > ? ORDER BY id LIMIT ?", (after, PAGE)):
            for row in rows:
                broken = _check(row, prev, prev_id)
                if broken:
                    return {"ok": False, "rows": checked, "broken": {"id": row["id"], "reason": broken},
                            "head": {"id": prev_id, "hash": prev}}
                prev, prev_id = row["hash"], row["id"]
                checked += 1
            after = rows[-1]["id"]
    return {"ok": True, "rows": checked, "broken": None, "head": {"id": prev_id, "hash": prev}}


def _check(row: dict[str, Any], prev: str, prev_id: int | None) -> str:
    if not row["hash"] or not row["prev_hash"]:
        return f"row {row['id']} has no hash: it was written around the chain"
    if row_hash(row["prev_hash"], row) != row["hash"]:
        return f"row {row['id']} does not match its hash: it was edited after it was written"
    if row["prev_hash"] != prev:
        before = f"row {prev_id}" if prev_id is not None else "the start of the log"
        return (f"row {row['id']} does not chain to {before}: rows between them were deleted, or {before} was"
                " rewritten")
    return ""
