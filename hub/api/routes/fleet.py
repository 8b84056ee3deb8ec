"""Enrolment and devices."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from hub import audit
from hub.api.deps import Principal, get_hub, require
from hub.bounds import MAX_LABELS, Facts, Key, Labels, NamePath, Value
from hub.context import Hub
from hub.fleet.device_query import STATUSES, DeviceFilter
from hub.fleet.devices import MAX_BATCH, MAX_TOKEN_USES
from hub.rollout.offline import plan_package, stream_package

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
            selector: str = Query(default="", max_length=10_000, description="a deployment target: '*', ids or k=v"),
            limit: int | None = Query(default=None, ge=1, le=MAX_PAGE, description="page size: answer one page"),
            cursor: str | None = Query(default=None, max_length=256, description="next_cursor of the previous page"),
            hub: Hub = Depends(get_hub)) -> list[dict[str, Any]] | dict[str, Any]:
    """Devices ordered by id, filtered. Without ``limit`` or ``cursor``: a list of every match. With them: one page
    ``{items, total, limit, next_cursor, counts}`` (``counts``: matches per status, ignoring ``status``)."""
    f = DeviceFilter(q.strip(), status, label.strip(), deployment.strip(), selector.strip())
    if limit is None and cursor is None:
        return hub.fleet.devices(f)
    return hub.fleet.page(f, limit or DEFAULT_PAGE, cursor or None)


class BulkLabels(BaseModel):
    selector: str = Field(min_length=1, max_length=10_000, description="'*', device ids or k=v,k2!=v2")
    status: list[str] = Field(default_factory=list, max_length=len(STATUSES), description="any of these")
    labels: dict[Key, Value | None] = Field(default_factory=dict, max_length=MAX_LABELS,
                                           description="value sets the label, null removes it")


@router.post("/devices/labels")
def label_devices(body: BulkLabels, hub: Hub = Depends(get_hub),
                  who: Principal = Depends(require("operator"))) -> dict[str, Any]:
    """Set or remove labels on every device the selector (and status) matches; deployments follow at once."""
    set_ = {k: v for k, v in body.labels.items() if v is not None}
    unset = [k for k, v in body.labels.items() if v is None]
    return hub.fleet.label_many([DeviceFilter(status=s, selector=body.selector) for s in body.status or [""]],
                                 set_, unset, who.name)


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


class CommandRequest(BaseModel):
    name: Literal["logs", "support_bundle", "restart_module"]
    args: dict[Key, Value | int | None] = Field(default_factory=dict, max_length=16)
    ttl_s: int = Field(default=600, ge=1, le=3600, description="the device refuses it after this")


@router.post("/devices/{device_id}/commands")
def device_command(device_id: NamePath, body: CommandRequest, hub: Hub = Depends(get_hub),
                   who: Principal = Depends(require("operator"))) -> dict[str, Any]:
    """Send a signed diagnostic command (logs, support_bundle, restart_module); poll its id for the result."""
    return hub.commands.send(device_id, body.name, body.args, who.name, body.ttl_s)


@router.get("/devices/{device_id}/commands", dependencies=[Depends(require("operator"))])
def device_commands(device_id: NamePath, hub: Hub = Depends(get_hub),
                    limit: int = Query(default=50, ge=1, le=1000, description="the newest N")) -> list[dict[str, Any]]:
    return hub.commands.list(device_id, limit)


@router.get("/commands/{command_id}", dependencies=[Depends(require("operator"))])
def command(command_id: Annotated[str, Field(max_length=64)], hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    """A command's state (sent, done, failed, expired) and the device's result."""
    return hub.commands.get(command_id)


@router.get("/audit", dependencies=[Depends(require("viewer"))])
def audit_log(subject: str | None = None, action: str | None = None, since_id: int = 0,
              limit: int = Query(default=200, ge=1, le=10_000), hub: Hub = Depends(get_hub)) -> list[dict[str, Any]]:
    """Who did what, when: deployments, rollout transitions (actor ``controller``), device changes. Newest first."""
    return audit.events(hub.db, subject, action, limit, since_id)


class OfflinePackageRequest(BaseModel):
    deployment: Annotated[str, Field(min_length=1, max_length=256)]
    device: DeviceId


@router.post("/offline-packages", response_class=StreamingResponse,
             responses={200: {"content": {"application/x-tar": {}}}})
def offline_package(body: OfflinePackageRequest, hub: Hub = Depends(get_hub),
                    who: Principal = Depends(require("operator"))) -> StreamingResponse:
    """An offline package (tar) for one device of a deployment: its desired state, signed afresh as the director
    publishes it, every root version, the releases and chunks of its bundles (docs/protocol.md#offline-packages)."""
    plan = plan_package(hub.db, hub.director, hub.keys.keys_dir or hub.config.data_dir / "keys", body.deployment,
                        body.device)
    audit.record(hub.db, who.name, "device.offline_package", body.device, deployment=body.deployment,
                 revision=plan.index.revision, bundles=plan.index.releases, bytes=plan.index.bytes)
    name = f"{body.device}-r{plan.index.revision}.tar"
    return StreamingResponse(stream_package(plan, hub.store), media_type="application/x-tar",
                             headers={"Content-Disposition": f'attachment; filename="{name}"',
                                      "X-Edgefleet-Revision": str(plan.index.revision)})
