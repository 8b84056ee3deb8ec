"""The hub's monitoring service: drift reports, alerts, time series, retention, on one background thread.

With hub replicas, alert evaluation and retention run on the leader only (hub/leader.py); the
other replicas answer queries from the same database.
"""

from __future__ import annotations

import logging
import threading
import time

from hub.config import HubConfig
from hub.leader import SOLE_LEADER, Leader
from hub.monitoring.alerts import Alerts
from hub.monitoring.labels import Labels, Quality
from hub.monitoring.reports import DriftReports
from hub.monitoring.timeseries import TimeSeries
from hub.store import Database
from hub.store.blobs import BlobStore

log = logging.getLogger("edgefleet.hub.monitoring")

RETENTION_EVERY_S = 600.0


class Monitor:
    def __init__(self, config: HubConfig, db: Database, store: BlobStore, leader: Leader = SOLE_LEADER) -> None:
        self.config = config
        self.db = db
        self.leader = leader
        self.reports = DriftReports(db, store)
        self.alerts = Alerts(db, self.reports)
        self.series = TimeSeries(db)
        self.labels = Labels(db)
        self.quality = Quality(self.reports, self.labels)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hub-monitoring", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def apply_retention(self, now: float | None = None) -> dict[str, int]:
        now = time.time() if now is None else now
        folded = self.series.downsample(self.config.telemetry_retention_s, now)
        with self.db.transaction() as tx:  # PostgreSQL: whole days' partitions dropped, not rows deleted
            pruned = tx.delete_before("data_records", now - self.config.data_retention_s)
        if folded or pruned:
            log.info("retention: folded %d telemetry rows into rollups, pruned %d collected records", folded, pruned)
        return {"telemetry_rows_folded": folded, "data_rows_pruned": pruned}

    def _run(self) -> None:
        next_retention = 0.0
        while not self._stop.wait(self.config.alert_eval_s):
            if not self.leader.is_leader():
                continue
            try:
                self.alerts.evaluate()
            except Exception:
                log.exception("alert evaluation failed")
            if time.monotonic() >= next_retention:
                next_retention = time.monotonic() + RETENTION_EVERY_S
                try:
                    self.apply_retention()
                except Exception:
                    log.exception("retention failed")
