"""Every FastAPI dependency the routes use, in one place: the running Hub, the caller's role, the device.

Routes import their ``Depends(...)`` callables from here only (tests/test_architecture.py checks it), so
how a request is authenticated or where a service lives is decided once.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import HTTPException, Request

from hub.batch.jobs import BatchJobs
from hub.context import Hub
from hub.endpoints.manager import EndpointManager
from hub.store import Database
from hub.trust.tokens import ROLE_RANK, Principal, TokenRefused, authenticate_token

__all__ = ["Principal", "authenticate", "current_device", "get_batch_jobs", "get_endpoints", "get_hub", "require", "running_endpoints"]


def get_hub(request: Request) -> Hub:
    """The running hub, built by the app's lifespan (hub/api/app.py)."""
    return request.app.state.hub


def get_batch_jobs(request: Request) -> BatchJobs:
    """Batch scoring jobs (hub/batch/jobs.py), made beside the hub by the app's lifespan."""
    return request.app.state.batch


def get_endpoints(request: Request) -> EndpointManager:
    """The web endpoints' manager, started beside the hub by the app's lifespan."""
    return request.app.state.endpoints


def running_endpoints(request: Request) -> EndpointManager | None:
    """The endpoints' manager if the app runs one (``/metrics`` reports it when there)."""
    return getattr(request.app.state, "endpoints", None)


def authenticate(db: Database, header: str | None) -> Principal:
    """The holder of a ``Bearer`` header's token; 401 saying whether it is missing, unknown, expired or revoked."""
    if not header or not header.lower().startswith("bearer "):
        raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
    try:
        return authenticate_token(db, header[7:].strip())
    except TokenRefused as exc:
        raise HTTPException(401, exc.detail, headers={"WWW-Authenticate": "Bearer"}) from None


def require(role: str) -> Callable[[Request], Principal]:
    """A valid token whose role is at least ``role`` (401 if absent/invalid, 403 if too weak).

    The principal is kept on the request: the guard (hub/api/guard.py) audits a mutation in its name.
    """
    needed = ROLE_RANK[role]

    def dependency(request: Request) -> Principal:
        principal = getattr(request.state, "principal", None)  # authenticated by the guard before the body
        if not isinstance(principal, Principal):
            principal = authenticate(get_hub(request).db, request.headers.get("authorization"))
            request.state.principal = principal
        if ROLE_RANK.get(principal.role, 0) < needed:
            raise HTTPException(403, f"role {principal.role!r} may not do this: needs {role!r}")
        return principal

    return dependency


def current_device(request: Request) -> str:
    """HTTP Basic: device id and its MQTT password from enrolment (401/403 with the reason otherwise)."""
    return get_hub(request).downloads.authenticate(request.headers.get("authorization"))
