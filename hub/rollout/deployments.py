"""Deployments: a module version aimed at a target, kept as numbered revisions; each change is a rollout.

Creating or changing a deployment stores revision N+1 (earlier ones stay, for rollback) and
hands it to the rollout controller with a strategy: all at once, a canary, or waves.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from hub.audit import record
from hub.bounds import check_api_name
from hub.errors import Conflict, Invalid, NotFound
from hub.fleet.device_state import category, module_views
from hub.fleet.targeting import check_target
from hub.registry.bundles import parse_ref
from hub.rollout.director import Director
from hub.rollout.rollout_plan import ON_FAILURE, Gates, parse_strategy
from hub.rollout.rollout_states import SUPERSEDED, display
from hub.rollout.rollouts import Rollouts
from hub.store import Database, dumps, loads, now
from protocol.encoding import ProtocolError, canonical_json
from protocol.messages import BakePolicy, DesiredModule
from protocol.schema import validate

log = logging.getLogger("edgefleet.hub.deployments")

DEFAULT_WAVE_TIMEOUT_S = 600.0
PLAN_FIELDS = ("strategy", "bake_s", "on_failure", "wave_timeout_s")  # with the gates: what an update inherits


def deployment_row(row: dict[str, Any]) -> dict[str, Any]:
    return {"name": row["name"], "module": f"{row['module_name']}:{row['module_version']}",
            "module_name": row["module_name"], "module_version": row["module_version"], "bundle": row["digest"],
            "target": row["target"], "priority": row["priority"], "created_at": row["created_at"],
            "active": bool(row["active"]), "revision": row["revision"], "stable_revision": row["stable_revision"]}


def revision_row(row: dict[str, Any]) -> dict[str, Any]:
    return {"revision": row["revision"], "module": f"{row['module_name']}:{row['module_version']}",
            "bundle": row["digest"], "target": row["target"], "priority": row["priority"],
            "collect_rate_ppm": row["collect_rate_ppm"], "device_bake": loads(row.get("device_bake")),
            "config": loads(row.get("config")) or {},
            "created_at": row["created_at"], "created_by": row["created_by"]}


def module_config(config: dict[str, Any] | None) -> str | None:
    """The per-module configuration a deployment revision carries, checked as a device will (protocol
    DesiredModule.config: keys, str/int/bool values, size), as stored (canonical JSON; None for none)."""
    if not config:
        return None
    try:
        validate(DesiredModule, {"name": "m", "version": 1, "bundle": "0" * 64, "size": 0, "config": config})
    except ProtocolError as exc:
        raise Invalid(f"config: {exc}") from None
    return canonical_json(config).decode()


def merge_config(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` applied: a value sets a key, None removes it."""
    out = dict(base)
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def device_bake(seconds: int | None, max_error_rate: float = 0.05, min_inferences: int = 20) -> dict[str, int] | None:
    """The per-device bake policy (protocol BakePolicy) of a deployment, or None for no bake (0 or None seconds)."""
    if not seconds:
        return None
    policy = {"seconds": int(seconds), "max_error_ppm": round(max_error_rate * 1_000_000),
              "min_inferences": int(min_inferences)}
    try:
        return validate(BakePolicy, policy).to_dict()
    except ProtocolError as exc:
        raise Invalid(f"device bake: {exc}") from None


class Deployments:
    def __init__(self, db: Database, director: Director, rollouts: Rollouts,
                 refusal: Callable[[str, int], str | None] = lambda name, version: None) -> None:
        self.db, self.director, self.rollouts = db, director, rollouts
        self.refusal = refusal  # why a module version may not be deployed (the release policy revokes it), or None
        self._adopt_unrevisioned()

    def _adopt_unrevisioned(self) -> None:
        """Deployments from before revisions existed become revision 1, stable."""
        with self.db.transaction() as tx:
            for d in self.db.query("SELECT * FROM deployments WHERE name NOT IN"
                                   " (SELECT deployment FROM deployment_revisions)"):
                tx.execute("INSERT INTO deployment_revisions (deployment, revision, module_name, module_version, digest,"
                           " target, priority, created_at) VALUES (?, 1, ?, ?, ?, ?, ?, ?)",
                           (d["name"], d["module_name"], d["module_version"], d["digest"], d["target"], d["priority"],
                            d["created_at"]))
                tx.execute("UPDATE deployments SET revision = 1, stable_revision = 1 WHERE name = ?", (d["name"],))

    def put(self, name: str, module: str, target: str, priority: int = 0, *, strategy: str = "all",
            bake_s: float = 0.0, gates: dict[str, Any] | None = None, on_failure: str = "rollback",
            collect_rate_ppm: int | None = None, wave_timeout_s: float = DEFAULT_WAVE_TIMEOUT_S,
            device_bake: dict[str, int] | None = None, config: dict[str, Any] | None = None, shadow_s: float = 0.0,
            shadow_sample: float = 1.0, actor: str = "",
            note: str = "") -> dict[str, Any]:
        """Create or change deployment ``name``: a new revision rolled out by ``strategy``.

        ``shadow_s`` > 0: before the waves, the first wave's devices run the new version beside the live one on the
        same inputs for that long, never serving it; its gates (quality gates too) decide whether the waves begin.

        ``device_bake`` (see :func:`device_bake`): each device keeps the new version on probation for that long,
        watching its error rate, and rolls back by itself past the threshold.

        Asking for exactly what the latest revision already is changes nothing (``published`` 0).
        """
        check_api_name(name, "deployment name")  # the API checked it too: this is for every other caller
        check_target(target)
        if not 0 < shadow_sample <= 1:
            raise Invalid("shadow_sample is the share of live inputs mirrored to the candidate: above 0, at most 1")
        waves = parse_strategy(strategy)
        gate_set = Gates.from_json(gates)
        if on_failure not in ON_FAILURE:
            raise Invalid(f"on_failure must be one of {ON_FAILURE}")
        if bake_s < 0 or wave_timeout_s <= 0:
            raise Invalid("bake must be >= 0 and wave_timeout positive")
        if collect_rate_ppm is not None and not 0 <= collect_rate_ppm <= 1_000_000:
            raise Invalid("collect_rate_ppm must be 0..1000000")
        module_name, version = parse_ref(module)
        row = self.db.one("SELECT digest, envelope FROM modules WHERE name = ? AND version = ?", (module_name, version))
        if row is None:
            raise Invalid(f"module {module} does not exist: build it first (POST /api/v1/modules)")
        if not loads(row["envelope"])["signatures"]:
            raise Conflict(f"module {module} has no release signature yet: sign it where the release key is "
                           "(edgefleet module sign) before deploying it")
        why = self.refusal(module_name, version)
        if why:
            raise Conflict(f"cannot deploy {module}: {why}")
        try:
            bake_json = dumps(validate(BakePolicy, device_bake).to_dict()) if device_bake else None
        except ProtocolError as exc:
            raise Invalid(f"device bake: {exc}") from None
        config_json = module_config(config)
        with self.db.transaction() as tx:
            cur = self.db.one("SELECT * FROM deployments WHERE name = ?", (name,))
            latest = cur and self.db.one("SELECT * FROM deployment_revisions WHERE deployment = ? AND revision = ?",
                                         (name, cur["revision"]))
            same = latest and (latest["digest"], latest["target"], latest["priority"], latest["collect_rate_ppm"],
                               latest["device_bake"], latest["config"]) == (row["digest"], target, priority,
                                                                            collect_rate_ppm, bake_json, config_json)
            # the same again is a no-op while that revision is stable or rolling out; after an abort it is a retry
            if cur and cur["active"] and same and (cur["stable_revision"] == cur["revision"] or any(
                    r["revision"] == cur["revision"] for r in self.rollouts._live(name))):
                return self.get(name) | {"published": 0, "rollout": None}
            if shadow_s:
                self._check_shadow(name, cur, module_name, row["digest"], shadow_s)
            revision = (cur["revision"] + 1) if cur else 1
            t = now()
            tx.execute("INSERT INTO deployment_revisions (deployment, revision, module_name, module_version, digest,"
                       " target, priority, collect_rate_ppm, device_bake, config, created_at, created_by)"
                       " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                       (name, revision, module_name, version, row["digest"], target, priority, collect_rate_ppm,
                        bake_json, config_json, t, actor))
            # the row mirrors the latest revision; created_at stays the first creation (ties between layers: newest)
            tx.execute(
                "INSERT INTO deployments (name, module_name, module_version, digest, target, priority, created_at, active,"
                " revision) VALUES (?, ?, ?, ?, ?, ?, ?, 1, ?) ON CONFLICT (name) DO UPDATE SET"
                " module_name = excluded.module_name, module_version = excluded.module_version,"
                " digest = excluded.digest, target = excluded.target, priority = excluded.priority, active = 1,"
                " revision = excluded.revision",
                (name, module_name, version, row["digest"], target, priority, t, revision))
            record(self.db, actor, "deployment.revision", name, revision=revision, module=module, target=target,
                   priority=priority, collect_rate_ppm=collect_rate_ppm, device_bake=device_bake,
                   config=config or {}, note=note)
        rid, published = self.rollouts.begin(name, revision, waves, gate_set, on_failure, bake_s, wave_timeout_s,
                                             actor, shadow_s=shadow_s,
                                             shadow_sample_ppm=round(shadow_sample * 1_000_000))
        log.info("deployment %s revision %d -> %s on %r: rollout %d, %d device(s) updated", name, revision, module,
                 target, rid, published)
        plan = self.rollouts.last_plan(name) or {}
        return self.get(name) | {"published": published, "rollout": rid, "plan": plan | {"inherited": []}}

    def _check_shadow(self, name: str, cur: dict[str, Any] | None, module_name: str, digest: str,
                      shadow_s: float) -> None:
        """A shadow runs a candidate beside a live version of the same module: refuse one that cannot."""
        if shadow_s < 0 or shadow_s > 7 * 86_400:
            raise Invalid("shadow must be 0..604800 seconds")
        live = cur and cur["stable_revision"] and self.db.one(
            "SELECT module_name, module_version, digest FROM deployment_revisions WHERE deployment = ? AND revision = ?",
            (name, cur["stable_revision"]))
        if not live or not cur["active"]:
            raise Invalid(f"a shadow needs a live version to run beside: deployment {name!r} has none yet")
        if live["module_name"] != module_name:
            raise Invalid(f"a shadow runs a candidate of the live module {live['module_name']!r}, not {module_name!r}")
        if live["digest"] == digest:
            raise Invalid(f"{module_name}:{live['module_version']} is already the live version: nothing to shadow")

    def update(self, name: str, module: str | None = None, target: str | None = None, priority: int | None = None,
               **kwargs: Any) -> dict[str, Any]:
        """A new revision that changes only what is given (``edgefleet deployment update``).

        The rollout plan is the last rollout's (strategy, bake, gates, on failure, wave timeout) with what is
        given on top; gates merge per gate. The answer's ``plan`` is the effective one, and ``plan.inherited``
        names what came from the last rollout.
        """
        cur = self._row(name)
        latest = self.revision(name, cur["revision"])
        kwargs.setdefault("device_bake", latest["device_bake"])  # kept unless given
        kwargs.setdefault("collect_rate_ppm", latest["collect_rate_ppm"])
        base = kwargs.get("config") if kwargs.get("config") is not None else latest["config"]
        kwargs["config"] = merge_config(base, kwargs.pop("config_set", None) or {})  # the rest is kept
        last = self.rollouts.last_plan(name)
        inherited = []
        if last is not None:
            for key in PLAN_FIELDS:
                if kwargs.get(key) is None:
                    kwargs[key] = last[key]
                    inherited.append(key)
            given = {k: v for k, v in (kwargs.get("gates") or {}).items()}
            if not given:
                inherited.append("gates")
            kwargs["gates"] = {**(last["gates"] or {}), **given}
        out = self.put(name, module or latest["module"], target if target is not None else cur["target"],
                       priority if priority is not None else cur["priority"], **kwargs)
        if out["rollout"] is not None:
            out["plan"]["inherited"] = inherited
        return out

    def rollback(self, name: str, to: int | None, actor: str) -> dict[str, Any]:
        """Roll back the live rollout; with none live, roll out an earlier revision again (as a new revision)."""
        self._row(name)
        if to is None and self.rollouts.roll_back_live(name, actor):
            return self.rollouts.status(name)
        cur = self._row(name)
        if to is None:
            to = (cur["stable_revision"] or cur["revision"]) - 1
        if to < 1:
            raise Conflict(f"deployment {name!r} has no earlier revision to roll back to")
        old = self.revision(name, to)
        self.put(name, old["module"], old["target"], old["priority"], collect_rate_ppm=old["collect_rate_ppm"],
                 device_bake=old["device_bake"], config=old["config"], actor=actor, note=f"rollback to revision {to}")
        return self.rollouts.status(name)

    def delete(self, name: str, actor: str = "") -> dict[str, Any]:
        """Deactivate: devices drop the module unless another deployment provides it."""
        with self.db.transaction() as tx:
            if tx.execute("UPDATE deployments SET active = 0, stable_revision = NULL WHERE name = ?",
                          (name,)).rowcount == 0:
                raise NotFound(f"deployment {name!r} does not exist")
            for live in self.rollouts._live(name):
                self.rollouts._move(live, SUPERSEDED, actor, reason="deployment deleted")
            record(self.db, actor, "deployment.deleted", name)
        return self.get(name) | {"published": self.director.sync()}

    def list(self) -> list[dict[str, Any]]:
        return [deployment_row(r) for r in self.db.query("SELECT * FROM deployments ORDER BY created_at DESC")]

    def revisions(self, name: str) -> list[dict[str, Any]]:
        self._row(name)
        return [revision_row(r) for r in self.db.query(
            "SELECT * FROM deployment_revisions WHERE deployment = ? ORDER BY revision DESC", (name,))]

    def revision(self, name: str, revision: int) -> dict[str, Any]:
        row = self.db.one("SELECT * FROM deployment_revisions WHERE deployment = ? AND revision = ?", (name, revision))
        if row is None:
            raise NotFound(f"deployment {name!r} has no revision {revision}")
        return revision_row(row)

    def _row(self, name: str) -> dict[str, Any]:
        row = self.db.one("SELECT * FROM deployments WHERE name = ?", (name,))
        if row is None:
            raise NotFound(f"deployment {name!r} does not exist")
        return row

    def get(self, name: str) -> dict[str, Any]:
        out = deployment_row(self._row(name))
        counts: dict[str, int] = {}
        states: dict[str, int] = {}
        devices = []
        for dev in self.db.query("SELECT id, desired, reported FROM devices"):
            for view in module_views(loads(dev["desired"], []), loads(dev["reported"])):
                if view["deployment"] == name:
                    states[view["state"]] = states.get(view["state"], 0) + 1
                    c = category(view["state"])
                    counts[c] = counts.get(c, 0) + 1
                    devices.append(dev["id"])
        latest = self.db.one("SELECT id, state, wave, reason FROM rollouts WHERE deployment = ? ORDER BY id DESC LIMIT 1",
                             (name,))
        rollout = None
        if latest:
            rollout = {"id": latest["id"], "state": display(latest["state"], latest["wave"]), "reason": latest["reason"]}
        return out | {"devices": len(devices), "counts": counts, "states": states, "rollout": rollout}
