"""Drift reports: collected data of a deployment (or endpoint) against its model version's baseline.

A baseline is registered with the model (``POST /api/v1/models`` ``baseline``):
reference data ``{"inputs": {tensor: rows}, "outputs": {tensor: rows}}`` in the
same layout as the model's inputs/outputs; the first model of a module carries it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from hub.errors import NotFound
from hub.monitoring.drift import compare, flatten_rows
from hub.store import Database, loads
from modules.store import ContentStore

MAX_ROWS = 50_000  # per window: enough for stable statistics, bounded memory
# PSI over 10 bins has a sampling bias of about 9/n: below ~200 rows noise alone can pass a 0.2 threshold
MIN_ROWS = 200


@dataclass(frozen=True)
class Target:
    """What collected data to look at: a module version, optionally limited to one source."""

    module: str
    version: int
    source: str | None = None  # endpoint name, or None for every device

    @property
    def label(self) -> str:
        return f"{self.module}:{self.version}"


class DriftReports:
    def __init__(self, db: Database, store: ContentStore) -> None:
        self.db = db
        self.store = store
        self._baselines: dict[tuple[str, int], tuple[dict[str, list[Any]], dict[str, list[Any]]] | None] = {}

    def deployment_target(self, deployment: str) -> Target:
        row = self.db.one("SELECT module_name, module_version FROM deployments WHERE name = ?", (deployment,))
        if row is None:
            raise NotFound(f"no deployment {deployment!r}")
        return Target(row["module_name"], row["module_version"])

    def baseline(self, module: str, version: int) -> tuple[dict[str, list[Any]], dict[str, list[Any]]] | None:
        """Reference (input columns, output columns) for a module version, or None if its model has none."""
        key = (module, version)
        if key not in self._baselines:
            row = self.db.one(
                "SELECT m.baseline FROM module_sources s JOIN models m ON m.name = s.model_name "
                "AND m.version = s.model_version WHERE s.module_name = ? AND s.module_version = ? "
                "AND m.baseline IS NOT NULL ORDER BY s.model_name LIMIT 1", (module, version))
            ref = loads(row["baseline"]) if row else None
            if not ref:
                self._baselines[key] = None
            else:
                doc = json.loads(self.store.get(ref["sha256"]))
                self._baselines[key] = (flatten_rows([doc.get("inputs", {})]) if doc.get("inputs") else {},
                                        flatten_rows([doc.get("outputs", {})]) if doc.get("outputs") else {})
        return self._baselines[key]

    def collected(self, target: Target, since: float, until: float) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
        sql = ("SELECT input, output FROM data_records WHERE module = ? AND version = ? AND ts >= ? AND ts < ?")
        params: list[Any] = [target.module, target.version, since, until]
        if target.source is not None:
            sql += " AND device = ?"
            params.append(target.source)
        rows = self.db.query(sql + " ORDER BY ts DESC LIMIT ?", [*params, MAX_ROWS])
        return (flatten_rows([json.loads(r["input"]) for r in rows if r["input"]]),
                flatten_rows([json.loads(r["output"]) for r in rows if r["output"]]))

    def report(self, target: Target, window_s: float, until: float | None = None,
               psi_threshold: float = 0.2) -> dict[str, Any]:
        """Input and prediction drift over ``[until - window_s, until)``."""
        until = until if until is not None else time.time()
        base = self.baseline(target.module, target.version)
        if base is None:
            raise NotFound(f"module {target.label} has no baseline: register its model with --baseline")
        cur_in, cur_out = self.collected(target, until - window_s, until)
        features = [f.as_dict() for f in compare(base[0], cur_in, MIN_ROWS)]
        predictions = [f.as_dict() for f in compare(base[1], cur_out, MIN_ROWS)]
        return {
            "module": target.label, "source": target.source, "since": until - window_s, "until": until,
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
            raise NotFound(f"module {target.label} has no baseline")
        out: dict[str, list[float | None]] = {name: [] for name in base[0]}
        ends = [until - window_s * (points - 1 - i) for i in range(points)]
        for end in ends:
            drift = {f.feature: f.psi for f in compare(base[0], self.collected(target, end - window_s, end)[0], MIN_ROWS)}
            for name in out:
                out[name].append(round(drift[name], 6) if name in drift else None)
        return {"module": target.label, "window_s": window_s, "t": ends, "psi": out}
