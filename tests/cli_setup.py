"""Set-up for CLI tests through the hub's API (fast), so each test runs the CLI only for what it checks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx

from edgefleet.client import HubClient
from modules.examples import write_logreg_onnx, write_sample

RAW_TIME = re.compile(r"\b1[5-9]\d{8}(\.\d+)?\b")  # a unix time as a number


def built_module(server, tmp_path: Path, tags: dict[str, str] | None = None, description: str = "") -> str:
    """Model ``lr`` version 1 (with ``tags`` and ``description``) built into the signed module ``lrmod:1``."""
    with HubClient(server.url, server.admin_token) as api:
        api.register_model("lr", [write_logreg_onnx(tmp_path / "model.onnx")], tags or {}, description)
        sample = json.loads(write_sample(tmp_path / "sample.json").read_text())
        api.post("/api/v1/modules", {"name": "lrmod", "models": ["lr:1"], "sample": sample})
    return "lrmod:1"


def enrol(server, admin: httpx.Client, device: str, labels: dict[str, str]) -> None:
    """An enrolled device that never connects (offline), with ``labels``."""
    [token] = admin.post("/api/v1/enrollment-tokens", json={"labels": labels}).json()["tokens"]
    httpx.post(server.url + "/api/v1/enroll", json={"token": token, "device_id": device}).raise_for_status()


def deploy(admin: httpx.Client, name: str, module: str, target: str = "*") -> dict:
    r = admin.post("/api/v1/deployments", json={"name": name, "module": module, "target": target})
    r.raise_for_status()
    return r.json()


def fits(text: str, width: int = 80) -> None:
    long = [line for line in text.splitlines() if len(line) > width]
    assert not long, f"{len(long)} line(s) wider than {width}: {long[:3]}"
