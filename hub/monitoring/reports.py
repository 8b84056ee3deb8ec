"""Drift reports: collected data of a deployment (or endpoint) against its model version's baseline.

A baseline is registered with the model (``POST /api/v1/models`` ``baseline``):
reference data ``{"inputs": {tensor: rows}, "outputs": {tensor: rows}}`` in the
same layout as the model's inputs/outputs; the first model of a module carries it.
A module version whose models have none is compared against the newest earlier
version of the same module that has one, and the report says so (``baseline``).

A deployment's numbers are its own devices' only: a web endpoint, or another
deployment, serving the same module version is not mixed in (:func:`deployment_devices`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from hub.errors import NotFound
from hub.monitoring.drift import compare, flatten_rows
from hub.store import Database, loads
from hub.store.blobs import BlobStore

MAX_ROWS = 50_000  # per window: enough for stable statistics, bounded memory
# PSI over 10 bins has a sampling bias of about 9/n: below ~200 rows noise alone can pass a 0.2 threshold
MIN_ROWS = 200


@dataclass(frozen=True)
class Target:
    """What collected data to look at: a module version, optionally limited to one source or to some devices."""

    module: str
    version: int
    source: str | None = None  # one source (a device id, or ``endpoint:NAME``), or None for every source
    devices: frozenset[str] | None = None  # a deployment's devices (None: no limit)

    @property
    def label(self) -> str:
        return f"{self.module}:{self.version}"


def deployment_devices(db: Database, deployment: str) -> frozenset[str]:
    """The devices whose numbers are the deployment's: those it supplies a module to now (their desired state names
    it) and those its rollouts moved (a device that left its target since still ran its version meanwhile)."""
    needle = f'%"deployment":{json.dumps(deployment)}%'  # a cheap pre-filter on the stored JSON (as dumps writes it)
    out = {r["id"] for r in db.query("SELECT id, desired FROM devices WHERE desired LIKE ?", (needle,))
           if any(m.get("deployment") == deployment for m in loads(r["desired"], []))}
    out.update(r["device"] for r in db.query(
        "SELECT DISTINCT p.device FROM rollout_devices p JOIN rollouts r ON r.id = p.rollout WHERE r.deployment = ?",
        (deployment,)))
    return frozenset(out)


class DriftReports:
    def __init__(self, db: Database, store: BlobStore) -> None:
        self.db = db
        self.store = store
        self._baselines: dict[tuple[str, int], tuple[dict[str, list[Any]], dict[str, list[Any]]] | None] = {}

    def deployment_target(self, deployment: str) -> Target:
        row = self.db.one("SELECT module_name, module_version FROM deployments WHERE name = ?", (deployment,))
        if row is None:
            raise NotFound(f"no deployment {deployment!r}")
        return Target(row["module_name"], row["module_version"], devices=deployment_devices(self.db, deployment))

    def baseline_source(self, module: str, version: int) -> int | None:
        """The module version whose baseline ``module:version`` is compared against: its own, else the newest
        earlier version's that has one; None if no version up to it has one."""
        row = self.db.one(
            "SELECT MAX(s.module_version) AS v FROM module_sources s JOIN models m ON m.name = s.model_name "
            "AND m.version = s.model_version WHERE s.module_name = ? AND s.module_version <= ? "
            "AND m.baseline IS NOT NULL", (module, version))
        return row["v"] if row else None

    def baseline_info(self, target: Target) -> dict[str, Any] | None:
        """Where the baseline comes from, for reports and alert rules; None: there is none."""
        source = self.baseline_source(target.module, target.version)
        if source is None:
            return None
        return {"module": f"{target.module}:{source}", "inherited": source != target.version}

    def no_baseline(self, target: Target) -> str:
        return (f"no baseline: module {target.label} (and every earlier version) was registered without one, so "
                "drift is not checked; register its model with --baseline")

    def baseline(self, module: str, version: int) -> tuple[dict[str, list[Any]], dict[str, list[Any]]] | None:
        """Reference (input columns, output columns) for a module version (inherited, see above), or None."""
        key = (module, version)
        if key not in self._baselines:
            source = self.baseline_source(module, version)
            row = source is not None and self.db.one(
                "SELECT m.baseline FROM module_sources s JOIN models m ON m.name = s.model_name "
                "AND m.version = s.model_version WHERE s.module_name = ? AND s.module_version = ? "
                "AND m.baseline IS NOT NULL ORDER BY s.model_name LIMIT 1", (module, source))
            ref = loads(row["baseline"]) if row else None
            if not ref:
                return None  # not cached: a later registration may give it one
            doc = json.loads(self.store.get(ref["sha256"]))
            self._baselines[key] = (flatten_rows([doc.get("inputs", {})]) if doc.get("inputs") else {},
                                    flatten_rows([doc.get("outputs", {})]) if doc.get("outputs") else {})
        return self._baselines[key]

    def collected(self, target: Target, since: float, until: float) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
        sql = ("SELECT device, input, output FROM data_records WHERE module = ? AND version = ? AND ts >= ? AND ts < ?")
        params: list[Any] = [target.module, target.version, since, until]
        if target.source is not None:
            sql += " AND device = ?"
            params.append(target.source)
        rows: list[tuple[Any, ...]] = []
        cursor = self.db.db().execute(sql + " ORDER BY ts DESC", params)  # newest first, until MAX_ROWS are the target's
        while len(rows) < MAX_ROWS and (page := cursor.fetchmany(1000)):
            rows += [r for r in page if target.devices is None or r[0] in target.devices]
        cursor.close()
        rows = rows[:MAX_ROWS]
        return (flatten_rows([json.loads(r[1]) for r in rows if r[1]]),
                flatten_rows([json.loads(r[2]) for r in rows if r[2]]))

    def report(self, target: Target, window_s: float, until: float | None = None,
               psi_threshold: float = 0.2) -> dict[str, Any]:
        """Input and prediction drift over ``[until - window_s, until)``."""
        until = until if until is not None else time.time()
        base = self.baseline(target.module, target.version)
        if base is None:
            raise NotFound(self.no_baseline(target))
        cur_in, cur_out = self.collected(target, until - window_s, until)
        features = [f.as_dict() for f in compare(base[0], cur_in, MIN_ROWS)]
        predictions = [f.as_dict() for f in compare(base[1], cur_out, MIN_ROWS)]
        info = self.baseline_info(target)
        return {
            "module": target.label, "source": target.source, "since": until - window_s, "until": until,
            "baseline": info, **({"note": f"module {target.label} has no baseline of its own: compared against "
                                          f"{info['module']}'s"} if info and info["inherited"] else {}),
            "devices": None if target.devices is None else len(target.devices),
            "rows": max((len(v) for v in cur_in.values()), default=0), "psi_threshold": psi_threshold,
            "features": features, "predictions": predictions,
            "drifted": [f["feature"] for f in features if f["psi"] > psi_threshold],
            "prediction_drifted": [f["feature"] for f in predictions if f["psi"] > psi_threshold],
        }

    def series(self, target: Target, window_s: float, points: int, until: float | None = None) -> dict[str, Any]:
        """Plot-ready: PSI per feature for ``points`` consecutive windows ending at ``until``."""
        until = until if until is not None else time.time()
        base = self.baseline(target.module, target.version)
        if base is None:
            raise NotFound(self.no_baseline(target))
        out: dict[str, list[float | None]] = {name: [] for name in base[0]}
        ends = [until - window_s * (points - 1 - i) for i in range(points)]
        for end in ends:
            drift = {f.feature: f.psi for f in compare(base[0], self.collected(target, end - window_s, end)[0], MIN_ROWS)}
            for name in out:
                out[name].append(round(drift[name], 6) if name in drift else None)
        return {"module": target.label, "window_s": window_s, "t": ends, "psi": out}
