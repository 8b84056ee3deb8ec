"""Encrypted by default, enrolment without blind trust (issue 13: the hub served only plain HTTP, and enrolment pinned
whatever root, broker URL and CA answered).

``edgefleet hub serve --host 0.0.0.0`` serves HTTPS and gives devices an MQTTS listener, with a CA it makes in
DATA/tls; a device enrols with the fingerprints ``keys show`` prints, pins the CA, and its agent connects over
MQTTS. Plain text beyond loopback needs an explicit flag; a wrong fingerprint stops enrolment."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from agent.identity import EnrollmentError, Pins, check_hub_url, enroll, load_identity
from edgefleet.client import HubClient
from hub.exposure import Refused, ServeOptions, plan
from hub.testing import wait_until
from hub.trust.tls import fingerprint
from tests.hubprocess import free_port
from tests.pg import hub_env

ROOT = Path(__file__).resolve().parents[1]


def edgefleet(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgefleet", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def test_a_hub_beyond_loopback_speaks_tls_and_devices_pin_it(tmp_path):
    data, port, mqtt_port = tmp_path / "hub", free_port(), free_port()
    token = secrets.token_urlsafe(32)
    env = {**os.environ, "EDGEFLEET_ADMIN_TOKEN": token, "PYTHONUNBUFFERED": "1", **hub_env(data)}
    log = (tmp_path / "hub.log").open("w")
    hub = subprocess.Popen([sys.executable, "-m", "edgefleet", "hub", "serve", "--host", "0.0.0.0", "--port", str(port),
                            "--data", str(data), "--public-mqtt", f"mqtts://127.0.0.1:{mqtt_port}"],
                           cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    agent = None
    url, ca = f"https://127.0.0.1:{port}", data / "tls" / "ca.pem"
    try:
        def up() -> bool:
            assert hub.poll() is None, (tmp_path / "hub.log").read_text()
            try:
                return bool(httpx.get(url + "/healthz", verify=str(ca), timeout=1).json()["mqtt_connected"])
            except (httpx.HTTPError, OSError):  # OSError: the CA file is not written yet
                return False

        wait_until(up, 60, 0.2, "the hub to answer over HTTPS")
        with pytest.raises(httpx.HTTPError):  # no plain HTTP on the same port
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        with socket.create_connection(("127.0.0.1", mqtt_port), timeout=5) as s:  # the device listener wants TLS
            s.sendall(b"\x10\x10\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x03abc")  # a plain MQTT 5 CONNECT
            s.settimeout(5)
            try:
                answer = s.recv(16)
            except ConnectionResetError:
                answer = b""
            assert answer[:1] != b"\x20"  # no CONNACK: the TLS listener drops it

        shown = json.loads(edgefleet("--hub", url, "--hub-ca", str(ca), "--token", token, "keys", "show",
                                     "--json").stdout)["status"]
        assert shown["ca_sha256"] == [fingerprint(ca.read_text())]
        with HubClient(url, token, ca=str(ca)) as api:
            good, spare = api.post("/api/v1/enrollment-tokens", {"count": 2})["tokens"]

        # a wrong CA fingerprint: refused before the token is sent; a wrong root: the answer is refused
        with pytest.raises(EnrollmentError, match="serves no CA with sha256"):
            enroll(url, spare, tmp_path / "wrong-ca", device_id="x1", pins=Pins(ca_sha256="ab" * 32))
        assert not (tmp_path / "wrong-ca" / "identity.json").exists()
        refused = edgefleet("agent", "enroll", "--hub", url, "--token", spare, "--data", str(tmp_path / "wrong-root"),
                            "--root-sha256", "cd" * 32, "--ca-sha256", shown["ca_sha256"][0])
        assert refused.returncode == 1 and "root of trust has sha256" in refused.stderr
        assert not (tmp_path / "wrong-root" / "identity.json").exists()
        with pytest.raises(EnrollmentError, match="not trusted: pass --ca-sha256"):  # no pin: the system's store
            enroll(url, good, tmp_path / "no-pin", device_id="x2")

        device = tmp_path / "device"
        enrolled = edgefleet("agent", "enroll", "--hub", url, "--token", good, "--data", str(device), "--device-id",
                             "tls-dev", "--root-sha256", shown["root_sha256"], "--ca-sha256", shown["ca_sha256"][0])
        assert enrolled.returncode == 0, enrolled.stderr
        identity = load_identity(device)
        assert identity.mqtt_url == f"mqtts://127.0.0.1:{mqtt_port}" and identity.hub_url == url
        assert fingerprint(identity.broker_ca) == shown["ca_sha256"][0]  # pinned on disk
        assert identity.mqtt_password and identity.mqtt_username == "tls-dev"  # isolation: its own login

        agent = subprocess.Popen([sys.executable, "-m", "agent", "--data", str(device), "--api-port", "0"], cwd=ROOT,
                                 env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with HubClient(url, token, ca=str(ca)) as api:
            wait_until(lambda: api.get("/api/v1/devices/tls-dev")["online"], 60, 0.2, "tls-dev online over MQTTS")
    finally:
        if agent is not None:
            stop(agent)
        stop(hub)
        log.close()


def test_plain_text_beyond_loopback_needs_an_explicit_flag(tmp_path):
    for args, reason in (
        (["--mqtt", "mqtt://10.9.8.7:1883"], "in plain text: give its mqtts:// URL"),
        (["--public-mqtt", "mqtt://hub.example:1883"], "is plain mqtt:// beyond loopback: use mqtts://"),
    ):
        proc = subprocess.Popen([sys.executable, "-m", "edgefleet", "hub", "serve", "--host", "0.0.0.0", "--port",
                                 str(free_port()), "--data", str(tmp_path / "hub"), *args], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _, errs = proc.communicate(timeout=60)
        finally:
            proc.kill()  # a hub that started anyway (as before this check) must not outlive the test
        assert proc.returncode == 1 and reason in errs and "--insecure-broker" in errs, errs


def test_what_is_exposed_and_how():
    def p(**kw: object):  # noqa: ANN202
        return plan(ServeOptions(**kw), "hub.example.org")  # type: ignore[arg-type]

    assert p() == p(host="localhost") and not p().https and p().device_listener is None  # loopback: as before
    e = p(host="0.0.0.0")
    assert e.https and e.device_listener == ("0.0.0.0", 8883, True) and e.isolate and e.notes
    assert e.device_mqtt_url == "mqtts://hub.example.org:8883"
    e = p(host="10.0.0.5", insecure_http=True, insecure_broker=True, isolate=True)
    assert not e.https and e.device_listener == ("10.0.0.5", 1883, False) and e.device_mqtt_url == "mqtt://10.0.0.5:1883"
    assert not e.notes
    e = p(public_mqtt="mqtts://broker.example:9999")  # API on loopback, devices elsewhere: the broker is exposed
    assert not e.https and e.device_listener == ("0.0.0.0", 9999, True)
    assert p(tls_cert=True).https  # asked for
    assert p(host="0.0.0.0", mqtt="mqtt://127.0.0.1:1883").device_listener is None  # external: its own listeners
    assert p(host="0.0.0.0", mqtt="mqtts://b.example:8883").https
    assert p(mqtt="mqtt://b.example:1883", insecure_broker=True).device_mqtt_url is None
    for bad in ({"mqtt": "mqtt://b.example:1883"}, {"host": "0.0.0.0", "public_mqtt": "mqtt://h:1883"},
                {"host": "::", "public_mqtt": "mqtts://h:1", "insecure_broker": True}):
        with pytest.raises(Refused):
            p(**bad)


def test_the_agent_refuses_plain_http_to_another_machine(tmp_path, monkeypatch):
    monkeypatch.delenv("EDGEFLEET_INSECURE_HTTP", raising=False)
    for ok in ("https://hub.example", "http://127.0.0.1:8080", "http://localhost:1", "http://[::1]:80"):
        assert check_hub_url(ok) == ok
    with pytest.raises(ValueError, match="plain http:// to another machine"):
        check_hub_url("http://10.1.2.3:8080")  # what `--transfer http` checks before sending its password
    assert check_hub_url("http://10.1.2.3:8080", insecure=True)
    monkeypatch.setenv("EDGEFLEET_INSECURE_HTTP", "1")
    assert check_hub_url("http://10.1.2.3:8080")
    monkeypatch.delenv("EDGEFLEET_INSECURE_HTTP")
    with pytest.raises(EnrollmentError, match="--insecure-http"):  # refused before anything is sent (not a timeout)
        enroll("http://192.0.2.1:8080", "token", tmp_path / "d")
    assert not (tmp_path / "d").exists()
