"""API tokens and the root of trust."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from hub.auth import create_token, require
from hub.context import Hub
from hub.routes import get_hub

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
