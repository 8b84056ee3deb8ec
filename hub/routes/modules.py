"""Modules (signed bundles) and bundle download over HTTP."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from hub.auth import require
from hub.bounds import MAX_LIST, FileName, Key, Name, NamePath, Version
from hub.context import Hub
from hub.routes import get_hub

router = APIRouter(tags=["modules"])


class ModuleRequest(BaseModel):
    name: Name
    models: list[Annotated[str, Field(max_length=200)]] = Field(
        min_length=1, max_length=MAX_LIST, description='"model:version" references; the first is the main model')
    runtime: str | None = None
    sample: dict[str, Any] | None = Field(default=None, description='{"inputs": {name: values}}, for health checks')
    collect_rate_ppm: int = Field(default=0, ge=0, le=1_000_000)
    entry: str | None = Field(default=None, description="text of a pre/post-processing (or python runtime) script")
    entry_name: FileName = Field(default="entry.py", description="file name of the entry script inside the bundle")
    resources: dict[Key, Any] | None = Field(default=None, max_length=MAX_LIST,
                                             description='hints, e.g. {"memory_mb": 256, "threads": 2}')


@router.post("/modules", dependencies=[Depends(require("operator"))])
def build_module(body: ModuleRequest, hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    """Build and sign version N+1 (or return the latest version if nothing changed)."""
    built = hub.modules.build(body.name, body.models, body.runtime, body.sample, body.collect_rate_ppm,
                              entry=body.entry, entry_name=body.entry_name, resources=body.resources)
    return {k: built[k] for k in ("name", "version", "digest", "size", "runtime")}


@router.get("/modules", dependencies=[Depends(require("viewer"))])
def list_modules(name: str | None = None, hub: Hub = Depends(get_hub)) -> list[dict[str, Any]]:
    return hub.modules.list(name)


@router.get("/modules/{name}/versions/{version}", dependencies=[Depends(require("viewer"))])
def get_module(name: NamePath, version: Version, hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    return hub.modules.get(name, version, with_envelope=True) | {"models": hub.modules.sources(name, version),
                                                                    "resources": hub.modules.resources(name, version)}


@router.get("/bundles/{digest}/release", dependencies=[Depends(require("viewer"))])
def bundle_release(digest: str, hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    """The release envelope (signed manifest) of a bundle."""
    return hub.modules.release(digest)


@router.get("/bundles/{digest}/files/{path:path}", dependencies=[Depends(require("viewer"))])
def bundle_file(digest: str, path: str, hub: Hub = Depends(get_hub)) -> FileResponse:
    return FileResponse(hub.modules.file_path(digest, path), media_type="application/octet-stream")
