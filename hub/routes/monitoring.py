"""Telemetry, fleet summary, health and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import PlainTextResponse

from hub import metrics
from hub.auth import require
from hub.context import Hub
from hub.routes import get_hub

router = APIRouter(tags=["monitoring"])
ops = APIRouter(tags=["ops"])  # served at the root, without authentication


@router.get("/telemetry", dependencies=[Depends(require("viewer"))])
def telemetry(device: str | None = None, module: str | None = None, limit: int = Query(default=100, ge=1, le=10_000),
              hub: Hub = Depends(get_hub)) -> list[dict[str, Any]]:
    sql, params = "SELECT * FROM telemetry WHERE 1=1", []
    if device:
        sql += " AND device = ?"
        params.append(device)
    if module:
        sql += " AND module = ?"
        params.append(module)
    return hub.db.query(sql + " ORDER BY ts DESC, seq DESC LIMIT ?", [*params, limit])


@router.get("/fleet/summary", dependencies=[Depends(require("viewer"))])
def fleet_summary(hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    return hub.fleet.summary()


@ops.get("/healthz")
def healthz(hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    return {"status": "ok", "mqtt_connected": hub.bridge.connected}


@ops.get("/metrics", response_class=PlainTextResponse)
def prometheus(hub: Hub = Depends(get_hub)) -> PlainTextResponse:
    return PlainTextResponse(metrics.render(hub), media_type="text/plain; version=0.0.4")
