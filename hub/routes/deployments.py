"""Deployments: a module version aimed at a set of devices."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from hub.auth import require
from hub.context import Hub
from hub.routes import get_hub

router = APIRouter(prefix="/deployments", tags=["deployments"])


class DeploymentRequest(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    module: str = Field(description='"module:version"')
    target: str = Field(default="*", description='"*", "id1,id2" or "key=value,key2!=value2"')
    priority: int = 0


@router.post("", dependencies=[Depends(require("operator"))])
def put_deployment(body: DeploymentRequest, hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    """Create or update; matching devices get a new signed desired state."""
    return hub.deployments.put(body.name, body.module, body.target, body.priority)


@router.get("", dependencies=[Depends(require("viewer"))])
def list_deployments(hub: Hub = Depends(get_hub)) -> list[dict[str, Any]]:
    return hub.deployments.list()


@router.get("/{name}", dependencies=[Depends(require("viewer"))])
def get_deployment(name: str, hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    return hub.deployments.get(name)


@router.delete("/{name}", dependencies=[Depends(require("operator"))])
def delete_deployment(name: str, hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    """Deactivate; devices drop the module unless another deployment provides it."""
    return hub.deployments.delete(name)
