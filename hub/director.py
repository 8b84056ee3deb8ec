"""The director: each device's signed desired state, derived from the active deployments.

For each module name a device gets the highest-priority active deployment whose
target matches it (ties: the newest). A new state is signed with revision+1 and
published retained, QoS 1, only when the module list changes, or when the last
one nears expiry (a device refuses expired states, so they are renewed).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from hub.db import Database, dumps, loads
from hub.keys import KeyRing
from hub.targeting import parse_target
from protocol.encoding import canonical_json
from protocol.messages import DesiredModule, DesiredState
from protocol.signing import sign
from protocol.topics import Channel, device_topic

log = logging.getLogger("edgefleet.hub.director")

Publish = Callable[[str, bytes, int, bool], None]  # topic, payload, qos, retain


class Director:
    def __init__(self, db: Database, keys: KeyRing, ttl_s: int, publish: Publish) -> None:
        self.db, self.keys, self.ttl_s, self.publish = db, keys, ttl_s, publish
        # compute, commit and publish under one lock, so revision N+1 never reaches the broker before N
        self._lock = threading.Lock()

    def _deployments(self) -> list[dict[str, Any]]:
        rows = self.db.query(
            "SELECT d.*, m.size, m.envelope FROM deployments d JOIN modules m ON m.digest = d.digest"
            " WHERE d.active = 1")
        for r in rows:
            r["target_parsed"] = parse_target(r["target"])
            r["collect_rate_ppm"] = loads(r.pop("envelope"))["signed"]["manifest"].get("collect_rate_ppm", 0)
        return rows

    @staticmethod
    def modules_for(device_id: str, labels: dict[str, str], deployments: list[dict[str, Any]]) -> list[dict[str, Any]]:
        best: dict[str, dict[str, Any]] = {}
        for d in deployments:
            if not d["target_parsed"].matches(device_id, labels):
                continue
            cur = best.get(d["module_name"])
            if cur is None or (d["priority"], d["created_at"]) > (cur["priority"], cur["created_at"]):
                best[d["module_name"]] = d
        return [DesiredModule(name=d["module_name"], version=d["module_version"], bundle=d["digest"], size=d["size"],
                              deployment=d["name"], collect_rate_ppm=d["collect_rate_ppm"]).model_dump(mode="json")
                for _, d in sorted(best.items())]

    def sync(self, device_ids: list[str] | None = None, renew_before: float | None = None) -> int:
        """Publish a new desired state to each device (all when None) whose module list changed; return how many.

        With ``renew_before`` (unix time), also re-sign states that expire before it.
        """
        with self._lock:
            deployments = self._deployments()
            out: list[tuple[str, bytes]] = []
            with self.db.transaction() as tx:
                sql = "SELECT id, labels, revision, desired, desired_expires FROM devices"
                rows = self.db.query(sql) if device_ids is None else [
                    r for i in device_ids for r in self.db.query(sql + " WHERE id = ?", (i,))]
                for row in rows:
                    modules = self.modules_for(row["id"], loads(row["labels"], {}), deployments)
                    unchanged = row["desired"] is not None and loads(row["desired"]) == modules
                    expiring = renew_before is not None and (row["desired_expires"] or 0) < renew_before
                    if unchanged and not expiring:
                        continue
                    state = DesiredState(device=row["id"], revision=row["revision"] + 1,
                                         expires=int(time.time()) + self.ttl_s,
                                         modules=[DesiredModule.model_validate(m) for m in modules])
                    envelope = canonical_json(sign(state.model_dump(mode="json"), [self.keys.director_key]))
                    tx.execute("UPDATE devices SET revision = ?, desired = ?, desired_envelope = ?, desired_expires = ?"
                               " WHERE id = ?", (state.revision, dumps(modules), envelope.decode(), state.expires,
                                                 row["id"]))
                    out.append((row["id"], envelope))
            for device_id, envelope in out:
                self.publish(device_topic(device_id, Channel.DESIRED), envelope, 1, True)
            if out:
                log.info("published desired state to %d device(s)", len(out))
            return len(out)

    def renew_expiring(self) -> int:
        """Re-sign states past half their lifetime, so a device never holds an expired one."""
        return self.sync(renew_before=time.time() + self.ttl_s / 2)

    def republish_all(self) -> None:
        """Send every stored envelope again (after a reconnect: a broker without persistence lost its retained copy)."""
        with self._lock:
            rows = self.db.query("SELECT id, desired_envelope FROM devices WHERE desired_envelope IS NOT NULL")
            for row in rows:
                self.publish(device_topic(row["id"], Channel.DESIRED), row["desired_envelope"].encode(), 1, True)
