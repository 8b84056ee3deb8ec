"""Trust over a fleet (issue 12): a root signed elsewhere reaches many simulated devices with no restart, a device
whose clock is frozen past every expiry (the real ``faketime``) keeps serving and says why it refuses new states,
and the hub's alert rules (``stale``, ``key_expiry``) raise what an operator must act on."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.identity import enroll
from edgefleet.broker import free_port
from hub.testing import wait_until
from simulator.fleet import Fleet
from tests.clirun import ROOT, as_json, cli
from tests.pg import hub_db
from tests.rollout_support import all_running, build_versions

FROZEN_AT = "2040-01-01 00:00:00"  # past the root (365 days), releases and desired states


def edgefleet(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI without a hub (the commands that run where the root keys are)."""
    proc = subprocess.run([sys.executable, "-m", "edgefleet", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, f"{args}: {proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture
def hub_at(broker, monkeypatch):
    """Start a hub (in this process) on a given data directory; stopped after the test."""
    from hub.config import HubConfig
    from hub.server import HubServer

    monkeypatch.delenv("EDGEFLEET_ADMIN_TOKEN", raising=False)
    started: list[tuple[Any, httpx.Client]] = []

    def start(data: Path) -> tuple[Any, httpx.Client]:
        s = HubServer(HubConfig(data, broker.url, mqtt_client_id=f"hub-{secrets.token_hex(4)}", **hub_db(data))).start()
        assert s.wait_mqtt(10)
        c = httpx.Client(base_url=s.url, headers={"Authorization": f"Bearer {s.admin_token}"}, timeout=60)
        started.append((s, c))
        return s, c

    yield start
    for s, c in started:
        c.close()
        s.stop()


def firing(admin: httpx.Client, rule: str) -> dict[str, dict[str, Any]]:
    return {e["key"]: e for e in admin.get("/api/v1/alerts/firing").json() if e["rule"] == rule}


def metric(text: str, line_start: str) -> float | None:
    return next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(line_start)), None)


def test_key_expiry_rule_warns_ahead_and_shows_in_the_api_cli_and_metrics(server, admin):
    bad = admin.post("/api/v1/alerts/rules", json={"name": "x", "kind": "expiry"})
    assert bad.status_code == 422
    rule = admin.post("/api/v1/alerts/rules", json={"name": "keys", "kind": "key_expiry"}).json()
    assert rule["threshold"] == 30  # days ahead, the kind's default
    assert admin.post("/api/v1/alerts/evaluate").json() == []  # the root expires in 365 days: nothing to say
    far = cli(server, "alert", "add", "keys-far", "--kind", "key_expiry", "--threshold", "400", "--json")
    assert as_json(far)["threshold"] == 400
    raised = admin.post("/api/v1/alerts/evaluate").json()
    assert [(e["rule"], e["key"], e["state"]) for e in raised] == [("keys-far", "root", "firing")]
    assert "root signatures expire in 36" in raised[0]["message"] and "400 days ahead" in raised[0]["message"]
    listed = as_json(cli(server, "alert", "list", "--json"))
    assert [(f["rule"], f["key"]) for f in listed["firing"]] == [("keys-far", "root")]
    assert metric(admin.get("/metrics").text, 'edgefleet_hub_alerts_firing{rule="keys-far"}') == 1
    cli(server, "alert", "delete", "keys-far")
    assert firing(admin, "keys-far") == {}


def test_a_root_rotation_signed_elsewhere_reaches_a_simulated_fleet_with_no_restart(hub_at, tmp_path):
    data, offline, elsewhere = tmp_path / "hub", tmp_path / "offline", tmp_path / "signing-machine"
    edgefleet("keys", "init", "--data", str(data), "--offline-root", str(offline), "--root-keys", "3",
              "--root-threshold", "2")
    server, admin = hub_at(data)
    n = 10
    v1, v2 = build_versions(admin, tmp_path / "models", "scorer", 2)
    fleet = Fleet(server.url, server.admin_token, n, tmp_path / "sim", rate=0, telemetry_interval=5, prefix="rot")
    admin.post("/api/v1/deployments", json={"name": "fleet", "module": "scorer:1", "target": "sim=true"}
               ).raise_for_status()
    fleet.start()
    try:
        ids = fleet.device_ids()
        all_running(admin, ids, "scorer", v1["version"], 60)
        agents = list(fleet.agents)
        # the director key is rotated with the root keys on another machine: prepare, carry, sign 2 of 3, publish
        # (the hub-side steps through the API, as `keys rotate --prepare` / `keys publish-root` call it: the CLI's
        # own start-up is covered in tests/test_hub_offline_root.py)
        unsigned = admin.post("/api/v1/keys/rotate", json={"role": "director", "prepare": True}).json()["root"]
        elsewhere.mkdir()
        carried = elsewhere / "root-2.json"
        carried.write_text(json.dumps(unsigned))
        for key in ("root-1.key", "root-3.key"):
            edgefleet("keys", "sign-root", str(carried), "--key", str(offline / key),
                      "--current", str(offline / "root.json"))
        published = admin.post("/api/v1/roots", json=json.loads(carried.read_text()))
        assert published.status_code == 200, published.text
        assert published.json()["root_version"] == 2 and published.json()["committed"] == ["director"]
        wait_until(lambda: all(s["root_version"] == 2 for s in fleet.snapshots()), 30, 0.2,
                   "every device trusts root version 2")
        # a state signed by the new director key only: every device applies it, none restarted
        admin.patch("/api/v1/deployments/fleet", json={"module": "scorer:2"}).raise_for_status()
        all_running(admin, ids, "scorer", v2["version"], 60)
        snaps = fleet.snapshots()
        assert all(not s["error"] for s in snaps), [s["error"] for s in snaps if s["error"]]
        assert fleet.agents == agents and fleet._thread is not None and fleet._thread.is_alive()  # no agent restarted
    finally:
        fleet.stop()
    assert not any((data / "keys").glob("root*.key*"))  # no root key was ever on the hub's disk


def test_a_clock_frozen_past_every_expiry_keeps_serving_and_the_hub_raises_the_stale_alert(server, admin, tmp_path):
    v1, v2 = build_versions(admin, tmp_path / "models", "frozen", 2)
    token = admin.post("/api/v1/enrollment-tokens", json={}).json()["tokens"][0]
    device_dir = tmp_path / "device"
    ident = enroll(server.url, token, device_dir, device_id=f"frz-{secrets.token_hex(3)}")
    dev = ident.device_id
    admin.post("/api/v1/deployments", json={"name": "frozen", "module": "frozen:1", "target": dev}).raise_for_status()
    rule = admin.post("/api/v1/alerts/rules", json={"name": "stuck", "kind": "stale"}).json()
    assert (rule["threshold"], rule["for_s"]) == (0, 600)  # the kind's defaults: any lag, for 10 minutes
    admin.delete("/api/v1/alerts/rules/stuck").raise_for_status()
    admin.post("/api/v1/alerts/rules", json={"name": "stuck", "kind": "stale", "for_s": 0}).raise_for_status()
    port = free_port()
    command = [sys.executable, "-m", "edgefleet", "agent", "run", "--data", str(device_dir), "--api-port", str(port),
               "--isolation", "inprocess", "--telemetry-interval", "1"]

    with agent_process(command, tmp_path / "agent-1.log"):
        all_running(admin, [dev], "frozen", v1["version"], 60)
    # the device comes back with its clock frozen in 2040 (the real libfaketime; the monotonic clock runs, as a
    # device's does, so its event loop keeps time)
    frozen = ["faketime", "-f", FROZEN_AT, *command]
    env = os.environ | {"FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    app_token = (device_dir / "api-tokens").read_text().split("default ", 1)[1].split()[0]  # the TCP API's token
    with agent_process(frozen, tmp_path / "agent-2.log", env) as log, \
            httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10,
                         headers={"Authorization": f"Bearer {app_token}"}) as api:
        def answer() -> dict[str, Any] | None:
            try:
                r = api.post("/v1/modules/frozen/predict", json={"inputs": {"x": [[0.1, 0.2, 0.3, 0.4]]}})
            except httpx.TransportError:
                return None
            return r.json() if r.status_code == 200 else None
        out = wait_until(answer, 30, 0.2, f"the frozen device answering (log: {log})")
        assert out["version"] == v1["version"] and len(out["outputs"]["probability"]) == 1

        def device() -> dict[str, Any]:
            return admin.get(f"/api/v1/devices/{dev}").json()
        wait_until(lambda: "root expired" in device()["error"], 30, 0.2, "the device reporting its expired root")
        admin.patch("/api/v1/deployments/frozen", json={"module": "frozen:2"}).raise_for_status()
        wait_until(lambda: device()["revision"] > device()["reported_revision"], 30, 0.2, "a newer state published")
        raised = wait_until(lambda: [e for e in admin.post("/api/v1/alerts/evaluate").json() if e["key"] == dev],
                            30, 0.5, "the stale alert")
        assert raised[0]["rule"] == "stuck" and raised[0]["state"] == "firing"
        assert f"device {dev} answers revision" in raised[0]["message"] and "root expired" in raised[0]["message"]
        assert dev in firing(admin, "stuck")
        assert metric(admin.get("/metrics").text, 'edgefleet_hub_alerts_firing{rule="stuck"}') == 1
        # it refused the new state and still runs the old one
        assert answer()["version"] == v1["version"]
        view = device()
        assert [(m["name"], m["version"], m["state"]) for m in view["modules"]] == [("frozen", 2, "pending")]


class agent_process:
    """An ``edgefleet agent run`` process group, stopped with SIGTERM (then killed) on exit; yields its log path."""

    def __init__(self, command: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.command, self.log, self.env = command, log, env

    def __enter__(self) -> Path:
        self.out = self.log.open("wb")
        # its own process group: faketime runs the agent as its child (it does not exec), and both must stop
        self.proc = subprocess.Popen(self.command, cwd=ROOT, stdout=self.out, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        return self.log

    def __exit__(self, *exc: object) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        finally:
            self.out.close()
        # the group's other members (the agent under faketime) are gone too: none may outlive the test
        gone = wait_until(lambda: not _group_alive(self.proc.pid), 20, 0.1, "the agent's process group ending")
        assert gone


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
