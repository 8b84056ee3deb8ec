"""Telemetry storage: one row per batch with its points packed, and per-minute rollups kept in the same transaction.

A ``TelemetryBatch`` becomes one ``telemetry_batches`` row keyed by (device, seq), so a
replayed batch is ignored whole and its rollups are not counted twice. Its points are
fixed-width little-endian records (:data:`POINT`, 50 bytes each) in one blob; the
(module, version) pairs are a small JSON list the records index into. Because every
record has the same width, the blobs of many batches concatenate into one NumPy array
(:func:`unpack_many`), which is how the queries read raw points.

``telemetry_minutes`` holds, per (module, version, device, minute), the sums the
queries need: points, inferences, errors, inference-weighted latency percentiles
(``w50 = Σ p50·inferences`` …) and ``s95 = Σ p95`` for the rollout gates' plain mean.
Sums merge exactly, so a window read from rollups gives what the raw points give.
The tables are in hub/store/schema.py.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import repeat
from operator import mul

import numpy as np

from hub.store import Connection
from protocol.encoding import ProtocolError
from protocol.messages import TelemetryBatch

MINUTE = 60
POINT = np.dtype([("ts", "<f8"), ("p50", "<f8"), ("p95", "<f8"), ("p99", "<f8"),
                  ("inferences", "<i8"), ("errors", "<i8"), ("key", "<u2")])
_RECORD = struct.Struct("<ddddqqH")  # one POINT
# what a rollup row sums, in column order
SUMS = ("points", "inferences", "errors", "w50", "w95", "w99", "s95")

BATCH_COLUMNS = ("device", "seq", "ts_min", "ts_max", "points", "keys", "data")
UPSERT_MINUTE = (
    "INSERT INTO telemetry_minutes (module, version, device, bucket, points, inferences, errors, w50, w95, w99, s95)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (module, version, bucket, device) DO UPDATE SET "
    # the stored row's columns qualified by the table name: unqualified, PostgreSQL finds them ambiguous
    + ", ".join(f"{c} = telemetry_minutes.{c} + excluded.{c}" for c in SUMS))

Key = tuple[str, int]  # (module, version)


@dataclass(frozen=True, slots=True)
class Packed:
    """One batch ready to store: its row, and its rollup sums per (module, version, minute)."""

    device: str
    seq: int
    ts_min: float
    ts_max: float
    points: int
    keys: str  # JSON [[module, version], ...]
    data: bytes
    minutes: dict[tuple[str, int, int], list[float]]  # (module, version, bucket) -> SUMS


def minute_of(ts: np.ndarray) -> np.ndarray:
    return (np.floor_divide(ts, MINUTE) * MINUTE).astype(np.int64)


def pack(msg: TelemetryBatch) -> Packed | None:
    """The batch's row and rollups; None for a batch without points (nothing to store).

    This runs once per message on the ingest hot path: columns by list comprehension, records
    by ``struct``, and NumPy only to sum a batch that spans several minutes or module versions.
    ``tests/test_telemetry_store.py`` checks every path against the former per-point queries.
    """
    pts = msg.points
    if len(pts) == 1:  # an agent's usual batch (one module, one interval): half the time of the general path
        return _pack_one(msg)
    if not pts:
        return None
    ts = [p.ts for p in pts]
    lat = [p.latency_ms for p in pts]
    p50, p95, p99 = [q.p50 for q in lat], [q.p95 for q in lat], [q.p99 for q in lat]
    inf, err = [p.inferences for p in pts], [p.errors for p in pts]
    modules, versions = [p.module for p in pts], [p.version for p in pts]
    if len(set(modules)) == 1 and len(set(versions)) == 1:
        keys, kidx = [(modules[0], versions[0])], repeat(0)
    else:
        index: dict[Key, int] = {}
        kidx = [index.setdefault(k, len(index)) for k in zip(modules, versions)]
        keys = list(index)
    try:
        data = b"".join(map(_RECORD.pack, ts, p50, p95, p99, inf, err, kidx))
    except struct.error:
        raise _bad(msg, "a count does not fit in 64 bits") from None
    if not math.isfinite(sum(ts) + sum(p50) + sum(p95) + sum(p99)):  # one NaN would poison every sum it joins
        raise _bad(msg, "a time or latency is not a finite number")
    lo, hi = min(ts), max(ts)
    if len(keys) == 1 and lo // MINUTE == hi // MINUTE:  # the usual batch: one group, summed in Python
        module, version = keys[0]
        minutes = {(module, version, int(lo // MINUTE) * MINUTE): [
            len(pts), sum(inf), sum(err), sum(map(mul, p50, inf)), sum(map(mul, p95, inf)),
            sum(map(mul, p99, inf)), sum(p95)]}
    else:
        minutes = _rollups(np.frombuffer(data, POINT), keys)
    return Packed(msg.device, msg.seq, lo, hi, len(pts), _keys_json(tuple(keys)), data, minutes)


def _pack_one(msg: TelemetryBatch) -> Packed:
    p = msg.points[0]
    lat, n, ts = p.latency_ms, p.inferences, p.ts
    try:
        data = _RECORD.pack(ts, lat.p50, lat.p95, lat.p99, n, p.errors, 0)
    except struct.error:
        raise _bad(msg, "a count does not fit in 64 bits") from None
    if not math.isfinite(ts + lat.p50 + lat.p95 + lat.p99):
        raise _bad(msg, "a time or latency is not a finite number")
    minutes = {(p.module, p.version, int(ts // MINUTE) * MINUTE): [
        1, n, p.errors, lat.p50 * n, lat.p95 * n, lat.p99 * n, lat.p95]}
    return Packed(msg.device, msg.seq, ts, ts, 1, _keys_json(((p.module, p.version),)), data, minutes)


def _bad(msg: TelemetryBatch, why: str) -> ProtocolError:
    return ProtocolError(f"telemetry batch {msg.seq} of {msg.device}: {why}")


_KEYS_JSON: dict[tuple[Key, ...], str] = {}


def _keys_json(keys: tuple[Key, ...]) -> str:
    """JSON of a batch's (module, version) list; cached, since a device sends the same few over and over."""
    text = _KEYS_JSON.get(keys)
    if text is None:
        if len(_KEYS_JSON) >= 4096:
            _KEYS_JSON.clear()
        text = _KEYS_JSON[keys] = json.dumps(keys, separators=(",", ":"))
    return text


def _rollups(arr: np.ndarray, keys: list[Key]) -> dict[tuple[str, int, int], list[float]]:
    groups, sums = group_sums(np.stack([minute_of(arr["ts"]), arr["key"].astype(np.int64)]), arr)
    return {(*keys[k], m): row for (m, k), row in zip(groups.T.tolist(), sums.tolist())}


def point_sums(rec: np.ndarray) -> list[np.ndarray]:
    """Each point's share of each of SUMS."""
    inf = rec["inferences"].astype(np.float64)
    return [np.ones(len(rec)), inf, rec["errors"].astype(np.float64),
            rec["p50"] * inf, rec["p95"] * inf, rec["p99"] * inf, rec["p95"]]


def group_sums(by: np.ndarray, rec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SUMS of the points ``rec`` per distinct column of ``by`` (integer rows, one column a point).

    Returns the distinct columns (rows x groups) and the sums (groups x SUMS).
    """
    groups, inverse = np.unique(by, axis=1, return_inverse=True)
    inverse = inverse.reshape(-1)
    return groups, np.stack([np.bincount(inverse, weights=c, minlength=groups.shape[1]) for c in point_sums(rec)],
                            axis=1)


def store(conn: Connection, batches: Iterable[Packed]) -> int:
    """Insert batches and add their rollups, inside the caller's transaction; return the points that were new.

    A (device, seq) already stored is skipped with its rollups: exactly once, whichever process got it.
    Rows go in key order, so two processes writing at once take their row locks in the same order.
    """
    unique = {(b.device, b.seq): b for b in reversed(list(batches))}  # a batch twice in one write: its first copy
    rows = [(b.device, b.seq, b.ts_min, b.ts_max, b.points, b.keys, b.data) for _, b in sorted(unique.items())]
    inserted = conn.insert_new("telemetry_batches", BATCH_COLUMNS, rows, key=("device", "seq"))
    minutes: dict[tuple[str, int, str, int], list[float]] = {}
    new = 0
    for k in sorted(inserted):
        b = unique[k]
        new += b.points
        for (module, version, bucket), sums in b.minutes.items():
            key = (module, version, b.device, bucket)
            have = minutes.get(key)
            if have is None:
                minutes[key] = list(sums)
            else:
                for i, s in enumerate(sums):
                    have[i] += s
    if minutes:
        conn.executemany(UPSERT_MINUTE, [(*k, int(v[0]), int(v[1]), int(v[2]), *v[3:])
                                         for k, v in sorted(minutes.items())])
    return new


@dataclass(frozen=True)
class Points:
    """Raw points of many batches, as columns: ``rec`` (POINT records) and per point its device and (module, version)."""

    rec: np.ndarray
    device: np.ndarray  # index into ``devices``
    devices: list[str]
    key: np.ndarray  # index into ``keys``
    keys: list[Key]
    seq: np.ndarray


def unpack_many(rows: Sequence[tuple[str, int, str, bytes]]) -> Points:
    """Decode (device, seq, keys JSON, data) rows into one set of columns."""
    devices: dict[str, int] = {}
    keys: dict[Key, int] = {}
    parsed: dict[str, list[int]] = {}  # keys JSON -> global key indexes (most batches share one)
    counts, dev_idx, seqs, key_maps, blobs = [], [], [], [], []
    for device, seq, keys_json, data in rows:
        n = len(data) // POINT.itemsize
        counts.append(n)
        dev_idx.append(devices.setdefault(device, len(devices)))
        seqs.append(seq)
        if (local := parsed.get(keys_json)) is None:
            local = parsed[keys_json] = [keys.setdefault((m, v), len(keys)) for m, v in json.loads(keys_json)]
        key_maps.append(local)
        blobs.append(data)
    rec = np.frombuffer(b"".join(blobs), dtype=POINT)
    reps = np.asarray(counts, dtype=np.int64)
    # local key index -> global: offset each batch's small map into one flat table
    flat = np.asarray([g for m in key_maps for g in m], dtype=np.int64)
    lens = np.asarray([len(m) for m in key_maps], dtype=np.int64)
    key = flat[np.repeat(np.cumsum(lens) - lens, reps) + rec["key"].astype(np.int64)]
    return Points(rec, np.repeat(np.asarray(dev_idx, dtype=np.int64), reps), list(devices),
                  key, list(keys), np.repeat(np.asarray(seqs, dtype=np.int64), reps))
