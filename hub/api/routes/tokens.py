"""API tokens, enrolment tokens after issue, and the audit log's integrity check."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Path
from pydantic import BaseModel, Field

from hub import audit
from hub.api.deps import Principal, get_hub, require
from hub.bounds import Name
from hub.context import Hub
from hub.fleet.enrolment_tokens import list_enrolment_tokens, revoke_enrolment_token
from hub.trust.tokens import ID_CHARS, create_token, hash_token, list_tokens, revoke_token

router = APIRouter(tags=["tokens"])

Ref = Path(min_length=1, max_length=64, description="the token's name or its id (8+ hex digits)")


class TokenRequest(BaseModel):
    name: Name
    role: Literal["admin", "operator", "viewer"]
    expires_in: int | None = Field(default=None, gt=0, le=10 * 366 * 86_400, description="seconds; none: never")


@router.post("/tokens")
def new_token(body: TokenRequest, hub: Hub = Depends(get_hub),
              who: Principal = Depends(require("admin"))) -> dict[str, Any]:
    """Create an API token; the plain token is shown only in this answer (the hub keeps its hash)."""
    token = create_token(hub.db, body.name, body.role, expires_in=body.expires_in, actor=who.name)
    [view] = [t for t in list_tokens(hub.db) if t["id"] == hash_token(token)[:ID_CHARS]]
    return view | {"token": token}


@router.get("/whoami")
def whoami(who: Principal = Depends(require("viewer"))) -> dict[str, Any]:
    """The caller's token: its name and role (the console shows operators' actions only to operators)."""
    return {"name": who.name, "role": who.role, "id": who.id}


@router.get("/tokens", dependencies=[Depends(require("admin"))])
def tokens(all: bool = False, hub: Hub = Depends(get_hub)) -> list[dict[str, Any]]:
    """Tokens by id, name, role and state (never the token); revoked and expired ones too with ``all``."""
    return list_tokens(hub.db, include_inactive=all)


@router.delete("/tokens/{ref}")
def delete_token(ref: str = Ref, hub: Hub = Depends(get_hub),
                 who: Principal = Depends(require("admin"))) -> dict[str, Any]:
    """Revoke a token at once: its next request is a 401 saying when it was revoked."""
    return revoke_token(hub.db, ref, who.name)


@router.get("/enrollment-tokens", dependencies=[Depends(require("operator"))])
def enrolment_tokens(all: bool = False, hub: Hub = Depends(get_hub)) -> list[dict[str, Any]]:
    """Enrolment tokens by id (never the token): those that can still enrol, or every one with ``all``."""
    return list_enrolment_tokens(hub.db, include_inactive=all)


@router.delete("/enrollment-tokens/{ref}")
def delete_enrolment_token(ref: str = Ref, hub: Hub = Depends(get_hub),
                           who: Principal = Depends(require("operator"))) -> dict[str, Any]:
    """Revoke an enrolment token: no device enrols with it any more (devices enrolled with it stay)."""
    return revoke_enrolment_token(hub.db, ref, who.name)


@router.get("/audit/verify", dependencies=[Depends(require("viewer"))])
def verify_audit(hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    """Check the audit log's hash chain from its first row: ``ok``, the rows checked, the head (its id and hash, to
    keep elsewhere), and the first broken link (the row and why)."""
    return audit.verify(hub.db)
