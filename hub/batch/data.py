"""Batch scoring's monitoring samples in the hub's store, and their drift against the model's baseline.

A sample (``modules/batch/monitor.py``: every k-th row's inputs and outputs, as devices send them)
is stored in ``data_records`` under ``device = "batch:NAME"``, ``source = 'batch'``, so the drift
report is the one devices and endpoints get (``hub/monitoring/reports.py``), limited to that source.
"""

from __future__ import annotations

import json
import time
from typing import Any

from hub.errors import Invalid, NotFound
from hub.monitoring.reports import DriftReports, Target
from hub.store import Database

MAX_RECORDS = 1000  # per request: a sample arrives in pieces


def source(name: str) -> str:
    return f"batch:{name}"


def store_sample(db: Database, name: str, module: str, version: int, records: list[dict[str, Any]]) -> int:
    """Append records (each ``{"input": {...}, "output": {...}}``); returns how many were stored."""
    if len(records) > MAX_RECORDS:
        raise Invalid(f"{len(records)} records in one request; send at most {MAX_RECORDS}")
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not isinstance(r.get("input"), dict) or not isinstance(r.get("output"), dict):
            raise Invalid(f"record {i} is not {{\"input\": {{tensor: rows}}, \"output\": {{tensor: rows}}}}")
    if db.one("SELECT 1 FROM modules WHERE name = ? AND version = ?", (module, version)) is None:
        raise NotFound(f"module {module}:{version} does not exist")
    dev, ts = source(name), time.time()
    with db.transaction() as tx:
        seq = (tx.scalar("SELECT max(seq) FROM data_records WHERE device = ?", (dev,)) or 0) + 1
        tx.insert_many("data_records", ("device", "seq", "idx", "ts", "module", "version", "input", "output", "source"),
                       [(dev, seq, i, ts, module, version, json.dumps(r["input"]), json.dumps(r["output"]), "batch")
                        for i, r in enumerate(records)])
    return len(records)


def summary(db: Database, name: str) -> dict[str, Any]:
    row = db.one("SELECT module, version, count(*) AS records, min(ts) AS first, max(ts) AS last FROM data_records "
                 "WHERE device = ? GROUP BY module, version ORDER BY max(ts) DESC LIMIT 1", (source(name),))
    if row is None:
        raise NotFound(f"no batch sample named {name!r}")
    return row


def drift(db: Database, reports: DriftReports, name: str, threshold: float = 0.2) -> dict[str, Any]:
    """The sample's drift against its module version's baseline (every row of it, newest first up to the cap)."""
    info = summary(db, name)
    now = time.time()
    report = reports.report(Target(info["module"], info["version"], source=source(name)), now - info["first"] + 1,
                            until=now + 1, psi_threshold=threshold)
    return {"name": name, **report}
