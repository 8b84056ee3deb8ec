"""Event webhooks: subscriptions, deliveries and their state (hub/events/)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field

from hub.api.deps import Principal, get_hub, require
from hub.context import Hub
from hub.events.catalog import EVENTS

router = APIRouter(prefix="/webhooks", tags=["webhooks"])


class WebhookRequest(BaseModel):
    url: str = Field(description="http(s) URL that receives each event as a signed JSON POST")
    events: list[str] = Field(description=f"any of {', '.join(EVENTS)}, or '*' for all")
    secret: str | None = Field(default=None, description="shared secret for the HMAC-SHA256 signature (16+ "
                                                         "characters); left out, the hub makes one and returns it once")
    description: str = ""


@router.post("", status_code=201)
def add_webhook(body: WebhookRequest, hub: Hub = Depends(get_hub),
                who: Principal = Depends(require("admin"))) -> dict[str, Any]:
    """Subscribe a URL to events; the answer holds the secret (the only time the hub shows it)."""
    return hub.webhooks.add(body.url, body.events, body.secret, body.description, who.name)


@router.get("", dependencies=[Depends(require("operator"))])
def list_webhooks(hub: Hub = Depends(get_hub)) -> list[dict[str, Any]]:
    return hub.webhooks.list()


@router.get("/events", dependencies=[Depends(require("viewer"))])
def event_names() -> list[str]:
    """The events a webhook can subscribe to."""
    return list(EVENTS)


@router.get("/deliveries", dependencies=[Depends(require("operator"))])
def deliveries(webhook: int | None = None, state: str | None = None, event: str | None = None,
               event_id: str | None = None, limit: int = Query(default=100, ge=1, le=10_000),
               hub: Hub = Depends(get_hub)) -> list[dict[str, Any]]:
    """Newest first: state (pending, delivered, failed, cancelled), attempts, last HTTP status and error.
    ``webhook`` null: an alert rule's own URL."""
    return hub.webhooks.deliveries(webhook, state, event, event_id, limit)


@router.post("/deliveries/{delivery}/redeliver", dependencies=[Depends(require("operator"))])
def redeliver(delivery: int, hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    return hub.webhooks.redeliver(delivery)


@router.delete("/{hook}")
def delete_webhook(hook: int, hub: Hub = Depends(get_hub),
                   who: Principal = Depends(require("admin"))) -> dict[str, Any]:
    return hub.webhooks.delete(hook, who.name)


@router.post("/{hook}/ping", dependencies=[Depends(require("operator"))])
def ping_webhook(hook: int, hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    """Queue a signed ``ping`` event for one webhook (see its delivery with ``GET /webhooks/deliveries``)."""
    return hub.webhooks.ping(hook)
