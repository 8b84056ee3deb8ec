"""Enrolment and devices."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field

from hub import audit
from hub.api.deps import Principal, get_hub, require
from hub.bounds import MAX_LABELS, Facts, Key, Labels, NamePath, Value
from hub.context import Hub
from hub.fleet.device_query import STATUSES, DeviceFilter
from hub.fleet.devices import MAX_BATCH, MAX_TOKEN_USES

router = APIRouter(tags=["fleet"])
DEFAULT_PAGE, MAX_PAGE = 50, 1000  # devices per page of GET /devices


# device ids are checked (and explained) by the fleet service: the name rule plus the reserved prefix
DeviceId = Annotated[str, Field(min_length=1, max_length=256)]


class EnrollmentTokenRequest(BaseModel):
    count: int = Field(default=1, ge=1, le=10_000)
    labels: Labels = Field(default_factory=dict)
    expires_in: int = Field(default=3600, gt=0, le=10 * 366 * 86_400, description="seconds")
    uses: int = Field(default=1, ge=1, le=MAX_TOKEN_USES, description="enrolments per token (>1: a group token)")


class EnrollRequest(BaseModel):
    token: str = Field(min_length=1, max_length=256)
    device_id: DeviceId | None = None
    facts: Facts = Field(default_factory=dict)


class BatchDevice(BaseModel):
    device_id: DeviceId | None = None
    facts: Facts = Field(default_factory=dict)


class EnrollBatchRequest(BaseModel):
    token: str = Field(min_length=1, max_length=256)
    devices: list[BatchDevice] = Field(min_length=1, max_length=MAX_BATCH)


@router.post("/enrollment-tokens")
def enrollment_tokens(body: EnrollmentTokenRequest, hub: Hub = Depends(get_hub),
                      who: Principal = Depends(require("operator"))) -> dict[str, Any]:
    """Enrolment tokens (single-use unless ``uses`` says more); devices enrolled with one get its labels."""
    return hub.fleet.create_enrollment_tokens(body.count, body.labels, body.expires_in, body.uses, actor=who.name)


@router.post("/enroll")
def enroll(body: EnrollRequest, hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    """No bearer token: the enrolment token is the credential. Returns MQTT credentials and the root of trust."""
    return hub.fleet.enroll(body.token, body.device_id, body.facts)


@router.post("/enroll/batch")
def enroll_batch(body: EnrollBatchRequest, hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    """Several devices on one token, one use each, all or none: ``devices`` with each one's credentials."""
    return hub.fleet.enroll_many(body.token, [(d.device_id, d.facts) for d in body.devices])


@router.get("/devices", dependencies=[Depends(require("viewer"))])
def devices(q: str = Query(default="", max_length=200, description="part of the id, a label, or a module name's start"),
            status: str = Query(default="", description=f"one of {', '.join(STATUSES)}"),
            label: str = Query(default="", max_length=1000, description="label conditions 'k=v,k2!=v2'"),
            deployment: str = Query(default="", max_length=200, description="devices given a module by it"),
            limit: int | None = Query(default=None, ge=1, le=MAX_PAGE, description="page size: answer one page"),
            cursor: str | None = Query(default=None, max_length=256, description="next_cursor of the previous page"),
            hub: Hub = Depends(get_hub)) -> list[dict[str, Any]] | dict[str, Any]:
    """Devices ordered by id, filtered. Without ``limit`` or ``cursor``: a list of every match. With them: one page
    ``{items, total, limit, next_cursor, counts}`` (``counts``: matches per status, ignoring ``status``)."""
    f = DeviceFilter(q.strip(), status, label.strip(), deployment.strip())
    if limit is None and cursor is None:
        return hub.fleet.devices(f)
    return hub.fleet.page(f, limit or DEFAULT_PAGE, cursor or None)


@router.get("/devices/{device_id}", dependencies=[Depends(require("viewer"))])
def device(device_id: NamePath, hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    return hub.fleet.device(device_id)


class LabelsPatch(BaseModel):
    labels: dict[Key, Value | None] = Field(default_factory=dict, max_length=MAX_LABELS,
                                           description="value sets the label, null removes it")
    unset: list[Key] = Field(default_factory=list, max_length=MAX_LABELS)


@router.patch("/devices/{device_id}")
def patch_device(device_id: NamePath, body: LabelsPatch, hub: Hub = Depends(get_hub),
                 who: Principal = Depends(require("operator"))) -> dict[str, Any]:
    """Set or remove labels; deployments that select by label follow at once."""
    set_ = {k: v for k, v in body.labels.items() if v is not None}
    unset = [*body.unset, *(k for k, v in body.labels.items() if v is None)]
    return hub.fleet.set_labels(device_id, set_, unset, who.name)


@router.delete("/devices/{device_id}")
def delete_device(device_id: NamePath, hub: Hub = Depends(get_hub),
                  who: Principal = Depends(require("operator"))) -> dict[str, Any]:
    """Decommission: forget the device and revoke its broker credentials at once (under isolation)."""
    return hub.fleet.decommission(device_id, who.name)


@router.post("/devices/{device_id}/decommission")
def decommission_device(device_id: NamePath, hub: Hub = Depends(get_hub),
                        who: Principal = Depends(require("operator"))) -> dict[str, Any]:
    return hub.fleet.decommission(device_id, who.name)


@router.get("/audit", dependencies=[Depends(require("viewer"))])
def audit_log(subject: str | None = None, action: str | None = None, since_id: int = 0,
              limit: int = Query(default=200, ge=1, le=10_000), hub: Hub = Depends(get_hub)) -> list[dict[str, Any]]:
    """Who did what, when: deployments, rollout transitions (actor ``controller``), device changes. Newest first."""
    return audit.events(hub.db, subject, action, limit, since_id)
