"""The rollout controller: moves a deployment's devices to a new revision wave by wave, behind health gates.

A rollout pins devices to its revision as each wave begins (``rollout_devices``); the director
gives pinned devices the new revision and everyone else the deployment's stable revision. The
controller is a loop in the hub that re-reads every rollout from SQLite on each tick, so a hub
restarted mid-rollout carries on where it was: the state, the wave, when its phase began and
which devices it moved are all in the database, and desired states are only re-signed when a
device's module list really changes (no duplicated or stale revisions).

With several hub replicas the loop runs on the leader only (hub/leader.py): every transition the
controller makes is fenced by the leader's lease epoch in its own transaction, and every transition
is a compare-and-set on the state it was computed from, so an operator's pause on another replica
and the controller's step never overwrite each other. Operator commands on any replica are
recorded at once; the leader's loop takes the next step.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from typing import Any

from hub.audit import CONTROLLER, record
from hub.errors import Conflict, NotFound
from hub.fleet.device_state import category
from hub.fleet.targeting import parse_target
from hub.leader import SOLE_LEADER, Leader, LeaseLost
from hub.rollout import retries
from hub.rollout import rollout_states as S
from hub.rollout import rollout_view as view
from hub.rollout.director import Director
from hub.rollout.gates import Check, GateResult, evaluate, install_check
from hub.rollout.records import RolloutRecords
from hub.rollout.rollout_plan import Gates, Wave, strategy_from_json, strategy_to_json
from hub.rollout.schedule import may_begin_wave, parse_windows
from hub.rollout.shadow_gates import QualitySource, evaluate_shadow, quality_checks, shadow_state
from hub.store import Database, dumps, loads, now

log = logging.getLogger("edgefleet.hub.rollouts")

SETTLED = frozenset({"running", "failed", "rolled_back"})
# a rollout whose failed devices may be asked again: their desired state still names its revision
RETRYABLE = frozenset({S.INSTALLING, S.BAKING, S.PAUSED, S.HALTED, S.AWAITING_APPROVAL, S.SCHEDULED, S.SUCCEEDED})


def wave_order(deployment: str, device_id: str) -> str:
    """Devices join waves in a stable pseudo-random order, so a canary is not always the same corner of the fleet."""
    return hashlib.sha256(f"{deployment}/{device_id}".encode()).hexdigest()


class Rollouts(RolloutRecords):
    """The controller: its loop on the leader, the steps of each rollout, and the operator's commands."""

    def __init__(self, db: Database, director: Director, tick_s: float = 0.5, leader: Leader = SOLE_LEADER) -> None:
        super().__init__(db, leader)
        self.director, self.tick_s = director, tick_s
        self._lock = threading.RLock()  # the loop and API commands never interleave on one rollout
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._elected = threading.Event()  # set when this process became leader: catch up first
        self._republish = threading.Event()  # set after the bridge (re)connected: send retained states again
        self._thread: threading.Thread | None = None
        self.quality: QualitySource | None = None  # set by the hub: input drift and accuracy for the quality gates

    # --- the loop ------------------------------------------------------------------------------

    def start_loop(self) -> None:
        self._thread = threading.Thread(target=self._run, name="hub-rollouts", daemon=True)
        self._thread.start()

    def stop_loop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(10)

    def wake(self) -> None:
        self._wake.set()

    def elected(self) -> None:
        """This process just became leader (called on the leadership thread: only flag it)."""
        self._elected.set()
        self._wake.set()

    def republish(self) -> None:
        """The bridge (re)connected (called on paho's thread: only flag it)."""
        self._republish.set()
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.leader.is_leader():
                self._lead()
            self._wake.wait(self.tick_s)
            self._wake.clear()

    def _lead(self) -> None:
        """One turn of the leader's duties: catch up after an election, serve sync requests, step rollouts."""
        if self._elected.is_set():
            self._elected.clear()
            try:  # a predecessor (or this hub before a crash) may have committed states it never published
                self.director.publish_pending()
                self.director.sync()
            except Exception:
                log.exception("catching up after the election failed")
                self._elected.set()
        if self._republish.is_set():
            self._republish.clear()
            try:
                self.director.republish_all()
            except Exception:
                log.exception("re-sending desired states after connecting failed")
        try:
            self.director.serve_requests()
        except Exception:
            log.exception("serving desired-state requests failed")
        try:
            self.tick()
        except Exception:
            log.exception("rollout tick failed")

    def tick(self) -> None:
        """Advance every rollout the controller drives on its own."""
        active = ",".join(f"'{s}'" for s in sorted(S.ACTIVE))
        for row in self.db.query(f"SELECT id FROM rollouts WHERE state IN ({active}) ORDER BY id"):
            with self._lock:
                try:
                    self.step(row["id"])
                except (LeaseLost, Conflict) as exc:  # deposed, or an operator moved it first: next tick
                    log.info("rollout %s: step not taken: %s", row["id"], exc)

    # --- starting ------------------------------------------------------------------------------

    def begin(self, deployment: str, revision: int, waves: list[Wave], gates: Gates, on_failure: str, bake_s: float,
              wave_timeout_s: float, actor: str, shadow_s: float = 0.0, shadow_sample_ppm: int = 1_000_000,
              start_at: float | None = None, windows: str = "") -> tuple[int, int]:
        """Create a rollout of ``revision`` (superseding a live one) and start its first wave, or its shadow phase
        when ``shadow_s`` > 0, once its start time and maintenance window allow: (rollout id, published)."""
        with self._lock:
            with self.db.transaction() as tx:
                for live in self._live(deployment):
                    self._move(live, S.SUPERSEDED, actor, reason=f"superseded by revision {revision}")
                dep = self.db.one("SELECT stable_revision FROM deployments WHERE name = ?", (deployment,))
                t = now()
                rid = tx.scalar(
                    "INSERT INTO rollouts (deployment, revision, from_revision, strategy, gates, on_failure, bake_s,"
                    " wave_timeout_s, state, created_at, created_by, updated_at, shadow_s, shadow_sample_ppm, start_at,"
                    " windows) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) RETURNING id",
                    (deployment, revision, dep["stable_revision"] if dep else None, dumps(strategy_to_json(waves)),
                     dumps(gates.to_json()), on_failure, bake_s, wave_timeout_s, S.PENDING, t, actor, t, shadow_s,
                     shadow_sample_ppm, start_at, windows))
                record(self.db, actor, "rollout.created", deployment, rollout=rid, revision=revision,
                       strategy=[w.label for w in waves], bake_s=bake_s, gates=gates.to_json(), on_failure=on_failure,
                       shadow_s=shadow_s)
            published = self.step(rid)
        self.wake()
        return rid, published

    # --- one step of the state machine -----------------------------------------------------------

    def step(self, rid: int) -> int:
        """Advance rollout ``rid`` if its conditions are met; return how many desired states were published.

        Only the leader steps (elsewhere this returns 0 and the leader's loop takes the step).
        """
        if not self.leader.is_leader():
            return 0
        with self._lock:
            r = self._get(rid)
            state = r["state"]
            if state == S.PENDING:
                return self._next_wave(r, 0)
            if state == S.SCHEDULED:
                return self._next_wave(r, r["wave"])
            if state == S.ROLLING_BACK:
                published = self.director.sync()  # pins no longer count: devices go back to the stable revision
                with self.db.transaction():
                    self._move(r, S.ROLLED_BACK, CONTROLLER)
                return published
            if state == S.SHADOWING:
                return self._shadow_step(r)
            if state not in (S.INSTALLING, S.BAKING):
                return 0
            gates = Gates.from_json(loads(r["gates"]))
            states = self._states(r)
            early = install_check(gates, states)
            if early is not None and not early.ok:  # a broken version halts without waiting for the bake
                return self._fail(r, GateResult([early]))
            t = now()
            if state == S.INSTALLING:
                settled = all(category(s) in SETTLED for s, _ in states.values())
                if not settled and t - r["phase_started_at"] < r["wave_timeout_s"]:
                    return 0
                if r["bake_s"] > 0:
                    with self.db.transaction():
                        self._move(r, S.BAKING, CONTROLLER, phase_started_at=t)
                    return 0
            elif t - r["phase_started_at"] < r["bake_s"]:
                return 0
            return self._gate(r, gates, states)

    def _next_wave(self, r: dict[str, Any], i: int) -> int:
        """Begin wave ``i`` if its start time and maintenance window allow it now, else wait (scheduled)."""
        decision = may_begin_wave(now(), r.get("start_at"), parse_windows(r.get("windows")))
        if decision.ok:
            # the shadow phase comes before the first wave (once: it passed if it started)
            return self._begin_wave(r, i, shadow=i == 0 and bool(r["shadow_s"]) and r["shadow_started_at"] is None)
        if r["state"] != S.SCHEDULED or r["wave"] != i:
            with self.db.transaction():
                self._move(r, S.SCHEDULED, CONTROLLER, wave=i, reason=decision.reason,
                           detail={"begins_at": decision.at})
        return 0

    def _shadow_step(self, r: dict[str, Any]) -> int:
        """The shadow phase: wait until the candidate runs beside the live version on every shadow device (or the
        wave timeout), let it run ``shadow_s``, then judge it: the waves begin, or the candidate is removed."""
        gates = Gates.from_json(loads(r["gates"]))
        rev = self._revision(r)
        states = {d["id"]: shadow_state(loads(d["reported"]), rev["digest"]) for d in self.db.query(
            "SELECT d.id, d.reported FROM rollout_devices p JOIN devices d ON d.id = p.device WHERE p.rollout = ?",
            (r["id"],))}
        early = install_check(gates, states)
        if early is not None and not early.ok:
            return self._fail(r, GateResult([Check(early.name, early.value, early.limit, False,
                                                   "shadow candidate: " + early.note)]))
        t = now()
        if r["shadow_started_at"] is None:
            settled = all(category(s) in SETTLED for s, _ in states.values())
            if settled or t - r["phase_started_at"] >= r["wave_timeout_s"]:
                with self.db.transaction() as tx:
                    self.leader.fence(tx)
                    tx.execute("UPDATE rollouts SET shadow_started_at = ?, updated_at = ? WHERE id = ?", (t, t, r["id"]))
            return 0
        if t - r["shadow_started_at"] < r["shadow_s"]:
            return 0
        live = self._revision(r, r["from_revision"])["module_version"]
        result, figures = evaluate_shadow(self.db, gates, states, rev["module_name"], rev["module_version"],
                                          r["shadow_started_at"], live, self.quality)
        if not result.ok:
            return self._fail(r, result, {"shadow": figures})
        with self.db.transaction() as tx:
            self.leader.fence(tx)
            tx.execute("UPDATE rollouts SET last_gate = ? WHERE id = ?",
                       (dumps(result.to_json() | {"shadow": figures}), r["id"]))
            record(self.db, CONTROLLER, "rollout.shadow_passed", r["deployment"], rollout=r["id"],
                   disagreement=figures["disagreement"], compared=figures["compared"])
        return self._begin_wave(self._get(r["id"]), 0)

    def _begin_wave(self, r: dict[str, Any], i: int, shadow: bool = False) -> int:
        waves = strategy_from_json(loads(r["strategy"]))
        rev = self._revision(r)
        target = parse_target(rev["target"])
        matching = sorted((d["id"] for d in self.db.query("SELECT id, labels FROM devices")
                           if target.matches(d["id"], loads(d["labels"], {}))),
                          key=lambda d: wave_order(r["deployment"], d))
        last = i == len(waves) - 1
        chosen = matching if last else matching[:waves[i].size(len(matching))]
        t = now()
        with self.db.transaction() as tx:
            pinned = {p["device"] for p in self.db.query("SELECT device FROM rollout_devices WHERE rollout = ?",
                                                         (r["id"],))}
            new = [d for d in chosen if d not in pinned]
            tx.executemany("INSERT INTO rollout_devices (rollout, device, wave, admitted_at) VALUES (?, ?, ?, ?)",
                           [(r["id"], d, i, t) for d in new])
            # a shadow runs on the first wave's devices: pinned, they get the live version plus the candidate
            self._move(r, S.SHADOWING if shadow else S.INSTALLING, CONTROLLER, wave=i, phase_started_at=t,
                       everyone=int(last), detail={"admitted": len(new), "wave_size": len(chosen), "fleet": len(matching)})
        published = self.director.sync()
        log.info("rollout %s of %s: wave %d/%d moved %d device(s)", r["id"], r["deployment"], i + 1, len(waves),
                 len(new))
        return published

    def _gate(self, r: dict[str, Any], gates: Gates, states: dict[str, tuple[str, str]]) -> int:
        rev = self._revision(r)
        prev = self._revision(r, r["from_revision"]) if r["from_revision"] else None
        result = evaluate(self.db, gates, states, rev["module_name"], rev["module_version"], r["phase_started_at"],
                          prev["module_version"] if prev and prev["module_name"] == rev["module_name"] else None,
                          r["created_at"])
        result.checks += quality_checks(self.quality, gates, rev["module_name"], rev["module_version"],
                                        r["phase_started_at"], set(states))
        if not result.ok:
            return self._fail(r, result)
        waves = strategy_from_json(loads(r["strategy"]))
        with self.db.transaction() as tx:
            self.leader.fence(tx)
            tx.execute("UPDATE rollouts SET last_gate = ? WHERE id = ?", (dumps(result.to_json()), r["id"]))
            if r["wave"] + 1 < len(waves):
                record(self.db, CONTROLLER, "rollout.gate_passed", r["deployment"], rollout=r["id"], wave=r["wave"] + 1)
            else:  # the last wave passed: the revision becomes what every matching device gets
                tx.execute("UPDATE deployments SET stable_revision = ? WHERE name = ?", (r["revision"], r["deployment"]))
                online = {d["id"]: bool(d["online"]) for d in self.db.query(
                    "SELECT d.id, d.online FROM rollout_devices p JOIN devices d ON d.id = p.device"
                    " WHERE p.rollout = ?", (r["id"],))}
                outcome = view.not_updated_reason([{"id": d, "online": online.get(d, False), "state": category(s)}
                                                   for d, (s, _) in sorted(states.items())])
                self._move(r, S.SUCCEEDED, CONTROLLER, reason="" if outcome == "succeeded" else outcome)
        if r["wave"] + 1 < len(waves):
            if waves[r["wave"] + 1].approve:  # a person says when the next wave begins: rollout approve
                with self.db.transaction():
                    self._move(self._get(r["id"]), S.AWAITING_APPROVAL, CONTROLLER,
                               reason=f"wave {r['wave'] + 2} waits for approval (rollout approve)")
                return 0
            return self._next_wave(self._get(r["id"]), r["wave"] + 1)
        return self.director.sync()

    def _fail(self, r: dict[str, Any], result: GateResult, extra: dict[str, Any] | None = None) -> int:
        shadow = r["state"] == S.SHADOWING  # a failed shadow always rolls back: the candidate never served
        reason = f"{'shadow' if shadow else 'wave ' + str(r['wave'] + 1)} gate failed: {result.reason}"
        log.warning("rollout %s of %s: %s", r["id"], r["deployment"], reason)
        back = shadow or r["on_failure"] == "rollback"
        with self.db.transaction() as tx:
            self.leader.fence(tx)
            tx.execute("UPDATE rollouts SET last_gate = ? WHERE id = ?", (dumps(result.to_json() | (extra or {})),
                                                                           r["id"]))
            self._move(r, S.ROLLING_BACK if back else S.HALTED, CONTROLLER, reason=reason)
        return self.step(r["id"]) if back else 0

    # --- operator commands -----------------------------------------------------------------------

    def pause(self, deployment: str, actor: str) -> dict[str, Any]:
        with self._lock, self.db.transaction():
            r = self._one_live(deployment, (S.INSTALLING, S.BAKING))
            self._move(r, S.PAUSED, actor, paused_from=r["state"], reason="paused by hand")
        return self.status(deployment)

    def resume(self, deployment: str, actor: str) -> dict[str, Any]:
        """Paused: back to the phase it left (its timer restarts). Halted: the wave is installed and gated again."""
        with self._lock:
            with self.db.transaction():
                r = self._one_live(deployment, (S.PAUSED, S.HALTED))
                back = r["paused_from"] if r["state"] == S.PAUSED else S.INSTALLING
                self._move(r, back, actor, phase_started_at=now(), paused_from=None, reason="")
            self.step(r["id"])
        return self.status(deployment)

    def approve(self, deployment: str, actor: str) -> dict[str, Any]:
        """Begin the next wave of a rollout awaiting approval."""
        with self._lock:
            r = self._one_live(deployment, (S.AWAITING_APPROVAL,))
            record(self.db, actor, "rollout.approved", deployment, rollout=r["id"], wave=r["wave"] + 2)
            self._next_wave(r, r["wave"] + 1)
        self.wake()
        return self.status(deployment)

    def retry(self, deployment: str, actor: str) -> dict[str, Any]:
        """Ask the devices of the latest rollout that failed or rolled back its version to install it again; a
        halted rollout goes back to installing that wave (its gate is judged on the new attempts)."""
        with self._lock:
            r = self.db.one("SELECT * FROM rollouts WHERE deployment = ? ORDER BY id DESC LIMIT 1", (deployment,))
            if r is None:
                raise NotFound(f"deployment {deployment!r} has no rollout")
            if r["state"] not in RETRYABLE:
                raise Conflict(f"the rollout of {deployment!r} is {r['state']}: its devices no longer want revision "
                               f"{r['revision']}; roll it out again (deployment update) instead")
            digest = self._revision(r)["digest"]
            failed = sorted(d for d, (s, _) in self._states(r).items() if category(s) in ("failed", "rolled_back"))
            if not failed:
                raise Conflict(f"no device of the rollout of {deployment!r} failed or rolled back: nothing to retry")
            with self.db.transaction():
                retries.bump(self.db, failed, digest)
                record(self.db, actor, "rollout.retry", deployment, rollout=r["id"], devices=failed[:100],
                       count=len(failed))
                if r["state"] == S.HALTED:
                    self._move(r, S.INSTALLING, actor, phase_started_at=now(), reason="")
            self.director.sync(failed)
            retries.issued(self.db, failed, digest)
        self.wake()
        return self.status(deployment, r["id"]) | {"retried": failed}

    def abort(self, deployment: str, actor: str) -> dict[str, Any]:
        """Stop for good; the devices it moved go back to the stable revision."""
        with self._lock:
            with self.db.transaction():
                r = self._one_live(deployment, (S.PENDING, S.SHADOWING, S.INSTALLING, S.BAKING, S.PAUSED, S.HALTED,
                                                S.AWAITING_APPROVAL, S.SCHEDULED))
                self._move(r, S.ABORTED, actor, reason=f"aborted by {actor}")
            self.director.sync()
        return self.status(deployment)

    def roll_back_live(self, deployment: str, actor: str) -> bool:
        """Roll back the live rollout of ``deployment``, if it has one; False if none is live."""
        with self._lock:
            with self.db.transaction():
                live = [r for r in self._live(deployment) if r["state"] in S.TRANSITIONS and S.ROLLING_BACK
                        in S.TRANSITIONS[r["state"]]]
                if not live:
                    return False
                self._move(live[0], S.ROLLING_BACK, actor, reason=f"rolled back by {actor}")
            self.step(live[0]["id"])
        return True
