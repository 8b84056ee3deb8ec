"""The fleet console: a static single-page app (HTML, JS, CSS in static/) over the hub's /api/v1.

Served by the hub itself at ``/console/``; no build step, no CDN, so it works on an air-gapped network.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent / "static"
SWAGGER = Path(__file__).resolve().parent / "swagger"  # vendored Swagger UI (see its README)


def mount_console(app: FastAPI) -> None:
    """The console at /console/, and /docs from the vendored Swagger UI (create the app with docs_url=None)."""
    app.mount("/console", StaticFiles(directory=STATIC, html=True), name="console")
    app.mount("/_swagger", StaticFiles(directory=SWAGGER), name="swagger")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} API",
                                   swagger_js_url="/_swagger/swagger-ui-bundle.js",
                                   swagger_css_url="/_swagger/swagger-ui.css",
                                   swagger_favicon_url="/console/favicon.svg")

    @app.get("/", include_in_schema=False)
    def home() -> RedirectResponse:
        return RedirectResponse("/console/")
