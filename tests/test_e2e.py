"""The whole loop over real parts: a hub process, 3 agent processes, a real broker, a real ONNX model.

Register -> build a signed bundle -> deploy to '*' -> each agent downloads, verifies, health-checks
and runs it -> inference telemetry is read back through the hub's HTTP API.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from edgefleet.broker import free_port, wait_for_port
from edgefleet.client import HubClient
from modules.examples import write_logreg_onnx, write_sample
from tests.pg import hub_env

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "e2e-admin-token-0123456789abcdefghijkl"


def cli(*args: str, env_extra: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    env = {**os.environ, "EDGEFLEET_ADMIN_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "edgefleet", *args], cwd=ROOT, env=env, **kw)


def wait_until(predicate, timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)  # polling an external process's HTTP API: there is no event to await
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture
def hub_process(broker, tmp_path):
    port = free_port()
    log = open(tmp_path / "hub.log", "wb")
    proc = cli("hub", "serve", "--data", str(tmp_path / "hub"), "--port", str(port), "--mqtt", broker.url,
               stdout=log, stderr=subprocess.STDOUT, env_extra=hub_env(tmp_path / "hub"))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_port("127.0.0.1", port, 30, proc)  # type: ignore[arg-type]
        wait_until(lambda: httpx.get(f"{url}/healthz").json().get("mqtt_connected"), 30, "hub connected to MQTT")
        yield url
    finally:
        stop(proc)
        log.close()
        if proc.returncode not in (0, -signal.SIGINT, 130):
            print((tmp_path / "hub.log").read_text()[-4000:])


def test_hub_and_three_agent_processes_run_a_deployed_model(hub_process, tmp_path):
    url = hub_process
    agents: list[subprocess.Popen] = []
    with HubClient(url, TOKEN) as hub:
        model_path = write_logreg_onnx(tmp_path / "logreg.onnx")
        sample = json.loads(write_sample(tmp_path / "sample.json").read_text())
        model = hub.register_model("e2e-model", [model_path], tags={"suite": "e2e"})
        assert (model["name"], model["version"]) == ("e2e-model", 1)
        module = hub.post("/api/v1/modules", {"name": "e2e-module", "models": ["e2e-model:1"], "sample": sample})
        tokens = hub.post("/api/v1/enrollment-tokens", {"count": 3})["tokens"]
        try:
            for i, token in enumerate(tokens):
                data = tmp_path / f"agent{i}"
                enrol = cli("agent", "enroll", "--hub", url, "--token", token, "--data", str(data),
                            "--device-id", f"e2e-{i}", "--json", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                out, errs = enrol.communicate(timeout=60)
                assert enrol.returncode == 0, errs.decode()
                assert json.loads(out)["device_id"] == f"e2e-{i}"
                log = open(tmp_path / f"agent{i}.log", "wb")
                agents.append(cli("agent", "run", "--data", str(data), "--rate", "20", "--telemetry-interval", "1",
                                  stdout=log, stderr=subprocess.STDOUT))
            hub.post("/api/v1/deployments", {"name": "e2e", "module": f"e2e-module:{module['version']}", "target": "*"})

            def all_running_with_telemetry():
                devices = {d["id"]: d for d in hub.get("/api/v1/devices")}
                ok = all(
                    devices.get(f"e2e-{i}", {}).get("state") == "running"
                    and devices[f"e2e-{i}"].get("inferences", 0) > 0
                    for i in range(3)
                )
                return devices if ok else None

            devices = wait_until(all_running_with_telemetry, 90, "3 devices running with inference telemetry")
            for i in range(3):
                d = devices[f"e2e-{i}"]
                assert d["online"] is True
                assert [(m["name"], m["version"], m["bundle"]) for m in d["modules"]] == [
                    ("e2e-module", module["version"], module["digest"])]
            rows = hub.get("/api/v1/telemetry", device="e2e-0")
            rows = rows.get("items", rows) if isinstance(rows, dict) else rows
            assert rows and all(r["module"] == "e2e-module" for r in rows)
            assert sum(r["inferences"] for r in rows) > 0
        finally:
            for p in agents:
                stop(p)
        for i, p in enumerate(agents):
            assert p.returncode in (0, -signal.SIGINT, 130), (tmp_path / f"agent{i}.log").read_text()[-3000:]

        # The agents said goodbye: the hub sees them offline (retained status from a clean stop).
        wait_until(lambda: all(not d["online"] for d in hub.get("/api/v1/devices")), 30, "devices offline")
