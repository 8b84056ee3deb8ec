"""Time-series queries over telemetry, and retention of raw points so the database stays bounded.

Storage is in hub/ingest/telemetry.py: a row per batch (raw points) and per-minute rollups
written with it. A query over [since, until) reads each minute that lies wholly inside
one of its buckets from the rollups, and only the minutes cut by a bucket edge (or by
``since``/``until``) from the raw points, so windows of any length cost about one rollup
row per device and minute. Raw points older than the retention are deleted; their
minutes stay as rollups and are then counted whole in the bucket where they start.

Latency percentiles of a bucket are the inference-weighted mean of the per-interval
percentiles the devices report (devices send percentiles, not histograms); the rollups
keep the weighted sums, so they add no error of their own. docs/monitoring.md says how
far that estimate can be from the true percentile.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import groupby
from typing import Any

import numpy as np

from hub.ingest.telemetry import MINUTE, SUMS, UPSERT_MINUTE, Packed, Points, group_sums, pack, store, unpack_many
from hub.store import Connection, Database
from protocol.messages import LatencyMs, TelemetryBatch, TelemetryPoint

log = logging.getLogger("edgefleet.hub.timeseries")

FOREVER = 1e18  # an open end of a window, as a number the database compares
Sums = np.ndarray  # float64[len(SUMS)]: points, inferences, errors, w50, w95, w99, s95
_SUM_COLS = ", ".join(f"SUM({c})" for c in SUMS)


@dataclass(frozen=True)
class SeriesFilter:
    device: str | None = None
    module: str | None = None
    version: int | None = None
    devices: frozenset[str] | None = None  # only these sources (a deployment's devices); None: any

    def sql(self) -> tuple[str, dict[str, Any]]:
        """`` AND col = :col`` clauses for the columns set, and their parameters."""
        params = {c: v for c, v in (("device", self.device), ("module", self.module), ("version", self.version))
                  if v is not None}
        return "".join(f" AND {c} = :{c}" for c in params), params


def raw_from(db: Database) -> float:
    """Raw points are complete from this time on; before it only rollups remain."""
    value = db.scalar("SELECT value FROM telemetry_meta WHERE key = 'raw_from'")
    return -math.inf if value is None else value


def selected(pts: Points, f: SeriesFilter) -> np.ndarray:
    """Mask of the points whose (module, version) ``f`` selects (its device is chosen in SQL)."""
    wanted = np.array([(f.module is None or m == f.module) and (f.version is None or v == f.version)
                       for m, v in pts.keys], dtype=bool)
    return wanted[pts.key]


def _raise_raw_from(conn: Connection, value: float) -> None:
    conn.execute("INSERT INTO telemetry_meta (key, value) VALUES ('raw_from', ?) ON CONFLICT (key) "
                 "DO UPDATE SET value = CASE WHEN excluded.value > telemetry_meta.value THEN excluded.value "
                 "ELSE telemetry_meta.value END", (value,))


def raw_points(db: Database, f: SeriesFilter, since: float, until: float) -> tuple[Points, np.ndarray]:
    """Every raw point in [since, until) that ``f`` selects: the columns and the mask of selected points."""
    sql = ("SELECT device, seq, keys, data FROM telemetry_batches INDEXED BY telemetry_batches_ts "
           "WHERE ts_max >= ? AND ts_min < ?")
    params: list[Any] = [since, until]
    if f.device is not None:
        sql += " AND device = ?"
        params.append(f.device)
    pts = unpack_many(db.db().execute(sql, params).fetchall())
    ts = pts.rec["ts"]
    return pts, (ts >= since) & (ts < until) & selected(pts, f)


def totals(db: Database, f: SeriesFilter, since: float, until: float = FOREVER,
           step: float | None = None) -> dict[tuple[int, str], Sums]:
    """SUMS per (bucket index, device) over [since, until); buckets are ``step`` seconds from ``since`` (one if None).

    SQLite sums the minutes that lie wholly inside one bucket; the minutes cut by an edge are
    read from raw points, or, where retention took those, counted whole where they start.
    """
    where, args = f.sql()
    args.update(since=since, until=until, step=step, first=math.floor(since / MINUTE) * MINUTE)
    b_sql = "0" if step is None else "CAST((bucket - :since) / :step AS INTEGER)"  # as raw points: (ts - since) / step
    whole = f"bucket >= :since AND bucket + {MINUTE} <= :until" + (
        "" if step is None else f" AND bucket + {MINUTE} <= :since + ({b_sql} + 1) * :step")
    conn = db.db()
    out: dict[tuple[int, str], Sums] = {}

    def add(key: tuple[int, str], sums: Any) -> None:
        if f.devices is not None and key[1] not in f.devices:
            return
        have = out.get(key)
        out[key] = np.asarray(sums, dtype=np.float64) if have is None else have + sums

    for b, device, *sums in conn.execute(f"SELECT {b_sql} AS b, device, {_SUM_COLS} FROM telemetry_minutes "
                                         f"WHERE {whole}{where} GROUP BY b, device", args):
        add((b, device), sums)
    complete_from = raw_from(db)
    cut: set[int] = set()  # minutes to read from raw points
    for m, device, *sums in conn.execute(f"SELECT bucket, device, {_SUM_COLS} FROM telemetry_minutes WHERE bucket >= "
                                         f":first AND bucket < :until AND NOT ({whole}){where} GROUP BY bucket, device",
                                         args):
        if m >= complete_from:
            cut.add(m)
        elif since <= m:  # rolled up only: counted whole where the minute starts
            add((0 if step is None else int((m - since) / step), device), sums)
    for lo, hi in _runs(sorted(cut)):
        pts, mask = raw_points(db, f, max(lo, since), min(hi, until))
        if not mask.any():
            continue
        rec = pts.rec[mask]
        b = np.zeros(len(rec), dtype=np.int64) if step is None else ((rec["ts"] - since) / step).astype(np.int64)
        groups, sums = group_sums(np.stack([b, pts.device[mask]]), rec)
        for (g, d), row in zip(groups.T.tolist(), sums):
            add((g, pts.devices[d]), row)
    return out


def _runs(minutes: list[int]) -> Iterator[tuple[int, int]]:
    """Consecutive minutes as [start, end) ranges."""
    start = prev = None
    for m in minutes:
        if prev is not None and m == prev + MINUTE:
            prev = m
            continue
        if start is not None:
            yield start, prev + MINUTE
        start = prev = m
    if start is not None:
        yield start, prev + MINUTE


def device_totals(db: Database, device: str | None = None) -> dict[str, tuple[int, int]]:
    """(inferences, errors) per device over all time."""
    rows = db.db().execute("SELECT device, SUM(inferences), SUM(errors) FROM telemetry_minutes"
                           + (" WHERE device = ?" if device is not None else "") + " GROUP BY device",
                           [device] if device is not None else []).fetchall()
    return {d: (n or 0, e or 0) for d, n, e in rows}


def recent_points(db: Database, f: SeriesFilter, limit: int) -> list[dict[str, Any]]:
    """The newest ``limit`` raw points (newest first), as the rows of the former one-row-per-point table."""
    sql, params = "SELECT device, seq, keys, data, ts_max FROM telemetry_batches INDEXED BY telemetry_batches_ts", []
    if f.device is not None:
        # the time index is walked newest first; start and stop it where this device's minutes do
        lo, hi = db.db().execute("SELECT MIN(bucket), MAX(bucket) FROM telemetry_minutes WHERE device = ?",
                                 (f.device,)).fetchone()
        if hi is None:
            return []
        sql += " WHERE device = ? AND ts_max >= ? AND ts_max < ?"
        params += [f.device, lo, hi + MINUTE]
    cursor = db.db().execute(sql + " ORDER BY ts_max DESC", params)
    out: list[dict[str, Any]] = []
    floor = -math.inf  # once ``limit`` points are in hand, a batch ending before the oldest of them adds nothing
    while rows := cursor.fetchmany(256):
        if rows[0][4] < floor:
            break
        pts = unpack_many([r[:4] for r in rows])
        mask = selected(pts, f)
        rec = pts.rec[mask]
        for i, r in zip(np.flatnonzero(mask).tolist(), rec.tolist()):
            module, version = pts.keys[pts.key[i]]
            out.append({"device": pts.devices[pts.device[i]], "seq": int(pts.seq[i]), "ts": r[0], "module": module,
                        "version": version, "inferences": r[4], "errors": r[5], "p50": r[1], "p95": r[2],
                        "p99": r[3]})
        if len(out) >= limit:
            out.sort(key=lambda p: (p["ts"], p["seq"]), reverse=True)
            del out[limit:]
            floor = out[-1]["ts"]
    cursor.close()
    out.sort(key=lambda p: (p["ts"], p["seq"]), reverse=True)
    return out[:limit]


def migrate_legacy(db: Database) -> int:
    """A database from before batch storage: its per-point rows become batches and rollups; the old tables go.

    Returns the points moved. Runs once, at hub start (before ingest workers exist).
    """
    have = db.db().tables()
    if "telemetry" not in have:
        return 0
    moved = 0
    with db.transaction() as tx:
        rows = tx.execute("SELECT device, seq, ts, module, version, inferences, errors, p50, p95, p99 "
                          "FROM telemetry ORDER BY device, seq")
        packed: list[Packed] = []
        for (device, seq), group in groupby(rows, key=lambda r: (r[0], r[1])):
            points = [TelemetryPoint(ts=r[2], module=r[3], version=r[4], inferences=r[5], errors=r[6],
                                     latency_ms=LatencyMs(p50=r[7] or 0.0, p95=r[8] or 0.0, p99=r[9] or 0.0))
                      for r in group]
            packed.append(pack(TelemetryBatch(device=device, seq=seq, ts=points[-1].ts, points=points)))
            if len(packed) >= 1000:
                moved += store(tx, packed)
                packed = []
        moved += store(tx, packed)
        if "telemetry_rollup" in have:  # minutes folded by the former retention: one rollup row each
            tx.executemany(UPSERT_MINUTE, [
                (module, version, device, int(bucket // MINUTE) * MINUTE, 1, n, e, (p50 or 0.0) * n, (p95 or 0.0) * n,
                 (p99 or 0.0) * n, p95 or 0.0)
                for bucket, device, module, version, n, e, p50, p95, p99 in tx.execute(
                    "SELECT bucket, device, module, version, inferences, errors, p50, p95, p99 FROM telemetry_rollup")])
            oldest = tx.execute("SELECT MAX(bucket) FROM telemetry_rollup").fetchone()[0]
            if oldest is not None:  # minutes up to the last folded one exist only as rollups
                _raise_raw_from(tx, (oldest // MINUTE + 1) * MINUTE)
            tx.execute("DROP TABLE telemetry_rollup")
        tx.execute("DROP TABLE telemetry")
    log.info("moved %d telemetry points from the per-point table to batches and rollups", moved)
    return moved


class TimeSeries:
    def __init__(self, db: Database) -> None:
        self.db = db
        migrate_legacy(db)

    def series(self, f: SeriesFilter, step_s: float, since: float, until: float) -> list[dict[str, Any]]:
        per_bucket: dict[int, list[Any]] = {}
        for (b, _device), s in totals(self.db, f, since, until, step_s).items():
            if s[0] <= 0:
                continue
            have = per_bucket.setdefault(b, [np.zeros(len(SUMS)), 0])
            have[0] += s
            have[1] += 1
        out = []
        for b in sorted(per_bucket):
            s, devices = per_bucket[b]
            n, e = int(round(s[1])), int(round(s[2]))
            out.append({
                "t": since + b * step_s, "inferences": n, "errors": e, "error_rate": e / n if n else 0.0,
                "devices": devices,
                **{k: round(s[i] / n, 3) if n else None for k, i in (("p50", 3), ("p95", 4), ("p99", 5))},
            })
        return out

    def downsample(self, retention_s: float, now: float | None = None) -> int:
        """Delete raw batches older than ``retention_s`` (their rollups stay); return how many raw points went."""
        cutoff = (now if now is not None else time.time()) - retention_s
        cutoff -= cutoff % MINUTE  # whole minutes, so a minute is either complete in raw or rollup-only
        with self.db.transaction() as tx:
            gone = tx.execute("SELECT COALESCE(SUM(points), 0) FROM telemetry_batches WHERE ts_max < ?",
                              (cutoff,)).fetchone()[0]
            tx.delete_before("telemetry_batches", cutoff)  # PostgreSQL: whole partitions dropped
            _raise_raw_from(tx, cutoff)
            return gone
