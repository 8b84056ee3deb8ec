"""Web endpoints: deploy a module as an HTTP scoring service, split traffic, rotate keys.

Scoring itself is served by each endpoint's own gateway process (its ``url``), not by the hub.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from hub import audit
from hub.api.deps import Principal, get_hub, require
from hub.api.deps import get_endpoints as manager
from hub.bounds import MAX_LIST, Finite, Name, NamePath
from hub.context import Hub
from hub.endpoints.manager import EndpointManager

router = APIRouter(prefix="/endpoints", tags=["endpoints"])


class EndpointRequest(BaseModel):
    name: Name
    module: str = Field(max_length=200, description='"module:version" or "module@alias"')
    replicas: int | None = Field(default=None, ge=1, le=64, description="worker processes per version")
    max_batch: int | None = Field(default=None, ge=1, le=4096, description="requests per batched model call")
    max_wait_ms: Finite | None = Field(default=None, ge=0, le=1000, description="how long a batch may wait to fill")
    traffic: Finite | None = Field(default=None, ge=0, le=100,
                                  description="add the module beside the current version(s) with this percentage; "
                                              "leave out to replace them (explicit update)")


class TrafficRequest(BaseModel):
    weights: dict[str, Finite] = Field(default_factory=dict, max_length=MAX_LIST,
                                       description='{"module:version": weight}')
    mirror: dict[str, Finite] = Field(default_factory=dict, max_length=MAX_LIST,
                                      description='{"module:version": share 0-1 mirrored}')


class KeyRequest(BaseModel):
    regenerate: str = Field(pattern="^(primary|secondary)$")


# the manager's calls block (starting processes, health checks): keep them off the event loop

@router.post("")
async def deploy(body: EndpointRequest, m: EndpointManager = Depends(manager), hub: Hub = Depends(get_hub),
                 who: Principal = Depends(require("operator"))) -> dict[str, Any]:
    """Create or update; returns once the new version passed its health check and takes traffic."""
    module, note = await run_in_threadpool(hub.aliases.module_ref, body.module)  # MODULE@ALIAS resolved now
    out = await run_in_threadpool(m.deploy, body.name, module, body.replicas, body.max_batch, body.max_wait_ms,
                                  body.traffic)
    await run_in_threadpool(audit.record, m.db, who.name, "endpoint.deployed", body.name, module=module,
                            replicas=body.replicas, traffic=body.traffic)
    return out | ({"requested": body.module, "resolved": note} if note else {})


@router.get("", dependencies=[Depends(require("viewer"))])
def list_endpoints(m: EndpointManager = Depends(manager)) -> list[dict[str, Any]]:
    return m.list()


@router.get("/{name}", dependencies=[Depends(require("viewer"))])
def get_endpoint(name: NamePath, m: EndpointManager = Depends(manager)) -> dict[str, Any]:
    return m.get(name)


@router.post("/{name}/traffic", dependencies=[Depends(require("operator"))])
async def set_traffic(name: NamePath, body: TrafficRequest, m: EndpointManager = Depends(manager)) -> dict[str, Any]:
    return await run_in_threadpool(m.set_traffic, name, body.weights, body.mirror)


class CanaryRequest(BaseModel):
    module: str = Field(max_length=200, description='the candidate "module:version"')
    steps: list[Finite] = Field(default=[5.0, 25.0, 50.0, 100.0], min_length=1, max_length=20,
                                description="traffic percentages, growing; 100 is appended if missing")
    interval_s: Finite = Field(default=60.0, gt=0, description="how long each step runs before it may pass")
    gates: dict[str, Finite | None] | None = Field(default=None, max_length=16,
                                                   description="max_error_rate, max_p95_increase")
    min_inferences: int = Field(default=20, ge=1, le=1_000_000, description="answers needed before a step is judged")


@router.post("/{name}/canary", dependencies=[Depends(require("operator"))])
async def start_canary(name: NamePath, body: CanaryRequest, m: EndpointManager = Depends(manager)) -> dict[str, Any]:
    """A canary that moves its own weight up ``steps`` while its gates pass, and to 0 when they fail."""
    return await run_in_threadpool(m.canaries.start, name, body.module, body.steps, body.interval_s, body.gates,
                                   body.min_inferences)


@router.get("/{name}/canary", dependencies=[Depends(require("viewer"))])
def canary_status(name: NamePath, m: EndpointManager = Depends(manager)) -> dict[str, Any]:
    return m.canaries.get(name)


@router.get("/{name}/keys", dependencies=[Depends(require("operator"))])
def get_keys(name: NamePath, m: EndpointManager = Depends(manager)) -> dict[str, str]:
    return m.keys(name)


@router.post("/{name}/keys", dependencies=[Depends(require("operator"))])
async def regenerate_key(name: NamePath, body: KeyRequest, m: EndpointManager = Depends(manager)) -> dict[str, str]:
    return await run_in_threadpool(m.regenerate, name, body.regenerate)


@router.delete("/{name}", dependencies=[Depends(require("operator"))])
async def delete_endpoint(name: NamePath, m: EndpointManager = Depends(manager)) -> dict[str, Any]:
    return await run_in_threadpool(m.delete, name)
