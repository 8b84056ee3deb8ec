"""The root of trust and the hub's keys."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, Field

from hub import audit
from hub.api.deps import Principal, get_hub, require
from hub.context import Hub
from hub.errors import NotFound
from hub.trust.renewal import trust_status
from hub.trust.root_admin import prepare_rotation, publish_root, rotate_key
from hub.trust.tls import fingerprint, split_pem
from protocol.encoding import canonical_json, sha256_hex

router = APIRouter(tags=["admin"])


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
    prepare: bool = Field(default=False, description="return root version N+1 unsigned, to sign elsewhere")


@router.get("/keys", dependencies=[Depends(require("viewer"))])
def keys_status(hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    """Which roles the hub holds, seconds until each role's signatures expire, and problems to act on; the
    fingerprints device operators check at enrolment (``agent enroll --root-sha256 / --ca-sha256``)."""
    ca = hub.config.device_ca_pem()
    return trust_status(hub) | {"root_sha256": sha256_hex(canonical_json(hub.keys.root_envelope)),
                                "ca_sha256": [fingerprint(c) for c in split_pem(ca)] if ca else []}


@router.get("/ca", response_class=PlainTextResponse)
def tls_ca(hub: Hub = Depends(get_hub)) -> PlainTextResponse:
    """The CAs devices pin for TLS to the hub and its broker (PEM), without a token: public, and fetched before a
    device can check the hub's certificate (it compares the fingerprint it was given; docs/security.md)."""
    pem = hub.config.device_ca_pem()
    if pem is None:
        raise NotFound("the hub pins no CA: its certificates chain to the system's trusted CAs")
    return PlainTextResponse(pem, media_type="application/x-pem-file")


@router.post("/keys/rotate")
def rotate(body: RotateRequest, hub: Hub = Depends(get_hub), who: Principal = Depends(require("admin"))) -> dict[str, Any]:
    """New key for ``role``; root version N+1 signed by the old and new root keys; the old key is revoked.

    Every retained document the new root would refuse is then re-signed (releases, release policy,
    desired states). With ``prepare`` (the root key is offline) nothing changes yet: the answer holds
    root version N+1 unsigned (a new release/director key waits on the hub), for ``keys sign-root``
    and then ``POST /api/v1/roots``.
    """
    if body.prepare:
        envelope = prepare_rotation(hub.keys, body.role)
        audit.record(hub.db, who.name, "keys.rotation_prepared", body.role, root_version=envelope["signed"]["version"])
        return {"role": body.role, "root_version": envelope["signed"]["version"], "root": envelope}
    result = rotate_key(hub.keys, body.role)
    audit.record(hub.db, who.name, "keys.rotated", body.role, keyid=result["keyid"], revoked=result["revoked"],
                 root_version=result["root_version"])
    return result | hub.after_root_change()


@router.post("/roots")
def publish(envelope: dict[str, Any], hub: Hub = Depends(get_hub),
            who: Principal = Depends(require("admin"))) -> dict[str, Any]:
    """Publish root version N+1 signed elsewhere (m-of-n offline root keys), after the checks a device makes:
    a threshold of the current root's root keys and of its own, version N+1, not expired."""
    result = publish_root(hub.keys, envelope)
    audit.record(hub.db, who.name, "root.published", str(result["root_version"]), committed=result["committed"],
                 retired=result["retired"])
    return result | hub.after_root_change()
