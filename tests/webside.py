"""A web endpoint as an operator makes one: a real hub, a model registered from a file, a module built from
it, and an endpoint serving that module."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from hub import HubConfig, HubServer
from tests.pg import hub_db


@contextmanager
def model_endpoint(broker_url: str, data: Path, name: str, model: Path) -> Iterator[dict[str, Any]]:
    """A hub in ``data`` serving ``model`` (an ONNX file) as endpoint ``name``:
    {"url", "port", "key", "version", "admin"} (``admin``: an HTTP client with the admin token)."""
    server = HubServer(HubConfig(data, broker_url, admin_token=secrets.token_urlsafe(32),
                                 mqtt_client_id=f"hub-{secrets.token_hex(4)}", load_check_timeout_s=60,
                                 **hub_db(data))).start()
    try:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.admin_token}"},
                          timeout=120) as admin:
            admin.post("/api/v1/models", data={"name": name},
                       files=[("files", (model.name, model.read_bytes()))]).raise_for_status()
            m = admin.post("/api/v1/modules", json={"name": name, "models": [f"{name}:1"]})
            assert m.status_code == 200, m.text
            ep = admin.post("/api/v1/endpoints", json={"name": name, "module": f"{name}:{m.json()['version']}"})
            assert ep.status_code == 200, ep.text
            ep = ep.json()
            yield {"url": ep["url"], "port": ep["port"], "key": ep["keys"]["primary"], "version": m.json()["version"],
                   "admin": admin}
    finally:
        server.stop()
