"""What the rollout controller reads and writes: one rollout's row, revisions and device states, and its
transitions (checked against the table in rollout_states.py, fenced, compare-and-set, audited).

Kept apart from the controller (rollouts.py) so the state machine's steps read as decisions, and the
views (status, plan, listing) need no controller to answer.
"""

from __future__ import annotations

from typing import Any

from hub.audit import CONTROLLER, record
from hub.errors import Conflict, NotFound
from hub.fleet.device_state import bundle_state
from hub.leader import Leader
from hub.rollout import retries
from hub.rollout import rollout_states as S
from hub.rollout import rollout_view as view
from hub.store import Database, loads, now


class RolloutRecords:
    """Rollout rows in the store, for the controller and the API."""

    def __init__(self, db: Database, leader: Leader) -> None:
        self.db, self.leader = db, leader

    # --- views -----------------------------------------------------------------------------------

    def status(self, deployment: str, rollout_id: int | None = None, page: dict[str, Any] | None = None) -> dict[str, Any]:
        """The latest (or given) rollout of ``deployment``: state, counts by device state, per-device detail, the
        devices holding the current wave and the time left, and how it ended (hub/rollout/rollout_view.py)."""
        r = (self.db.one("SELECT * FROM rollouts WHERE id = ? AND deployment = ?", (rollout_id, deployment))
             if rollout_id else self.db.one("SELECT * FROM rollouts WHERE deployment = ? ORDER BY id DESC LIMIT 1",
                                            (deployment,)))
        if r is None:
            raise NotFound(f"deployment {deployment!r} has no rollout")
        prev = self._revision(r, r["from_revision"]) if r["from_revision"] else None
        return view.status(self.db, r, self._revision(r), prev, page=page)

    def last_plan(self, deployment: str) -> dict[str, Any] | None:
        """The plan (strategy, bake, gates, on failure, wave timeout) of the deployment's latest rollout, if any."""
        r = self.db.one("SELECT * FROM rollouts WHERE deployment = ? ORDER BY id DESC LIMIT 1", (deployment,))
        return view.plan(r) if r else None

    def list(self, deployment: str | None = None) -> list[dict[str, Any]]:
        rows = self.db.query("SELECT * FROM rollouts" + (" WHERE deployment = ?" if deployment else "")
                             + " ORDER BY id DESC", (deployment,) if deployment else ())
        return view.listing(rows)

    # --- helpers ---------------------------------------------------------------------------------

    def _get(self, rid: int) -> dict[str, Any]:
        r = self.db.one("SELECT * FROM rollouts WHERE id = ?", (rid,))
        if r is None:
            raise NotFound(f"rollout {rid} does not exist")
        return r

    def _live(self, deployment: str) -> list[dict[str, Any]]:
        terminal = ",".join(f"'{s}'" for s in sorted(S.TERMINAL))
        return self.db.query(f"SELECT * FROM rollouts WHERE deployment = ? AND state NOT IN ({terminal}) ORDER BY id",
                             (deployment,))

    def _one_live(self, deployment: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        live = self._live(deployment)
        if not live:
            if self.db.one("SELECT 1 FROM deployments WHERE name = ?", (deployment,)) is None:
                raise NotFound(f"deployment {deployment!r} does not exist")
            raise Conflict(f"deployment {deployment!r} has no rollout in progress")
        if live[0]["state"] not in allowed:
            raise Conflict(f"the rollout of {deployment!r} is {S.display(live[0]['state'], live[0]['wave'])}:"
                           f" this needs one of {', '.join(allowed)}")
        return live[0]

    def _revision(self, r: dict[str, Any], revision: int | None = None) -> dict[str, Any]:
        row = self.db.one("SELECT * FROM deployment_revisions WHERE deployment = ? AND revision = ?",
                          (r["deployment"], revision or r["revision"]))
        assert row is not None, "a rollout always names a stored revision"
        return row

    def _states(self, r: dict[str, Any]) -> dict[str, tuple[str, str]]:
        digest = self._revision(r)["digest"]
        retried = retries.pending_since(self.db, digest)
        out = {}
        for d in self.db.query("SELECT d.id, d.reported FROM rollout_devices p JOIN devices d ON d.id = p.device"
                               " WHERE p.rollout = ?", (r["id"],)):
            reported = loads(d["reported"])
            out[d["id"]] = ("pending", "") if retries.stale(reported, retried.get(d["id"])) else bundle_state(
                reported, digest)
        return out

    def _move(self, r: dict[str, Any], new: str, actor: str, detail: dict[str, Any] | None = None,
              **fields: Any) -> None:
        """Persist one transition (checked against the table) and audit it; call inside a transaction.

        The controller's transitions are fenced by the leader's lease; every transition applies only if
        the rollout is still in the state it was computed from (else :class:`Conflict`, and the
        transaction rolls back).
        """
        S.check(r["state"], new)
        tx = self.db.db()
        if actor == CONTROLLER:
            self.leader.fence(tx)
        fields |= {"state": new, "updated_at": now()}
        sets = ", ".join(f"{k} = ?" for k in fields)
        moved = tx.scalar(f"UPDATE rollouts SET {sets} WHERE id = ? AND state = ? AND wave = ? RETURNING id",
                          (*fields.values(), r["id"], r["state"], r["wave"]))
        if moved is None:
            raise Conflict(f"rollout {r['id']} is no longer {r['state']}: it changed meanwhile")
        record(self.db, actor, f"rollout.{new}", r["deployment"], rollout=r["id"],
               wave=fields.get("wave", r["wave"]) + 1, reason=fields.get("reason", ""), **(detail or {}))
        r.update(fields)
