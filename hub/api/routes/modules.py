"""Modules (signed bundles) and bundle download over HTTP."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from hub import audit
from hub.api.deps import Principal, get_hub, require
from hub.bounds import MAX_LIST, FileName, Key, Name, NamePath, Version
from hub.context import Hub

router = APIRouter(tags=["modules"])


class ModuleRequest(BaseModel):
    name: Name
    models: list[Annotated[str, Field(max_length=200)]] = Field(
        min_length=1, max_length=MAX_LIST,
        description='"model:version" or "model@alias" references; the first is the main model')
    runtime: str | None = None
    sample: dict[str, Any] | None = Field(default=None, description='{"inputs": {name: values}}, for health checks')
    collect_rate_ppm: int = Field(default=0, ge=0, le=1_000_000)
    entry: str | None = Field(default=None, description="text of a pre/post-processing (or python runtime) script")
    entry_name: FileName = Field(default="entry.py", description="file name of the entry script inside the bundle")
    resources: dict[Key, Any] | None = Field(default=None, max_length=MAX_LIST,
                                             description='hints, e.g. {"memory_mb": 256, "threads": 2}')


@router.post("/modules")
def build_module(body: ModuleRequest, hub: Hub = Depends(get_hub),
                 who: Principal = Depends(require("operator"))) -> dict[str, Any]:
    """Build and sign version N+1 (or return the latest version if nothing changed). When the release key is held
    elsewhere the version is stored unsigned (``signed: false``) until a signed release is attached."""
    built = hub.modules.build(body.name, hub.aliases.model_refs(body.models), body.runtime, body.sample,
                              body.collect_rate_ppm,
                              entry=body.entry, entry_name=body.entry_name, resources=body.resources)
    audit.record(hub.db, who.name, "module.built", f"{built['name']}:{built['version']}", digest=built["digest"],
                 models=body.models, signed=built["signed"])
    return {k: built[k] for k in ("name", "version", "digest", "size", "runtime", "signed")} | {
        "models": hub.modules.sources(built["name"], built["version"])}


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


@router.post("/modules/{name}/versions/{version}/release")
def attach_release(name: str, version: int, envelope: dict[str, Any], hub: Hub = Depends(get_hub),
                   who: Principal = Depends(require("operator"))) -> dict[str, Any]:
    """Attach a release envelope signed outside the hub (CI holding the release key): checked as a device would."""
    attached = hub.modules.attach_release(name, version, envelope)
    audit.record(hub.db, who.name, "module.release_attached", f"{name}:{version}",
                 keyids=sorted({str(s.get("keyid", "")) for s in envelope.get("signatures", []) if isinstance(s, dict)}))
    return attached


class RevokeRequest(BaseModel):
    and_older: bool = Field(default=False, description="also every older version (sets the module's minimum)")


@router.post("/modules/{name}/versions/{version}/revoke")
def revoke_module(name: str, version: int, body: RevokeRequest,
                  who: Principal = Depends(require("admin")), hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    """Revoke a module version: a new release-policy version signed with the hub's release key, carried to every
    device in its next desired state; devices refuse to install it, and the hub to deploy it."""
    return hub.policies.revoke(name, version, body.and_older, actor=who.name)


@router.get("/release-policy", dependencies=[Depends(require("viewer"))])
def release_policy(hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    """The current signed release policy (``{"signed": null}`` before the first revocation)."""
    return hub.policies.envelope() or {"signed": None, "signatures": []}


@router.get("/modules/{name}/versions/{version}/revoke-draft", dependencies=[Depends(require("viewer"))])
def revoke_draft(name: str, version: int, and_older: bool = False, hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    """The next release-policy version revoking ``name:version``, unsigned: to sign where the release key is."""
    return {"signed": hub.policies.draft_revoke(name, version, and_older), "signatures": []}


@router.post("/release-policy")
def publish_release_policy(envelope: dict[str, Any], who: Principal = Depends(require("admin")),
                           hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    """Publish a release-policy version signed outside the hub (the release key held by CI)."""
    return hub.policies.publish(envelope, actor=who.name)
