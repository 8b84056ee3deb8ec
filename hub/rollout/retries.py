"""Asking devices again for a bundle they gave up on (``rollout retry``).

A device that failed or rolled back bundle B does not install B again on its own (agent/reconcile.py);
the hub raises B's ``retry`` number in that device's desired state (protocol DesiredModule.retry), and
the agent installs B once more. ``install_retries`` keeps, per device and bundle, the number and the
desired revision that carried it: until the device reports on that revision or later, its old
"failed" is stale and the rollout counts it as pending (so a retried wave is not halted by it again).
"""

from __future__ import annotations

from typing import Any

from hub.store import Database


def numbers(db: Database) -> dict[tuple[str, str], int]:
    """(device, bundle digest) -> retry number, for the director."""
    return {(r["device"], r["digest"]): r["retry"] for r in db.query("SELECT device, digest, retry FROM install_retries")}


def bump(db: Database, devices: list[str], digest: str) -> None:
    """Raise the retry number of ``digest`` on ``devices`` (inside the caller's transaction)."""
    for device in devices:
        db.db().execute("INSERT INTO install_retries (device, digest, retry, revision) VALUES (?, ?, 1, NULL)"
                        " ON CONFLICT (device, digest) DO UPDATE SET retry = install_retries.retry + 1,"
                        " revision = NULL", (device, digest))


def issued(db: Database, devices: list[str], digest: str) -> None:
    """Record the desired revision each device now holds: the one that carries its retry."""
    with db.transaction() as tx:
        for device in devices:
            tx.execute("UPDATE install_retries SET revision = (SELECT revision FROM devices WHERE id = ?)"
                       " WHERE device = ? AND digest = ?", (device, device, digest))


def pending_since(db: Database, digest: str) -> dict[str, int]:
    """Device -> the desired revision its retry of ``digest`` went out in (0: not published yet)."""
    return {r["device"]: r["revision"] or 0 for r in db.query(
        "SELECT device, revision FROM install_retries WHERE digest = ?", (digest,))}


def stale(reported: dict[str, Any] | None, retried_in: int | None) -> bool:
    """Does this report predate the retry the device was sent (``retried_in``: its desired revision; 0: not
    yet published)? Then what it says of the bundle (failed) is no longer so: count the device as pending."""
    if retried_in is None:
        return False
    return not retried_in or int((reported or {}).get("revision") or 0) < retried_in
