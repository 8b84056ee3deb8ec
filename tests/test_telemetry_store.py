"""Telemetry storage (a row per batch + per-minute rollups) answers exactly as one row per point did.

The reference is the former schema and its queries, run by SQLite over the same points.
"""

from __future__ import annotations

import random
import sqlite3

import numpy as np
import pytest

from hub.ingest import telemetry
from hub.monitoring.timeseries import SeriesFilter, TimeSeries, device_totals, recent_points, totals
from hub.rollout.gates import Gates, evaluate
from hub.store import Database
from protocol.encoding import ProtocolError
from protocol.messages import LatencyMs, TelemetryBatch, TelemetryPoint
from tests.pg import hub_store

pytestmark = pytest.mark.hubstore  # run again on PostgreSQL by scripts/test.sh

T0 = 1_700_000_000.0
MODULES = [("m", 1), ("m", 2), ("other", 1)]


def fleet_batches(seed: int, devices: int = 4, batches: int = 40) -> list[TelemetryBatch]:
    """Batches of 1..30 points spread over ~10 minutes, mixing module versions and crossing minute edges.

    Both ways of packing are covered: up to 16 points and more, one (module, version) and several.
    """
    rng = random.Random(seed)
    out = []
    for d in range(devices):
        ts = T0 + rng.uniform(0, 30)
        for seq in range(batches):
            points = []
            for _ in range(rng.randint(1, 30)):
                ts += rng.uniform(0, 1.0)
                module, version = rng.choice(MODULES[:1] if d == 0 else MODULES)  # d0: one module version
                n = rng.randint(0, 50)
                points.append(TelemetryPoint(ts=ts, module=module, version=version, inferences=n,
                                             errors=rng.randint(0, n), latency_ms=LatencyMs(
                                                 p50=rng.uniform(1, 5), p95=rng.uniform(5, 20), p99=rng.uniform(20, 90))))
            out.append(TelemetryBatch(device=f"d{d}", seq=seq, ts=ts, points=points))
    return out


def reference(batches: list[TelemetryBatch]) -> sqlite3.Connection:
    """The former one-row-per-point table."""
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE telemetry (device TEXT, seq INTEGER, ts REAL, module TEXT, version INTEGER, "
                 "inferences INTEGER, errors INTEGER, p50 REAL, p95 REAL, p99 REAL, PRIMARY KEY (device, seq, module, ts))")
    conn.executemany("INSERT OR IGNORE INTO telemetry VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", [
        (b.device, b.seq, p.ts, p.module, p.version, p.inferences, p.errors, p.latency_ms.p50, p.latency_ms.p95,
         p.latency_ms.p99) for b in batches for p in b.points])
    return conn


def reference_series(conn: sqlite3.Connection, f: SeriesFilter, step: float, since: float, until: float) -> list:
    where, params = f.sql()
    rows = conn.execute(
        "SELECT CAST((ts - :since) / :step AS INTEGER) AS b, SUM(inferences), SUM(errors), SUM(p50 * inferences), "
        "SUM(p95 * inferences), SUM(p99 * inferences), COUNT(DISTINCT device) FROM telemetry "
        f"WHERE ts >= :since AND ts < :until{where} GROUP BY b ORDER BY b",
        {**params, "since": since, "step": step, "until": until}).fetchall()
    return [{"t": since + b * step, "inferences": n, "errors": e, "error_rate": e / n if n else 0.0, "devices": d,
             **{k: round(w / n, 3) if n else None for k, w in (("p50", w50), ("p95", w95), ("p99", w99))}}
            for b, n, e, w50, w95, w99, d in rows]


@pytest.fixture
def stored(tmp_path):
    db = hub_store(tmp_path)
    batches = fleet_batches(7)
    with db.transaction() as tx:
        new = telemetry.store(tx, [telemetry.pack(b) for b in batches])
    assert new == sum(len(b.points) for b in batches)
    yield db, batches
    db.close()


def same(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for k in g:
            assert g[k] == pytest.approx(w[k], abs=1.5e-3 if k in ("p50", "p95", "p99") else 1e-9), (k, g, w)


@pytest.mark.parametrize("f", [SeriesFilter(), SeriesFilter(module="m", version=1), SeriesFilter(device="d2"),
                               SeriesFilter(device="d1", module="other"), SeriesFilter(module="nothing")])
def test_series_equal_the_per_point_queries_for_any_window_and_step(stored, f):
    db, batches = stored
    ref = reference(batches)
    ts = TimeSeries(db)
    rng = random.Random(3)
    windows = [(T0 - 100, T0 + 3600, 60.0), (T0 - 100, T0 + 3600, 3600.0), (T0, T0 + 600, 60.0),
               (T0 + 17.3, T0 + 451.9, 13.0), (T0 + 120, T0 + 240, 60.0), (T0 + 61.5, T0 + 62.5, 0.25)]
    windows += [(s, s + rng.uniform(1, 700), rng.choice([1.0, 7.5, 60.0, 90.0, 120.0, 300.0]))
                for s in (T0 + rng.uniform(-60, 600) for _ in range(12))]
    for since, until, step in windows:
        same(ts.series(f, step, since, until), reference_series(ref, f, step, since, until))


def test_a_replayed_batch_is_stored_and_counted_once(stored):
    db, batches = stored
    with db.transaction() as tx:
        again = telemetry.store(tx, [telemetry.pack(b) for b in batches[:5]])
    assert again == 0
    ref = reference(batches)
    assert device_totals(db) == {d: (n, e) for d, n, e in ref.execute(
        "SELECT device, SUM(inferences), SUM(errors) FROM telemetry GROUP BY device")}


def test_recent_points_are_the_newest_rows_of_the_old_table(stored):
    db, batches = stored
    ref = reference(batches)
    cols = ["device", "seq", "ts", "module", "version", "inferences", "errors", "p50", "p95", "p99"]
    for f, limit in ((SeriesFilter(), 25), (SeriesFilter(device="d3"), 7), (SeriesFilter(module="other"), 100),
                     (SeriesFilter(device="d0", module="m"), 10_000)):
        where, params = f.sql()
        want = [dict(zip(cols, r)) for r in ref.execute(
            f"SELECT * FROM telemetry WHERE 1=1{where} ORDER BY ts DESC, seq DESC LIMIT :limit",
            {**params, "limit": limit})]
        assert recent_points(db, f, limit) == want


def test_retention_drops_raw_points_and_keeps_totals(stored):
    db, batches = stored
    ref = reference(batches)
    ts = TimeSeries(db)
    whole = reference_series(ref, SeriesFilter(), 3600.0, T0 - 60, T0 + 3600)
    cutoff = (T0 + 300) // 60 * 60  # retention cuts on whole minutes
    gone = ts.downsample(retention_s=100, now=cutoff + 100)
    assert gone == sum(len(b.points) for b in batches if max(p.ts for p in b.points) < cutoff)
    assert gone > 0
    # raw points from the cutoff on are all still there
    assert not db.scalar("SELECT COUNT(*) FROM telemetry_batches WHERE ts_max < ?", (cutoff,))
    same(ts.series(SeriesFilter(), 3600.0, T0 - 60, T0 + 3600), whole)
    # a window starting on a minute boundary after the cutoff is still exact to the point
    same(ts.series(SeriesFilter(), 7.0, cutoff + 3.5, cutoff + 400), reference_series(ref, SeriesFilter(), 7.0,
                                                                                       cutoff + 3.5, cutoff + 400))
    # before it, minute buckets are still exact; a minute cut by a window edge counts whole where it starts
    first = cutoff - 240
    same(ts.series(SeriesFilter(), 60.0, first, cutoff), reference_series(ref, SeriesFilter(), 60.0, first, cutoff))
    rolled = ts.series(SeriesFilter(), 45.0, first - 30, cutoff - 30)
    starts_inside = ref.execute("SELECT SUM(inferences) FROM telemetry WHERE ts >= ? AND ts < ?",
                                (first, cutoff)).fetchone()[0]
    assert sum(r["inferences"] for r in rolled) == starts_inside


def test_gate_figures_equal_the_per_point_queries(stored):
    db, batches = stored
    ref = reference(batches)
    since = T0 + 123.4
    want = {d: (n, e, p) for d, n, e, p in ref.execute(
        "SELECT device, SUM(inferences), SUM(errors), AVG(p95) FROM telemetry WHERE module = 'm' AND version = 2 "
        "AND ts >= ? GROUP BY device", (since,))}
    got = {d: (int(s[1]), int(s[2]), s[6] / s[0]) for (_, d), s in
           totals(db, SeriesFilter(module="m", version=2), since).items()}
    assert got.keys() == want.keys()
    for d in want:
        assert got[d][:2] == want[d][:2] and got[d][2] == pytest.approx(want[d][2])
    states = {d: ("running", "") for d in want}
    result = evaluate(db, Gates(max_error_rate=1.0, max_p95_increase=10.0, min_reporting=1.0), states, "m", 2,
                      since, previous_version=1, rollout_started=T0 + 200)
    base = ref.execute("SELECT AVG(p95) FROM telemetry WHERE module = 'm' AND version = 1 AND ts >= ?",
                       (T0 + 200 - 3600,)).fetchone()[0]
    p95 = next(c for c in result.checks if c.name == "max_p95_increase")
    new = np.mean([want[d][2] for d in want])
    assert p95.value == pytest.approx(new / base - 1.0)
    assert next(c for c in result.checks if c.name == "min_reporting").value == 1.0


def test_an_empty_batch_stores_nothing_and_bad_numbers_are_refused_clearly(tmp_path):
    assert telemetry.pack(TelemetryBatch(device="d", seq=1, ts=T0, points=[])) is None
    for n in (1, 40):  # the bridge counts these as rejected messages
        with pytest.raises(ProtocolError, match="not a finite number"):
            telemetry.pack(TelemetryBatch(device="d", seq=1, ts=T0, points=[
                TelemetryPoint(ts=T0 + i, module="m", version=1, inferences=1, errors=0,
                               latency_ms=LatencyMs(p99=float("nan") if i == n - 1 else 1.0)) for i in range(n)]))
        with pytest.raises(ProtocolError, match="does not fit in 64 bits"):
            telemetry.pack(TelemetryBatch(device="d", seq=1, ts=T0, points=[
                TelemetryPoint(ts=T0 + i, module="m", version=1, inferences=2**70, errors=0) for i in range(n)]))


def test_a_database_from_before_moves_its_points_and_rollups_over(tmp_path):
    db = Database(tmp_path / "hub.db")
    batches = fleet_batches(11, devices=2, batches=10)
    ref = reference(batches)
    conn = db.db().conn
    conn.executescript("CREATE TABLE telemetry (device TEXT NOT NULL, seq INTEGER NOT NULL, ts REAL NOT NULL, "
                       "module TEXT NOT NULL, version INTEGER NOT NULL, inferences INTEGER NOT NULL, errors INTEGER "
                       "NOT NULL, p50 REAL, p95 REAL, p99 REAL, PRIMARY KEY (device, seq, module, ts));"
                       "CREATE TABLE telemetry_rollup (bucket REAL NOT NULL, device TEXT NOT NULL, module TEXT NOT NULL,"
                       " version INTEGER NOT NULL, inferences INTEGER NOT NULL, errors INTEGER NOT NULL, p50 REAL, "
                       "p95 REAL, p99 REAL, PRIMARY KEY (bucket, device, module, version));")
    conn.executemany("INSERT INTO telemetry VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", ref.execute("SELECT * FROM telemetry"))
    old_minute = (T0 - 3600) // 60 * 60
    conn.execute("INSERT INTO telemetry_rollup VALUES (?, 'd0', 'm', 1, 500, 5, 1.0, 4.0, 9.0)", (old_minute,))
    ts = TimeSeries(db)
    have = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "telemetry" not in have and "telemetry_rollup" not in have
    same(ts.series(SeriesFilter(), 60.0, T0 - 90, T0 + 900), reference_series(ref, SeriesFilter(), 60.0, T0 - 90,
                                                                                T0 + 900))
    (hour,) = ts.series(SeriesFilter(device="d0"), 3600.0, old_minute, old_minute + 3600)
    assert (hour["inferences"], hour["errors"], hour["p95"]) == (500, 5, 4.0)
    assert len(recent_points(db, SeriesFilter(), 10_000)) == ref.execute("SELECT COUNT(*) FROM telemetry").fetchone()[0]
    db.close()
