"""Telemetry, fleet summary, health and Prometheus metrics."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, Field

from hub import audit
from hub.api.deps import Principal, get_hub, require, running_endpoints
from hub.bounds import Finite
from hub.context import Hub
from hub.endpoints.manager import EndpointManager
from hub.errors import Invalid
from hub.monitoring import abtest, export, metrics
from hub.monitoring.alerts import AlertRule
from hub.monitoring.timeseries import SeriesFilter, recent_points
from hub.store import StoreError

router = APIRouter(tags=["monitoring"])
ops = APIRouter(tags=["ops"])  # served at the root, without authentication


@router.get("/telemetry", dependencies=[Depends(require("viewer"))])
def telemetry(device: str | None = None, module: str | None = None, limit: int = Query(default=100, ge=1, le=10_000),
              hub: Hub = Depends(get_hub)) -> list[dict[str, Any]]:
    return recent_points(hub.db, SeriesFilter(device=device or None, module=module or None), limit)


@router.get("/fleet/summary", dependencies=[Depends(require("viewer"))])
def fleet_summary(hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    return hub.fleet.summary()


@ops.get("/healthz")
def healthz(hub: Hub = Depends(get_hub)) -> JSONResponse:
    """Readiness and liveness: 503 while the database does not answer. ``leader``: whether this replica leads."""
    body: dict[str, Any] = {"status": "ok", "mqtt_connected": hub.bridge.connected,
                            "leader": hub.leadership.is_leader(), "replica": hub.leadership.holder}
    try:
        hub.db.scalar("SELECT 1")
    except StoreError as exc:
        return JSONResponse({**body, "status": "database unavailable", "error": str(exc)[:200]}, status_code=503)
    return JSONResponse(body)


@ops.get("/metrics", response_class=PlainTextResponse)
def prometheus(hub: Hub = Depends(get_hub),
               endpoints: EndpointManager | None = Depends(running_endpoints)) -> PlainTextResponse:
    return PlainTextResponse(metrics.render(hub, endpoints),
                             media_type="text/plain; version=0.0.4")


# --- time series, drift, alerts, data export (docs/monitoring.md) --------------------------------


@router.get("/metrics/series", dependencies=[Depends(require("viewer"))])
def metrics_series(device: str | None = None, deployment: str | None = None, endpoint: str | None = None,
                   module: str | None = None, version: int | None = None, step: float = Query(default=60.0, gt=0),
                   since: float | None = None, until: float | None = None,
                   hub: Hub = Depends(get_hub)) -> list[dict[str, Any]]:
    """Counts, error rate and latency percentiles per ``step`` seconds, for a device, deployment (its own devices
    only), web endpoint or module version (devices and endpoints together unless one is named)."""
    if endpoint:
        if device:
            raise Invalid("give a device or an endpoint, not both")
        device = f"endpoint:{endpoint}"  # endpoints report as this pseudo-device (hub/endpoints/telemetry.py)
    devices = None
    if deployment:  # that deployment's devices only: not an endpoint or another deployment on the same version
        target = hub.monitor.reports.deployment_target(deployment)
        module, version, devices = target.module, target.version, target.devices
    end = until if until is not None else time.time()
    start = since if since is not None else end - 3600
    return hub.monitor.series.series(SeriesFilter(device, module, version, devices), step, start, end)


class LabelItem(BaseModel):
    sample: str = Field(max_length=200, description="'device/request-id' (the id the device's request carried),"
                                                    " 'device/seq/idx' (as data export shows it), or"
                                                    " 'endpoint:NAME/REQUEST-ID' (a web answer's x-request-id)")
    label: Any = Field(description="the true class or value; a list gives one per row of the record's batch")
    ts: Finite | None = None


class LabelsRequest(BaseModel):
    labels: list[LabelItem] = Field(max_length=10_000)


@router.post("/labels")
def add_labels(body: LabelsRequest, who: Principal = Depends(require("operator")),
               hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    """Ground truth for sampled predictions; accuracy per version follows (``GET /accuracy``, ``/metrics``)."""
    return hub.monitor.labels.add([i.model_dump() for i in body.labels], who.name)


@router.get("/accuracy", dependencies=[Depends(require("viewer"))])
def accuracy(module: str | None = None, step: float = Query(default=3600.0, gt=0), since: float | None = None,
             until: float | None = None, hub: Hub = Depends(get_hub)) -> list[dict[str, Any]]:
    """Per module version and per ``step`` seconds: labelled predictions, accuracy (classes), MAE (regression)."""
    end = until if until is not None else time.time()
    return hub.monitor.labels.series(module, step, since if since is not None else end - 86_400, end)


@router.get("/ab", dependencies=[Depends(require("viewer"))])
def ab_compare(a: str, b: str, metric: str = Query(default="accuracy", pattern="^(accuracy|success)$"),
               since: float | None = None, alpha: float = Query(default=0.05, gt=0, lt=1),
               hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    """Fleet A/B: deployments ``a`` and ``b`` (disjoint device groups) compared with always-valid intervals: look as
    often as you like; ``decided`` and ``winner`` once the difference's interval excludes 0."""
    start = since if since is not None else time.time() - 86_400
    q = hub.monitor.quality
    return abtest.compare(q.arm(a, metric, start), q.arm(b, metric, start), alpha) | {"metric": metric}


@router.get("/drift/{deployment}", dependencies=[Depends(require("viewer"))])
def drift_report(deployment: str, window: float = Query(default=3600.0, gt=0), threshold: float = 0.2,
                 until: float | None = None, hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    """Per-feature input drift (PSI, KS / chi-square) and prediction drift against the model's baseline."""
    reports = hub.monitor.reports
    return {"deployment": deployment,
            **reports.report(reports.deployment_target(deployment), window, until, threshold)}


@router.get("/drift/{deployment}/series", dependencies=[Depends(require("viewer"))])
def drift_series(deployment: str, window: float = Query(default=300.0, gt=0), points: int = Query(default=12, ge=1, le=200),
                 hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    """Plot-ready PSI per feature over consecutive windows."""
    reports = hub.monitor.reports
    return {"deployment": deployment, **reports.series(reports.deployment_target(deployment), window, points)}


@router.post("/alerts/rules", status_code=201)
def add_alert_rule(rule: AlertRule, principal: Principal = Depends(require("operator")),
                   hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    added = hub.monitor.alerts.add_rule(rule, principal.name)
    audit.record(hub.db, principal.name, "alert_rule.added", rule.name, kind=rule.kind, threshold=rule.threshold)
    return added


@router.get("/alerts/rules", dependencies=[Depends(require("viewer"))])
def alert_rules(hub: Hub = Depends(get_hub)) -> list[dict[str, Any]]:
    return hub.monitor.alerts.rules()


@router.delete("/alerts/rules/{name}", dependencies=[Depends(require("operator"))])
def delete_alert_rule(name: str, hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    hub.monitor.alerts.delete_rule(name)
    return {"deleted": name}


@router.get("/alerts/events", dependencies=[Depends(require("viewer"))])
def alert_events(rule: str | None = None, limit: int = Query(default=100, ge=1, le=10_000),
                 hub: Hub = Depends(get_hub)) -> list[dict[str, Any]]:
    return hub.monitor.alerts.events(rule, limit)


@router.get("/alerts/firing", dependencies=[Depends(require("viewer"))])
def alerts_firing(hub: Hub = Depends(get_hub)) -> list[dict[str, Any]]:
    return hub.monitor.alerts.firing()


@router.post("/alerts/evaluate", dependencies=[Depends(require("operator"))])
def alerts_evaluate(hub: Hub = Depends(get_hub)) -> list[dict[str, Any]]:
    """Evaluate every rule now (the hub also does so every ``alert_eval_s``); returns the events raised."""
    return hub.monitor.alerts.evaluate()


@router.post("/monitoring/retention", dependencies=[Depends(require("admin"))])
def retention(hub: Hub = Depends(get_hub)) -> dict[str, int]:
    return hub.monitor.apply_retention()


@router.get("/data/export", dependencies=[Depends(require("viewer"))])
def data_export(format: str = Query(default="jsonl", pattern="^(jsonl|csv)$"), deployment: str | None = None,
                endpoint: str | None = None, module: str | None = None, version: int | None = None,
                since: float | None = None, until: float | None = None,
                hub: Hub = Depends(get_hub)) -> StreamingResponse:
    """Collected inputs/predictions, streamed page by page (constant memory); total in ``X-Total-Count``."""
    f = export.ExportFilter(deployment, endpoint, module, version, since, until)
    total = export.count(hub.db, f)
    lines = export.jsonl_lines(export.pages(hub.db, f)) if format == "jsonl" else export.csv_lines(export.pages(hub.db, f))
    media = "application/x-ndjson" if format == "jsonl" else "text/csv"
    return StreamingResponse(lines, media_type=media, headers={"X-Total-Count": str(total)})
