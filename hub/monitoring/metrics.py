"""The hub's Prometheus ``/metrics``: fleet, MQTT bridge, ingest, rollout, alert and endpoint families."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from hub.context import Hub
from hub.monitoring.prom import Exposition, endpoint_families
from hub.trust.renewal import key_expiry

if TYPE_CHECKING:
    from hub.endpoints.manager import EndpointManager
from protocol.topics import DEVICE_TO_HUB

ACCURACY_WINDOW_S = 3600.0


def render(hub: Hub, endpoints: EndpointManager | None = None) -> str:
    out = Exposition()
    _bridge(hub, out)
    _rollouts(hub, out)
    _alerts(hub, out)
    _trust(hub, out)
    _quality(hub, out)
    if endpoints is not None:
        _endpoints(endpoints, out)
    return out.render()


def _bridge(hub: Hub, out: Exposition) -> None:
    bridge = hub.bridge
    # every device channel appears, at zero too, so rate() works from the first scrape
    channels = sorted({ch.value for ch in DEVICE_TO_HUB} | set(bridge.received) | set(bridge.rejected))
    out.family("edgefleet_hub_messages_received_total", "counter", "MQTT messages received from devices.",
               [({"channel": c}, bridge.received.get(c, 0)) for c in channels])
    out.family("edgefleet_hub_messages_rejected_total", "counter", "MQTT messages refused (invalid, unknown device, ...).",
               [({"channel": c}, bridge.rejected.get(c, 0)) for c in channels])
    total = hub.db.scalar("SELECT count(*) FROM devices") or 0
    online = hub.db.scalar("SELECT count(*) FROM devices WHERE online = 1") or 0
    out.family("edgefleet_hub_devices", "gauge", "Enrolled devices by connection state.",
               [({"state": "online"}, online), ({"state": "offline"}, total - online)])
    out.family("edgefleet_hub_telemetry_rows_total", "counter", "Telemetry points stored (replays not counted).",
               [({}, bridge.telemetry_rows)])
    out.family("edgefleet_hub_ingest_records_failed_total", "counter",
               "Valid telemetry/data records the database refused (each alone; the rest of its batch was stored).",
               [({}, bridge.writer.failed)])
    out.family("edgefleet_hub_blob_bytes_sent_total", "counter", "Bundle bytes published over MQTT.",
               [({}, bridge.blob_bytes_sent)])
    out.family("edgefleet_hub_blob_requests_limited_total", "counter",
               "Bundle-part requests cut short by the device's byte budget (hub/mqtt/ratelimit.py).",
               [({}, bridge.budgets.limited)])
    out.family("edgefleet_hub_blob_bytes_refused_total", "counter",
               "Bundle bytes devices asked for beyond their budget (not published then).",
               [({}, bridge.budgets.refused_bytes)])
    downloads = hub.downloads
    out.family("edgefleet_hub_device_http_bytes_sent_total", "counter", "Bundle chunk bytes devices downloaded over HTTP.",
               [({}, downloads.bytes_sent)])
    out.family("edgefleet_hub_device_http_chunks_total", "counter", "Chunks (or their remainders) served over HTTP.",
               [({}, downloads.chunks_served)])
    out.family("edgefleet_hub_device_http_refused_total", "counter", "Device HTTP requests refused, by reason.",
               [({"reason": r}, downloads.refused.get(r, 0)) for r in sorted(
                   {"no_credentials", "unknown_device", "wrong_password", "decommissioned", "not_found"}
                   | set(downloads.refused))])
    out.family("edgefleet_hub_mqtt_connected", "gauge", "1 while the hub is connected and subscribed.",
               [({}, 1 if bridge.connected else 0)])
    out.family("edgefleet_hub_leader", "gauge", "1 while this hub is the leader of its replicas (docs/scaling.md).",
               [({}, 1 if hub.leadership.is_leader() else 0)])
    if hub.config.ingest_workers or hub.clustered:  # workers (here or anywhere) save their counters every second
        workers = hub.db.query("SELECT idx, received, rejected FROM ingest_workers ORDER BY idx")
        out.family("edgefleet_hub_ingest_worker_messages_total", "counter", "Messages handled by each ingest worker.",
                   [({"worker": str(w["idx"]), "outcome": o}, w[o]) for w in workers for o in ("received", "rejected")])


def _rollouts(hub: Hub, out: Exposition) -> None:
    phases = hub.db.query("SELECT state, count(*) AS n FROM rollouts GROUP BY state ORDER BY state")
    out.family("edgefleet_hub_rollouts", "gauge", "Rollouts by phase (all time; terminal phases included).",
               [({"phase": r["state"]}, r["n"]) for r in phases])
    samples: list[tuple[dict[str, str], float]] = []
    for d in hub.db.query("SELECT DISTINCT deployment FROM rollouts ORDER BY deployment"):
        status = hub.rollouts.status(d["deployment"])  # the latest rollout of the deployment
        samples.extend(({"deployment": d["deployment"], "state": state}, n)
                       for state, n in sorted(status["counts"].items()))
    out.family("edgefleet_hub_rollout_devices", "gauge",
               "Devices of each deployment's latest rollout by state (pending, running, failed, ...).", samples)


def _quality(hub: Hub, out: Exposition) -> None:
    totals = hub.monitor.labels.totals(time.time() - ACCURACY_WINDOW_S)
    out.family("edgefleet_hub_model_accuracy", "gauge",
               "Share of labelled predictions right, per module version, over the last hour (ground truth).",
               [({"module": t["module"], "version": str(t["version"])}, t["accuracy"]) for t in totals
                if t["accuracy"] is not None])
    out.family("edgefleet_hub_model_mae", "gauge", "Mean absolute error of labelled regression predictions, last hour.",
               [({"module": t["module"], "version": str(t["version"])}, t["mae"]) for t in totals
                if t["mae"] is not None])
    out.family("edgefleet_hub_labelled_predictions", "gauge", "Labelled predictions per module version, last hour.",
               [({"module": t["module"], "version": str(t["version"])}, t["labelled"]) for t in totals])


def _alerts(hub: Hub, out: Exposition) -> None:
    firing = hub.db.query("SELECT rule, count(*) AS n FROM alert_state WHERE firing = 1 GROUP BY rule ORDER BY rule")
    out.family("edgefleet_hub_alerts_firing", "gauge", "Alert keys currently firing, per rule.",
               [({"rule": r["rule"]}, r["n"]) for r in firing])
    # each delivery row is delivered by its last attempt at most (a redelivery is a new row): the counts only grow
    hooks = hub.db.one("SELECT coalesce(sum(CASE WHEN state = 'delivered' THEN 1 ELSE 0 END), 0) AS ok, "
                       "coalesce(sum(attempts), 0) AS tried FROM webhook_deliveries") or {"ok": 0, "tried": 0}
    out.family("edgefleet_hub_webhook_attempts_total", "counter",
               "Webhook delivery attempts (events and alert rules) by outcome.",
               [({"outcome": "delivered"}, hooks["ok"]), ({"outcome": "failed"}, hooks["tried"] - hooks["ok"])])


def _trust(hub: Hub, out: Exposition) -> None:
    """Seconds until each role's earliest signature expires (negative: expired), and whether the hub can renew it."""
    expiry = key_expiry(hub)
    out.family("edgefleet_key_expiry_seconds", "gauge",
               "Seconds until the earliest expiry of what each role signs (root: the root itself); negative: expired.",
               [({"role": r}, round(v)) for r, v in sorted(expiry.items())])
    out.family("edgefleet_key_held", "gauge", "1 when the hub holds the role's key and renews its signatures itself.",
               [({"role": r}, 1 if hub.keys.holds(r) else 0) for r in ("root", "release", "director")])


def _endpoints(endpoints: EndpointManager, out: Exposition) -> None:
    """Cloud endpoints: each gateway process keeps its own counters; ask each one (127.0.0.1, a few ms)."""
    statuses = []
    for name, gw in sorted(endpoints.gateways.items()):
        status = gw.status() if gw.alive else {"error": "gateway not running"}
        statuses.append((name, None if "error" in status else status))
    endpoint_families(out, statuses)
