"""Enrolment tokens after they are issued: list them (never the token itself) and revoke them.

Issuing and spending them is the fleet's (``hub/fleet/devices.py``). A token's id is the first 12 hex
digits of its sha256, as for API tokens (``hub/trust/tokens.py``).
"""

from __future__ import annotations

from typing import Any

from hub.audit import record
from hub.errors import Conflict, Invalid, NotFound
from hub.store import Database, loads, now

ID_CHARS = 12


def _state(row: dict[str, Any], t: float) -> str:
    if row["revoked_at"] is not None:
        return "revoked"
    if row["used"] >= row["uses"]:
        return "used"
    if row["expires_at"] <= t:
        return "expired"
    return "active"


def _view(row: dict[str, Any], t: float) -> dict[str, Any]:
    return {"id": row["token_hash"][:ID_CHARS], "state": _state(row, t), "labels": loads(row["labels"], {}),
            "uses": row["uses"], "used": row["used"], "used_by": row["used_by"], "expires_at": row["expires_at"],
            "created_at": row["created_at"], "created_by": row["created_by"], "revoked_at": row["revoked_at"]}


def list_enrolment_tokens(db: Database, include_inactive: bool = False, limit: int = 1000) -> list[dict[str, Any]]:
    """Newest first; only those that can still enrol a device unless ``include_inactive``."""
    t = now()
    where = "" if include_inactive else " WHERE revoked_at IS NULL AND used < uses AND expires_at > ?"
    rows = db.query(f"SELECT * FROM enrollment_tokens{where} ORDER BY created_at DESC, token_hash LIMIT ?",
                    ((t,) if where else ()) + (limit,))
    return [_view(r, t) for r in rows]


def revoke_enrolment_token(db: Database, ref: str, actor: str) -> dict[str, Any]:
    """Revoke by id (8+ hex digits of it): no device can enrol with it from now on; enrolled devices stay."""
    ref = ref.lower()
    if len(ref) < 8 or len(ref) > 64 or any(c not in "0123456789abcdef" for c in ref):
        raise Invalid(f"{ref!r} is not a token id: 8 to 64 hex digits (edgefleet device token list)")
    with db.transaction() as tx:
        rows = tx.query("SELECT * FROM enrollment_tokens WHERE token_hash >= ? AND token_hash < ? LIMIT 2",
                        (ref, ref + "g"))  # a range, not LIKE: the prefix is used as an index bound
        if not rows:
            raise NotFound(f"no enrolment token with an id starting {ref!r}")
        if len(rows) > 1:
            raise Conflict(f"{ref!r} matches several enrolment tokens: give more of the id")
        row, t = rows[0], now()
        if row["revoked_at"] is None:
            tx.execute("UPDATE enrollment_tokens SET revoked_at = ? WHERE token_hash = ?", (t, row["token_hash"]))
            record(db, actor, "enrollment_token.revoked", row["token_hash"][:ID_CHARS], used=row["used"],
                   uses=row["uses"])
            row = row | {"revoked_at": t}
    return _view(row, t)
