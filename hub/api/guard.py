"""What every HTTP request passes before and after its route: a pure ASGI middleware.

- **Authenticated before read.** A request with a body to a bearer-token route is answered 401 (or
  403) from its headers alone, before one byte of the body is read: an unauthenticated 100 MB upload
  costs the hub nothing (it used to read it all, then refuse it).
- **Capped.** Each route has a body cap (the model upload a large one, enrolment and everything else
  small): a larger ``Content-Length`` is a 413 at once, and a chunked body is counted while it is
  read and cut off at the cap.
- **Audited.** A successful mutating request (POST, PUT, PATCH, DELETE) by a token holder whose route
  did not write an audit row itself gets one (``api.<route>``): every change has an actor and a time.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from anyio import to_thread

from hub.audit import record, request_scope
from hub.trust.tokens import ROLE_RANK, Principal, TokenRefused, authenticate_token

log = logging.getLogger("edgefleet.hub.api")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
API = "/api/v1"
MIB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """Body caps in bytes: ``upload`` for the model upload, ``default`` for the rest (docs/security.md)."""

    default: int = 4 * MIB  # the largest bounded JSON body (a 1,000-term target, 256 facts) fits with room
    upload: int = 8 << 30  # POST /api/v1/models: model files
    module: int = 64 * MIB  # POST /api/v1/modules: an entry script and a sample input
    enroll_batch: int = 16 * MIB  # POST /api/v1/enroll/batch: up to 1,000 devices' facts


# routes a body may reach without a bearer token: the enrolment token (in the body) is their credential
OPEN = frozenset({f"{API}/enroll", f"{API}/enroll/batch"})


def route_policy(method: str, path: str, limits: Limits) -> tuple[int, str | None]:
    """(body cap, role needed before the body is read; None: no bearer token) for one request."""
    path = path.rstrip("/") or "/"
    if path in OPEN:
        return (limits.enroll_batch if path.endswith("/batch") else limits.default), None
    if method == "POST" and path == f"{API}/models":
        return limits.upload, "operator"  # the one large body: a viewer may not send it either
    if method == "POST" and path == f"{API}/modules":
        return limits.module, "operator"
    return limits.default, ("viewer" if path.startswith(API + "/") else None)


class BodyTooLarge(Exception):
    pass


class Guard:
    """The middleware; ``db`` is looked up per request (``app.state.hub.db``), so it works from the first one."""

    def __init__(self, app: ASGIApp, limits: Limits | None = None) -> None:
        self.app, self.limits = app, limits or Limits()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, headers = scope["method"], _headers(scope)
        cap, role = route_policy(method, scope["path"], self.limits)
        length = headers.get("content-length")
        has_body = (length is not None and length != "0") or "chunked" in headers.get("transfer-encoding", "")
        state = scope.setdefault("state", {})
        over: list[bool] = []  # set when the body passed the cap while the route read it
        too_large = f"request body over this route's cap of {cap} bytes"
        if has_body:
            if role is not None:
                refusal = await self._authenticate(scope, headers.get("authorization"), role, state)
                if refusal is not None:
                    await _answer(send, *refusal)
                    return
            if length is not None and (not length.isdigit() or int(length) > cap):
                await _answer(send, 413, too_large if length.isdigit() else "invalid Content-Length")
                return
            receive = _capped(receive, cap, over)
        status: list[int] = []

        async def watch(message: Message) -> None:
            if over:  # the route's own answer to the cut-off body (FastAPI makes it a 400): say what happened
                if message["type"] == "http.response.start":
                    status.append(413)
                    await _answer(send, 413, too_large)
                return
            if message["type"] == "http.response.start":
                status.append(message["status"])
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                # before the answer is complete: a client that reads it next finds the record
                principal = state.get("principal")
                if method in MUTATING and status[0] < 400 and not recorded[0] and isinstance(principal, Principal):
                    await to_thread.run_sync(self._record, scope, principal, status[0])
            await send(message)

        with request_scope() as recorded:
            try:
                await self.app(scope, receive, watch)
            except BodyTooLarge:
                if status:
                    raise
                await _answer(send, 413, too_large)

    async def _authenticate(self, scope: Scope, header: str | None, role: str,
                            state: dict[str, Any]) -> tuple[int, str, dict[str, str]] | None:
        if not header or not header.lower().startswith("bearer "):
            return 401, "missing bearer token", {"WWW-Authenticate": "Bearer"}
        db = scope["app"].state.hub.db
        try:
            principal = await to_thread.run_sync(authenticate_token, db, header[7:].strip())
        except TokenRefused as exc:
            return 401, exc.detail, {"WWW-Authenticate": "Bearer"}
        if ROLE_RANK.get(principal.role, 0) < ROLE_RANK[role]:
            return 403, f"role {principal.role!r} may not do this: needs {role!r}", {}
        state["principal"] = principal
        return None

    @staticmethod
    def _record(scope: Scope, principal: Principal, status: int) -> None:
        route = scope.get("route")
        params = {k: str(v) for k, v in (scope.get("path_params") or {}).items()}
        name = getattr(route, "name", None) or scope["path"]
        try:
            record(scope["app"].state.hub.db, principal.name, f"api.{name}", next(iter(params.values()), ""),
                   method=scope["method"], path=scope["path"], status=status, token=principal.id, **params)
        except Exception:  # the change is made and answered; say loudly that its record is missing
            log.exception("could not audit %s %s by %s", scope["method"], scope["path"], principal.name)


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def _capped(receive: Receive, cap: int, over: list[bool]) -> Receive:
    seen = 0

    async def wrapped() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > cap:
                over.append(True)
                raise BodyTooLarge
        return message

    return wrapped


async def _answer(send: Send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    # Connection: close: the body the client may still be sending is never read
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
           (b"connection", b"close"), *((k.lower().encode(), v.encode()) for k, v in (headers or {}).items())]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
