"""No secret in the hub's log: ``edgefleet -v hub serve --isolate`` (debug level, its own mosquitto) is put through
first start, tokens, enrolment, device logins right and wrong, bad bearer tokens and a key rotation; then its whole
output is searched for every secret it handled (issue 13: the admin token used to be logged at WARNING)."""

from __future__ import annotations

import base64
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from hub.testing import MqttProbe, wait_until
from tests.hubprocess import free_port
from tests.pg import hub_env

ROOT = Path(__file__).resolve().parents[1]


def test_the_hub_logs_no_token_password_or_key(tmp_path):
    data, port = tmp_path / "hub", free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**{k: v for k, v in os.environ.items() if k != "EDGEFLEET_ADMIN_TOKEN"}, **hub_env(data)}  # generated: the case that leaked
    log_path = tmp_path / "hub.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "edgefleet", "-v", "hub", "serve", "--isolate", "--data",
                                 str(data), "--port", str(port)], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    secrets_seen: dict[str, str] = {}
    try:
        def ready() -> bool:
            assert proc.poll() is None, log_path.read_text()
            try:
                return bool(httpx.get(url + "/healthz", timeout=1).json().get("mqtt_connected"))
            except httpx.HTTPError:
                return False

        wait_until(ready, 60, 0.1, "the hub to answer connected")
        admin_token = (data / "admin-token").read_text().strip()
        secrets_seen["admin token"] = admin_token
        admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin_token}"}, timeout=60)
        made = admin.post("/api/v1/tokens", json={"name": "ci", "role": "operator"}).json()
        secrets_seen["API token"] = made["token"]
        [enrol] = admin.post("/api/v1/enrollment-tokens", json={}).json()["tokens"]
        secrets_seen["enrolment token"] = enrol
        device = httpx.post(url + "/api/v1/enroll", json={"token": enrol, "device_id": "logdev"}).json()
        secrets_seen["device password"] = device["mqtt_password"]
        r = httpx.post(url + "/api/v1/enroll", json={"token": enrol, "device_id": "again"})  # a used token, refused
        assert r.status_code == 403

        wrong = secrets.token_urlsafe(32)
        secrets_seen["a wrong bearer token"] = wrong
        assert httpx.get(url + "/api/v1/devices", headers={"Authorization": f"Bearer {wrong}"}).status_code == 401
        assert httpx.post(url + "/api/v1/models", headers={"Authorization": f"Bearer {wrong}"},
                          content=b"x" * 1000).status_code == 401
        for password in (device["mqtt_password"], wrong):  # the device's HTTP login, right and wrong
            basic = base64.b64encode(f"logdev:{password}".encode()).decode()
            httpx.get(url + "/api/v1/device/chunks/" + "0" * 64, headers={"Authorization": f"Basic {basic}"})
        probe = MqttProbe(device["mqtt_url"].replace("mqtt://", f"mqtt://logdev:{device['mqtt_password']}@"))
        probe.close()
        admin.post("/api/v1/keys/rotate", json={"role": "director"}).raise_for_status()
        admin.delete("/api/v1/tokens/ci").raise_for_status()
        admin.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    secrets_seen["the hub's broker password"] = (data / "broker" / "hub-password").read_text().strip()
    for key in sorted((data / "keys").glob("*.key")):
        secrets_seen[f"private key {key.name}"] = key.read_text().strip()
    # the console log wraps long lines (a token could straddle two): compare with all whitespace removed
    logged = "".join(log_path.read_text().split())
    assert "enrolledlogdev" in logged and "revokedtoken" in logged, logged[-3000:]  # the log saw all of it
    assert "admin-token" in logged  # where to find the token is said; the token itself is not
    leaked = [what for what, value in secrets_seen.items() if value in logged]
    assert leaked == [], f"the hub's log holds: {leaked}"
