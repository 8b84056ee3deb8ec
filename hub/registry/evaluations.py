"""Recorded evaluations: metrics measured by running a model version on a data set (``edgefleet model evaluate``).

The hub does not run models here; it keeps what the evaluator measured, with the data set's identity
(its sha256), so a later comparison knows whether two versions were measured on the same data.
"""

from __future__ import annotations

import math
import re
from typing import Any

from hub.audit import record
from hub.errors import Invalid
from hub.registry.models import ModelRegistry
from hub.store import Database, dumps, loads, now

METRIC_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_METRICS = 100


def evaluation_row(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "name": row["name"], "version": row["version"], "metrics": loads(row["metrics"], {}),
            "dataset": loads(row["dataset"], {}), "created_at": row["created_at"], "created_by": row["created_by"]}


class Evaluations:
    def __init__(self, db: Database, registry: ModelRegistry) -> None:
        self.db, self.registry = db, registry

    def record(self, name: str, version: int, metrics: dict[str, float], dataset: dict[str, Any] | None = None,
               actor: str = "") -> dict[str, Any]:
        """Keep one evaluation of ``name:version``; refuse names and values a comparison could not use."""
        self.registry.get(name, version)
        if not metrics or len(metrics) > MAX_METRICS:
            raise Invalid(f"an evaluation records 1 to {MAX_METRICS} metrics")
        bad = [k for k, v in metrics.items() if not METRIC_RE.match(k) or not isinstance(v, int | float)
               or isinstance(v, bool) or not math.isfinite(v)]
        if bad:
            raise Invalid(f"metric(s) {bad}: names are 1-64 letters, digits, '_', '.', '-' and values finite numbers")
        dataset = dict(dataset or {})
        digest = str(dataset.get("sha256", ""))
        if digest and not SHA256_RE.match(digest):
            raise Invalid("dataset.sha256 must be 64 lower-case hex digits")
        clean = {k: float(v) for k, v in metrics.items()}
        with self.db.transaction() as tx:
            eid = tx.scalar("INSERT INTO model_evaluations (name, version, metrics, dataset, dataset_sha256, created_at,"
                            " created_by) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
                            (name, version, dumps(clean), dumps(dataset), digest, now(), actor))
            record(self.db, actor, "model.evaluated", f"{name}:{version}", model=name, version=version, metrics=clean,
                   dataset=dataset, evaluation=eid)
        return self.get(eid)

    def get(self, evaluation: int) -> dict[str, Any]:
        row = self.db.one("SELECT * FROM model_evaluations WHERE id = ?", (evaluation,))
        assert row is not None
        return evaluation_row(row)

    def list(self, name: str, version: int, dataset_sha256: str | None = None) -> list[dict[str, Any]]:
        """Newest first; with ``dataset_sha256`` only those measured on that data."""
        self.registry.get(name, version)
        sql, params = "SELECT * FROM model_evaluations WHERE name = ? AND version = ?", [name, version]
        if dataset_sha256:
            sql += " AND dataset_sha256 = ?"
            params.append(dataset_sha256)
        return [evaluation_row(r) for r in self.db.query(sql + " ORDER BY id DESC", params)]
