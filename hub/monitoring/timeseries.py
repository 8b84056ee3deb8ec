"""Time-series queries over telemetry, and retention with downsampling so the database stays bounded.

Raw telemetry rows older than ``retention_s`` are folded into one-minute
rollups per (device, module, version) and deleted; queries read both. Latency
percentiles of a bucket are the inference-weighted mean of the reported
per-interval percentiles: an approximation, since devices send percentiles,
not histograms.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from hub.db import Database

ROLLUP_S = 60
SCHEMA = """
CREATE TABLE IF NOT EXISTS telemetry_rollup (
    bucket REAL NOT NULL, device TEXT NOT NULL, module TEXT NOT NULL, version INTEGER NOT NULL,
    inferences INTEGER NOT NULL, errors INTEGER NOT NULL, p50 REAL, p95 REAL, p99 REAL,
    PRIMARY KEY (bucket, device, module, version)
);
CREATE INDEX IF NOT EXISTS telemetry_module ON telemetry (module, version, ts);
CREATE INDEX IF NOT EXISTS telemetry_device ON telemetry (device, ts);
"""
# both tables in one shape: (ts, device, module, version, inferences, errors, p50, p95, p99)
UNION = ("(SELECT ts, device, module, version, inferences, errors, p50, p95, p99 FROM telemetry UNION ALL "
         "SELECT bucket AS ts, device, module, version, inferences, errors, p50, p95, p99 FROM telemetry_rollup)")


@dataclass(frozen=True)
class SeriesFilter:
    device: str | None = None
    module: str | None = None
    version: int | None = None


class TimeSeries:
    def __init__(self, db: Database) -> None:
        self.db = db
        db.apply_schema(SCHEMA)

    def series(self, f: SeriesFilter, step_s: float, since: float, until: float) -> list[dict[str, Any]]:
        clauses, params = ["ts >= ?", "ts < ?"], [since, until]
        for col, val in (("device", f.device), ("module", f.module), ("version", f.version)):
            if val is not None:
                clauses.append(f"{col} = ?")
                params.append(val)
        rows = self.db.query(
            f"SELECT CAST((ts - ?) / ? AS INTEGER) AS b, SUM(inferences) AS inferences, SUM(errors) AS errors, "
            f"SUM(p50 * inferences) AS w50, SUM(p95 * inferences) AS w95, SUM(p99 * inferences) AS w99, "
            f"COUNT(DISTINCT device) AS devices FROM {UNION} WHERE {' AND '.join(clauses)} GROUP BY b ORDER BY b",
            [since, step_s, *params])
        out = []
        for r in rows:
            n = r["inferences"] or 0
            out.append({
                "t": since + r["b"] * step_s, "inferences": n, "errors": r["errors"] or 0,
                "error_rate": (r["errors"] or 0) / n if n else 0.0, "devices": r["devices"],
                **{k: round((r[w] or 0) / n, 3) if n else None for k, w in (("p50", "w50"), ("p95", "w95"),
                                                                           ("p99", "w99"))},
            })
        return out

    def downsample(self, retention_s: float, now: float | None = None) -> int:
        """Fold raw rows older than ``retention_s`` into one-minute rollups; return how many raw rows went."""
        cutoff = (now if now is not None else time.time()) - retention_s
        cutoff -= cutoff % ROLLUP_S  # only whole buckets, so a bucket is never split between raw and rollup
        with self.db.transaction() as tx:
            tx.execute(
                "INSERT INTO telemetry_rollup (bucket, device, module, version, inferences, errors, p50, p95, p99) "
                "SELECT ts - (ts % ?) AS bucket, device, module, version, SUM(inferences), SUM(errors), "
                "SUM(p50 * inferences) / MAX(SUM(inferences), 1), SUM(p95 * inferences) / MAX(SUM(inferences), 1), "
                "SUM(p99 * inferences) / MAX(SUM(inferences), 1) FROM telemetry WHERE ts < ? "
                "GROUP BY bucket, device, module, version "
                "ON CONFLICT (bucket, device, module, version) DO UPDATE SET "
                "inferences = inferences + excluded.inferences, errors = errors + excluded.errors",
                (ROLLUP_S, cutoff))
            return tx.execute("DELETE FROM telemetry WHERE ts < ?", (cutoff,)).rowcount
