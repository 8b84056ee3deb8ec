"""API tokens and the root of trust."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from hub.api.deps import get_hub, require
from hub.context import Hub
from hub.errors import NotFound
from hub.trust.keys import rotate_key
from hub.trust.roots_publish import publish_roots
from hub.trust.tokens import create_token

router = APIRouter(tags=["admin"])


class TokenRequest(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    role: Literal["admin", "operator", "viewer"]


@router.post("/tokens", dependencies=[Depends(require("admin"))])
def new_token(body: TokenRequest, hub: Hub = Depends(get_hub)) -> dict[str, str]:
    """Create an API token; the plain token is shown only in this answer."""
    return {"token": create_token(hub.db, body.name, body.role), "role": body.role, "name": body.name}


@router.get("/root", dependencies=[Depends(require("viewer"))])
def root(hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    """The signed root document devices pin at enrolment."""
    return hub.keys.root_envelope


@router.get("/roots/{version}", dependencies=[Depends(require("viewer"))])
def root_version(version: int, hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    """Root version ``version``: a verifier pinned to an older root walks these one by one."""
    envelope = hub.keys.root_version(version)
    if envelope is None:
        raise NotFound(f"no root version {version} (current: {hub.keys.root.version})")
    return envelope


class RotateRequest(BaseModel):
    role: Literal["root", "release", "director"]


@router.post("/keys/rotate", dependencies=[Depends(require("admin"))])
def rotate(body: RotateRequest, hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    """New key for ``role``; root version N+1 signed by the old and new root keys; the old key is revoked.

    After a release-key rotation every stored release is re-signed with the new key
    (bundle digests do not change); new desired states are signed with the new director key.
    """
    result = rotate_key(hub.keys, body.role)
    result["resigned_releases"] = hub.modules.resign() if body.role == "release" else 0
    publish_roots(hub.bridge.publish, hub.config.data_dir / "keys")  # devices learn the new root now
    return result
