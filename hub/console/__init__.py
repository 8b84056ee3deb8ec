"""The fleet console: a static single-page app (HTML, JS, CSS in static/) over the hub's /api/v1.

Served by the hub itself at ``/console/``; no build step, no CDN, so it works on an air-gapped network.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent / "static"


def mount_console(app: FastAPI) -> None:
    app.mount("/console", StaticFiles(directory=STATIC, html=True), name="console")

    @app.get("/", include_in_schema=False)
    def home() -> RedirectResponse:
        return RedirectResponse("/console/")
