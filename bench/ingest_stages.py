"""Where the hub's ingest time goes, stage by stage, in one process (no broker): per batch and in points/s.

Stages, for batches of 1, 100 and 1000 points:
  decode   protocol.decode (JSON -> validated TelemetryBatch);
  pack     hub.telemetry.pack (the batch row + its per-minute rollups);
  store    hub.telemetry.store in write transactions of ``--per-commit`` batches (WAL, a fresh database);
  legacy   the former layout in the same run: one row per point, PK (device, seq, module, ts) and
           indexes on ts, (module, version, ts) and (device, ts), rows built as before, 1000 rows a commit.
Medians over ``--rounds``.  Usage: python bench/ingest_stages.py [--points 1,100,1000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hub.ingest import telemetry  # noqa: E402
from hub.store import Database  # noqa: E402
from protocol.messages import LatencyMs, TelemetryBatch, TelemetryPoint, decode  # noqa: E402
from protocol.topics import Channel  # noqa: E402

TOTAL_POINTS = 100_000
DEVICES = 50
LEGACY = """
CREATE TABLE telemetry (
    device TEXT NOT NULL, seq INTEGER NOT NULL, ts REAL NOT NULL, module TEXT NOT NULL, version INTEGER NOT NULL,
    inferences INTEGER NOT NULL, errors INTEGER NOT NULL, p50 REAL, p95 REAL, p99 REAL,
    PRIMARY KEY (device, seq, module, ts)
);
CREATE INDEX telemetry_ts ON telemetry (ts);
CREATE INDEX telemetry_module ON telemetry (module, version, ts);
CREATE INDEX telemetry_device ON telemetry (device, ts);
"""
LEGACY_SQL = ("INSERT OR IGNORE INTO telemetry (device, seq, ts, module, version, inferences, errors, p50, p95, p99)"
              " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")


def payloads(points: int, seq0: int) -> list[bytes]:
    now = time.time()
    out = []
    for i in range(max(TOTAL_POINTS // points, DEVICES)):
        out.append(TelemetryBatch(device=f"bench-{i % DEVICES:03d}", seq=seq0 + i // DEVICES, ts=now, points=[
            TelemetryPoint(ts=now + i * 0.05 + k * 1e-3, module="m", version=1, inferences=10, errors=k % 3,
                           latency_ms=LatencyMs(p50=1.0, p95=2.0 + k % 5, p99=3.0 + k % 7)) for k in range(points)]
        ).encode())
    return out


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def pipeline(raw: list[bytes]) -> tuple[dict[str, float], list[telemetry.Packed], list[list[tuple]]]:
    """Decode each payload and build both layouts' rows from it, as the hub does, timing each step.

    One message at a time, dropped after use: holding thousands of decoded batches would make
    the garbage collector, not the decoder, the cost measured.
    """
    clock = time.perf_counter
    spent = {"decode": 0.0, "pack": 0.0, "legacy rows": 0.0}
    packed, rows = [], []
    for payload in raw:
        t0 = clock()
        msg = decode(Channel.TELEMETRY, payload)
        t1 = clock()
        packed.append(telemetry.pack(msg))
        t2 = clock()
        rows.append(legacy_rows(msg))
        spent["decode"] += t1 - t0
        spent["pack"] += t2 - t1
        spent["legacy rows"] += clock() - t2
    return spent, packed, rows


def legacy_rows(msg: TelemetryBatch) -> list[tuple]:
    return [(msg.device, msg.seq, p.ts, p.module, p.version, p.inferences, p.errors,
             p.latency_ms.p50, p.latency_ms.p95, p.latency_ms.p99) for p in msg.points]


def store_new(tmp: Path, packed: list[telemetry.Packed], per_commit: int) -> float:
    db = Database(tmp / "new.db")
    conn = db.db()

    def run() -> None:
        for i in range(0, len(packed), per_commit):
            with db.transaction():
                telemetry.store(conn, packed[i:i + per_commit])
    try:
        return timed(run)
    finally:
        db.close()


def store_legacy(tmp: Path, rows: list[list[tuple]]) -> float:
    db = Database(tmp / "legacy.db")
    conn = db.db().conn
    conn.executescript(LEGACY)
    per_commit = max(1, 1000 // len(rows[0]))  # the former writer: 1000 rows (or 100 ms) a transaction

    def run() -> None:
        for i in range(0, len(rows), per_commit):
            with db.transaction():
                for r in rows[i:i + per_commit]:
                    conn.executemany(LEGACY_SQL, r)
    try:
        return timed(run)
    finally:
        db.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--points", default="1,100,1000")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--per-commit", type=int, default=100, help="batches per write transaction (new layout)")
    args = ap.parse_args()
    print(f"{'points/batch':>12} {'stage':<14} {'us/batch':>9} {'points/s':>11}")
    for points in (int(p) for p in args.points.split(",")):
        times: dict[str, list[float]] = {}
        batches = 0
        for r in range(args.rounds):
            raw = payloads(points, r * 10_000)
            batches = len(raw)
            stages, packed, rows = pipeline(raw)
            for name, t in stages.items():
                times.setdefault(name, []).append(t)
            with tempfile.TemporaryDirectory() as tmp:
                times.setdefault("store", []).append(store_new(Path(tmp), packed, args.per_commit))
                times.setdefault("legacy store", []).append(store_legacy(Path(tmp), rows))
        for stage, ts in times.items():
            t = statistics.median(ts)
            print(f"{points:>12} {stage:<14} {t / batches * 1e6:>9.1f} {batches * points / t:>11,.0f}")
        new = sum(statistics.median(times[s]) for s in ("decode", "pack", "store"))
        old = sum(statistics.median(times[s]) for s in ("decode", "legacy rows", "legacy store"))
        print(f"{points:>12} {'= new path':<14} {new / batches * 1e6:>9.1f} {batches * points / new:>11,.0f}")
        print(f"{points:>12} {'= legacy path':<14} {old / batches * 1e6:>9.1f} {batches * points / old:>11,.0f}")


if __name__ == "__main__":
    main()
