"""Shared set-up for the rollout tests: a hub, a module in several versions, a simulated fleet, waits."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from typing import Any

import httpx

from hub.testing import MqttProbe, wait_until
from modules.examples import write_logreg_onnx

ROOT_CMD = [sys.executable, "-m", "edgefleet"]


def build_versions(admin: httpx.Client, tmp_path: Any, name: str = "scorer", n: int = 3) -> list[dict[str, Any]]:
    """Module ``name`` versions 1..n, each built from its own model version (different weights)."""
    out = []
    for k in range(1, n + 1):
        (tmp_path / f"m{k}").mkdir(parents=True, exist_ok=True)
        path = write_logreg_onnx(tmp_path / f"m{k}" / "model.onnx", seed=k)
        admin.post("/api/v1/models", data={"name": f"{name}-model"},
                   files=[("files", ("model.onnx", path.read_bytes()))]).raise_for_status()
        r = admin.post("/api/v1/modules", json={"name": name, "models": [f"{name}-model:{k}"]})
        r.raise_for_status()
        out.append(r.json())
    return out


def rollout(admin: httpx.Client, name: str) -> dict[str, Any]:
    r = admin.get(f"/api/v1/rollouts/{name}")
    r.raise_for_status()
    return r.json()


def wait_rollout(admin: httpx.Client, name: str, phase: str, timeout: float = 120.0) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        st = rollout(admin, name)
        if st["terminal"] and st["phase"] != phase:
            raise AssertionError(f"rollout ended {st['phase']} (wanted {phase}): {st['reason']}")
        return st if st["phase"] == phase else None
    return wait_until(check, timeout, 0.2, f"rollout of {name} {phase}")


def all_running(admin: httpx.Client, ids: list[str], module: str, version: int, timeout: float = 120.0) -> None:
    def check() -> bool:
        devices = {d["id"]: d for d in admin.get("/api/v1/devices").json()}
        return all(any(m["name"] == module and m["version"] == version and m["state"] == "running"
                       for m in devices[i]["modules"]) for i in ids if i in devices) and set(ids) <= set(devices)
    wait_until(check, timeout, 0.2, f"{len(ids)} devices running {module}:{version}")


class DesiredRecorder:
    """Every desired state the broker delivers, per device: (revision, module versions)."""

    def __init__(self, broker_url: str, devices: list[str]) -> None:
        self.devices = set(devices)  # the session's broker also holds other tests' retained states
        self.probe = MqttProbe(broker_url)
        self.probe.subscribe("edgefleet/v1/devices/+/desired")

    def per_device(self) -> dict[str, list[tuple[int, tuple[tuple[str, int], ...]]]]:
        seen: dict[str, list[tuple[int, tuple[tuple[str, int], ...]]]] = defaultdict(list)
        payloads: dict[str, set[bytes]] = defaultdict(set)
        for m in self.probe.messages:
            if not m.payload:
                continue
            dev = m.topic.split("/")[3]
            if dev not in self.devices or m.payload in payloads[dev]:
                continue  # the same signed envelope again (retained copy, re-sent after a reconnect)
            payloads[dev].add(m.payload)
            signed = json.loads(m.payload)["signed"]
            seen[dev].append((signed["revision"], tuple((x["name"], x["version"]) for x in signed["modules"])))
        return seen

    def close(self) -> None:
        self.probe.close()


def cli(url: str, token: str, *args: str) -> Any:
    proc = subprocess.run([*ROOT_CMD, "--hub", url, "--token", token, *args], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout) if "--json" in args else proc.stdout
