"""HTTP routes, one small module per area; each reads the running Hub from ``request.app.state.hub``."""

from __future__ import annotations

from fastapi import Request

from hub.context import Hub


def get_hub(request: Request) -> Hub:
    return request.app.state.hub
