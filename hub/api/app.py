"""The FastAPI application: routers under /api/v1, docs at /docs, the hub's lifecycle in the lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from hub.api.guard import Guard, Limits
from hub.api.routes import (
    admin,
    batch,
    deployments,
    device,
    endpoints,
    fleet,
    models,
    modules,
    monitoring,
    tokens,
    webhooks,
)
from hub.batch.jobs import BatchJobs
from hub.bounds import json_safe_errors
from hub.config import HubConfig
from hub.console import mount_console
from hub.context import Hub
from hub.endpoints.manager import EndpointManager
from hub.errors import HubError

API = "/api/v1"


def create_app(config: HubConfig) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # opening the database and creating keys is blocking work: keep it off the event loop
        hub = await run_in_threadpool(Hub, config)
        app.state.hub = hub
        app.state.endpoints = EndpointManager(hub)
        app.state.batch = BatchJobs(hub)
        hub.start()
        app.state.endpoints.start()
        try:
            yield
        finally:
            await run_in_threadpool(app.state.endpoints.stop)
            await run_in_threadpool(app.state.batch.stop)
            await run_in_threadpool(hub.stop)

    app = FastAPI(title="edgefleet hub", version="0.1.0", lifespan=lifespan,
                  docs_url=None, redoc_url=None)  # /docs is served from vendored files (hub/console): works offline

    @app.exception_handler(HubError)
    async def hub_error(request: Request, exc: HubError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes the input: a NaN there made the 422 a 500, a 10,000-entry map a huge answer
        return JSONResponse({"detail": json_safe_errors(exc.errors())}, status_code=422)

    for router in (admin.router, tokens.router, models.router, modules.router, fleet.router, device.router, deployments.router,
                   deployments.rollouts,
                   monitoring.router, webhooks.router, batch.router):
        app.include_router(router, prefix=API)
    app.include_router(endpoints.router, prefix=API)
    app.include_router(monitoring.ops)
    mount_console(app)
    # outermost but for Starlette's error handler: it sees a request before any route reads its body
    app.add_middleware(Guard, limits=Limits(default=config.max_body_bytes, upload=config.max_upload_bytes))
    return app
