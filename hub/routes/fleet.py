"""Enrolment and devices."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from hub.auth import require
from hub.context import Hub
from hub.routes import get_hub

router = APIRouter(tags=["fleet"])


class EnrollmentTokenRequest(BaseModel):
    count: int = Field(default=1, ge=1, le=10_000)
    labels: dict[str, str] = Field(default_factory=dict)
    expires_in: int = Field(default=3600, gt=0, description="seconds")


class EnrollRequest(BaseModel):
    token: str = Field(min_length=1, max_length=256)
    device_id: str | None = None
    facts: dict[str, str] = Field(default_factory=dict)


@router.post("/enrollment-tokens", dependencies=[Depends(require("operator"))])
def enrollment_tokens(body: EnrollmentTokenRequest, hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    """Single-use tokens; devices enrolled with one get its labels."""
    return hub.fleet.create_enrollment_tokens(body.count, body.labels, body.expires_in)


@router.post("/enroll")
def enroll(body: EnrollRequest, hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    """No bearer token: the enrolment token is the credential. Returns MQTT credentials and the root of trust."""
    return hub.fleet.enroll(body.token, body.device_id, body.facts)


@router.get("/devices", dependencies=[Depends(require("viewer"))])
def devices(hub: Hub = Depends(get_hub)) -> list[dict[str, Any]]:
    return hub.fleet.devices()


@router.get("/devices/{device_id}", dependencies=[Depends(require("viewer"))])
def device(device_id: str, hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    return hub.fleet.device(device_id)
