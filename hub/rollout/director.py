"""The director: each device's signed desired state, derived from the active deployments.

For each module name a device gets the highest-priority active deployment whose
target matches it (ties: the newest). Of a deployment it gets the stable revision,
or the revision a live rollout is moving it to (see hub/rollout/rollouts.py). A new state is signed with revision+1 and
published retained, QoS 1, only when the module list changes, or when the last
one nears expiry (a device refuses expired states, so they are renewed), or when the root of trust
or the release policy changed so that a device would refuse the stored one (rotation converges).
Every state carries the current release policy (hub/trust/release_policy.py).

Only the leader among hub replicas signs (hub/leader.py): on another replica :meth:`Director.sync`
records the request in ``director_requests`` and the leader serves it within a tick. The leader
stores each new state with ``desired_published = 0`` in a transaction fenced by its lease epoch, and
marks it published once the broker has acknowledged it; a new leader first publishes what its
predecessor stored but may not have sent (:meth:`Director.publish_pending`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hub.errors import Conflict
from hub.fleet.device_state import device_state
from hub.fleet.targeting import parse_target
from hub.leader import SOLE_LEADER, Leader, LeaseLost
from hub.rollout.retries import numbers as retry_numbers
from hub.rollout.rollout_states import HOLDING, SHADOWING
from hub.store import Database, dumps, loads
from hub.trust.keys import KeyRing
from protocol.encoding import canonical_json, digest_of
from protocol.messages import BakePolicy, DesiredModule, DesiredState, ShadowSpec
from protocol.schema import validate
from protocol.signing import sign
from protocol.topics import Channel, device_topic
from protocol.trust import MAX_DESIRED_LIFETIME_S, signed_by

log = logging.getLogger("edgefleet.hub.director")

Publish = Callable[[str, bytes, int, bool], Any]  # topic, payload, qos, retain -> paho's MessageInfo (or None)
ACK_WAIT_S = 10.0  # how long to wait for the broker to acknowledge a sync's last state before leaving it pending


@dataclass(frozen=True)
class Layer:
    """One deployment as the director sees it: revision rows carry ``target_parsed``, ``size`` and collection."""

    name: str
    created_at: float
    stable: dict[str, Any] | None  # what devices outside the rollout get (None: nothing yet)
    rolling: dict[str, Any] | None = None  # the revision a live rollout moves devices to
    pinned: frozenset[str] = frozenset()  # devices the rollout has moved so far
    everyone: bool = False  # the last wave is under way: every matching device gets ``rolling``
    shadowing: bool = False  # the rollout's shadow phase: moved devices keep ``stable`` and run ``rolling`` beside it
    shadow_sample_ppm: int = 1_000_000  # share of live inputs mirrored to the candidate

    def revision_for(self, device_id: str, labels: dict[str, str]) -> dict[str, Any] | None:
        r, s = self.rolling, self.stable
        stable = s if s is not None and s["target_parsed"].matches(device_id, labels) else None
        if r is not None and (self.everyone or device_id in self.pinned) and r["target_parsed"].matches(device_id, labels):
            if not self.shadowing:
                return r
            if stable is not None and stable["module_name"] == r["module_name"]:
                return stable | {"shadow_of": r, "shadow_sample_ppm": self.shadow_sample_ppm}
        return stable


def desired_module(d: dict[str, Any], retry: int = 0) -> dict[str, Any]:
    """One deployment revision as the desired-state entry a device gets (``retry``: hub/rollout/retries.py)."""
    bake = d.get("device_bake")
    cand = d.get("shadow_of")  # the candidate of a shadow phase, run beside this revision (never served)
    shadow = ShadowSpec(version=cand["module_version"], bundle=cand["digest"], size=cand["size"],
                        sample_ppm=d.get("shadow_sample_ppm", 1_000_000)) if cand else None
    return DesiredModule(name=d["module_name"], version=d["module_version"], bundle=d["digest"], size=d["size"],
                         deployment=d["deployment"], collect_rate_ppm=d["collect_rate_ppm"],
                         bake=validate(BakePolicy, loads(bake)) if bake else None,
                         config=loads(d.get("config")) or {}, shadow=shadow, retry=retry).to_dict()


class Director:
    def __init__(self, db: Database, keys: KeyRing, ttl_s: int, publish: Publish,
                 policy: Callable[[], dict[str, Any] | None] = lambda: None, leader: Leader = SOLE_LEADER) -> None:
        if not 0 < ttl_s <= MAX_DESIRED_LIFETIME_S:
            raise ValueError(f"desired_ttl_s must be 1..{MAX_DESIRED_LIFETIME_S} (devices refuse longer-lived states)")
        self.db, self.keys, self.ttl_s, self.publish, self.policy = db, keys, ttl_s, publish, policy
        self.leader = leader
        # compute, commit and publish under one lock, so revision N+1 never reaches the broker before N
        self._lock = threading.Lock()

    def _deployments(self) -> list[Layer]:
        """Each active deployment as a layer: its stable revision, and the revision a live rollout moves devices to."""
        revisions: dict[tuple[str, int], dict[str, Any]] = {}
        for r in self.db.query(
                "SELECT r.*, m.size, m.envelope FROM deployment_revisions r JOIN modules m ON m.digest = r.digest"
                " JOIN deployments d ON d.name = r.deployment WHERE d.active = 1"):
            r["target_parsed"] = parse_target(r["target"])
            manifest_ppm = loads(r.pop("envelope"))["signed"]["manifest"].get("collect_rate_ppm", 0)
            if r["collect_rate_ppm"] is None:  # no per-deployment override: the module's own setting
                r["collect_rate_ppm"] = manifest_ppm
            revisions[(r["deployment"], r["revision"])] = r
        holding = ",".join(f"'{s}'" for s in sorted(HOLDING))
        rollouts = {r["deployment"]: r for r in self.db.query(
            f"SELECT id, deployment, revision, everyone, state, shadow_sample_ppm FROM rollouts"
            f" WHERE state IN ({holding})")}
        pins: dict[int, set[str]] = {}
        for p in self.db.query(f"SELECT rollout, device FROM rollout_devices WHERE rollout IN"
                               f" (SELECT id FROM rollouts WHERE state IN ({holding}))"):
            pins.setdefault(p["rollout"], set()).add(p["device"])
        layers = []
        for d in self.db.query("SELECT name, stable_revision, created_at FROM deployments WHERE active = 1"):
            ro = rollouts.get(d["name"])
            layers.append(Layer(
                name=d["name"], created_at=d["created_at"],
                stable=revisions.get((d["name"], d["stable_revision"])) if d["stable_revision"] else None,
                rolling=revisions.get((d["name"], ro["revision"])) if ro else None,
                pinned=frozenset(pins.get(ro["id"], ())) if ro else frozenset(),
                everyone=bool(ro and ro["everyone"]), shadowing=bool(ro and ro["state"] == SHADOWING),
                shadow_sample_ppm=ro["shadow_sample_ppm"] if ro else 1_000_000))
        return layers

    @staticmethod
    def modules_for(device_id: str, labels: dict[str, str], layers: list[Layer],
                    retries: dict[tuple[str, str], int] | None = None) -> list[dict[str, Any]]:
        """Per module name, the highest-priority deployment revision that applies (ties: the newest deployment)."""
        best: dict[str, tuple[dict[str, Any], float]] = {}
        for layer in layers:
            d = layer.revision_for(device_id, labels)
            if d is None:
                continue
            cur = best.get(d["module_name"])
            if cur is None or (d["priority"], layer.created_at) > (cur[0]["priority"], cur[1]):
                best[d["module_name"]] = (d, layer.created_at)
        return [desired_module(d, (retries or {}).get((device_id, d["digest"]), 0)) for _, (d, _) in sorted(best.items())]

    def sync(self, device_ids: list[str] | None = None, renew_before: float | None = None,
             resign: Callable[[dict[str, Any]], bool] | None = None) -> int:
        """Publish a new desired state to each device (all when None) whose module list changed; return how many.

        With ``renew_before`` (unix time), also re-sign states that expire before it; with ``resign``, also
        those whose device row (with its ``desired_envelope``) it says yes to. On a replica that is not the
        leader, the request goes to the leader and this returns 0.
        """
        if not self.leader.is_leader():
            self.request(device_ids, resign is not None)
            return 0
        with self._lock:
            deployments = self._deployments()
            retries = retry_numbers(self.db)
            out: list[tuple[str, int, bytes]] = []
            policy = self.policy()
            try:
                with self.db.transaction() as tx:
                    self.leader.fence(tx)  # a deposed leader's states never commit
                    sql = ("SELECT id, labels, revision, desired, desired_expires, desired_envelope, reported"
                           " FROM devices")
                    rows = self.db.query(sql) if device_ids is None else [
                        r for i in device_ids for r in self.db.query(sql + " WHERE id = ?", (i,))]
                    for row in rows:
                        modules = self.modules_for(row["id"], loads(row["labels"], {}), deployments, retries)
                        unchanged = row["desired"] is not None and loads(row["desired"]) == modules
                        expiring = renew_before is not None and (row["desired_expires"] or 0) < renew_before
                        if unchanged and not expiring and not (resign is not None and resign(row)):
                            continue
                        state = DesiredState(device=row["id"], revision=row["revision"] + 1,
                                             expires=int(time.time()) + self.ttl_s,
                                             modules=[validate(DesiredModule, m) for m in modules], policy=policy)
                        envelope = canonical_json(sign(state.to_dict(), [self.keys.key("director")]))
                        desired = dumps(modules)
                        tx.execute("UPDATE devices SET revision = ?, desired = ?, desired_envelope = ?,"
                                   " desired_expires = ?, desired_published = 0, state = ? WHERE id = ?",
                                   (state.revision, desired, envelope.decode(), state.expires,
                                    device_state(desired, row["reported"]), row["id"]))
                        out.append((row["id"], state.revision, envelope))
            except LeaseLost as exc:
                log.warning("desired-state sync handed to the next leader: %s", exc)
                self.request(device_ids, resign is not None)
                return 0
            sent = self._publish(out)
            if sent:
                log.info("published desired state to %d device(s)", sent)
            return sent

    def _publish(self, states: list[tuple[str, int, bytes]]) -> int:
        """Publish stored states (caller holds ``_lock``); mark them published once the broker acknowledged them."""
        done: list[tuple[str, int]] = []
        last = None
        for device_id, revision, envelope in states:
            if not self.leader.is_leader():  # deposed meanwhile: the next leader publishes what is left pending
                log.warning("no longer the leader: %d desired state(s) left for the next one",
                            len(states) - len(done))
                break
            last = self.publish(device_topic(device_id, Channel.DESIRED), envelope, 1, True)
            done.append((device_id, revision))
        if done and last is not None and hasattr(last, "wait_for_publish"):
            try:  # QoS 1 acknowledgements come in order: the last one covers all
                last.wait_for_publish(ACK_WAIT_S)
            except (RuntimeError, ValueError):
                pass
            if not last.is_published():
                return len(done)  # left pending: sent again after the next connect or election
        if done:
            with self.db.transaction() as tx:
                tx.executemany("UPDATE devices SET desired_published = 1 WHERE id = ? AND revision = ?", done)
        return len(done)

    def request(self, device_ids: list[str] | None, resign: bool = False) -> None:
        """Ask the leader for a sync of ``device_ids`` (None: every device); ``resign``: with
        :meth:`resign_refused` (the policy or the keys changed here)."""
        with self.db.transaction() as tx:
            tx.execute("INSERT INTO director_requests (devices, created_at, resign) VALUES (?, ?, ?)",
                       (None if device_ids is None else dumps(sorted(device_ids)), time.time(), int(resign)))

    def serve_requests(self) -> int:
        """Leader: sync what other replicas asked for; returns the states published."""
        rows = self.db.query("SELECT id, devices, resign FROM director_requests ORDER BY id")
        if not rows or not self.leader.is_leader():
            return 0
        wanted: set[str] | None = set()
        for r in rows:
            if r["devices"] is None:
                wanted = None
            elif wanted is not None:
                wanted.update(loads(r["devices"]))
        if any(r["resign"] for r in rows) and self.keys.holds("director"):
            published = self.resign_refused()  # every device: covers ``wanted`` too
        else:
            published = self.sync(None if wanted is None else sorted(wanted))
        with self.db.transaction() as tx:
            tx.execute("DELETE FROM director_requests WHERE id <= ?", (rows[-1]["id"],))
        return published

    def publish_pending(self) -> int:
        """Leader: publish the states stored but not acknowledged (a predecessor died between commit and publish)."""
        if not self.leader.is_leader():
            return 0
        with self._lock:
            rows = self.db.query("SELECT id, revision, desired_envelope FROM devices WHERE desired_published = 0"
                                 " AND desired_envelope IS NOT NULL ORDER BY id")
            sent = self._publish([(r["id"], r["revision"], r["desired_envelope"].encode()) for r in rows])
        if sent:
            log.info("published %d desired state(s) left pending", sent)
        return sent

    def resign_refused(self) -> int:
        """Re-sign every stored state a device would now refuse or read with a stale release policy: signed by a
        key the current root no longer trusts for the director role (after a rotation), or carrying another
        policy than the current one. Returns how many were re-published."""
        if not self.keys.holds("director"):
            raise Conflict("the hub does not hold the director key: stored desired states cannot be re-signed")
        root, policy = self.keys.root, self.policy()
        want = digest_of(policy) if policy else None

        def stale(row: dict[str, Any]) -> bool:
            if row["desired_envelope"] is None:
                return False
            envelope = loads(row["desired_envelope"])
            held = envelope["signed"].get("policy")
            return not signed_by(root, envelope, "director") or (digest_of(held) if held else None) != want
        return self.sync(resign=stale)

    def renew_expiring(self) -> int:
        """Re-sign states past half their lifetime, so a device never holds an expired one."""
        return self.sync(renew_before=time.time() + self.ttl_s / 2)

    def republish_all(self) -> None:
        """Send every stored envelope again (after a reconnect: a broker without persistence lost its retained copy)."""
        if not self.leader.is_leader():
            return
        with self._lock:
            rows = self.db.query("SELECT id, revision, desired_envelope FROM devices WHERE desired_envelope IS NOT NULL")
            self._publish([(r["id"], r["revision"], r["desired_envelope"].encode()) for r in rows])
