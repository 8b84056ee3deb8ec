"""``hub serve`` isolates its broker by default, on loopback too: an anonymous or guessing local client is refused.

Real parts: ``edgefleet hub serve`` run the documented way (its own mosquitto, no ``--mqtt``, no ``--isolate``),
real paho clients as the attacker and as an enrolled device.
"""

from __future__ import annotations

from types import SimpleNamespace

import httpx

from hub.exposure import Refused, ServeOptions, plan
from tests.servicehub import ServedHub
from tests.test_fleet_isolation import Client


def test_the_hubs_own_broker_refuses_clients_without_a_devices_login(tmp_path):
    hub = ServedHub(tmp_path / "data").start()  # no --isolate: the default
    try:
        at = SimpleNamespace(host="127.0.0.1", port=hub.broker_port)
        for user, password in ((None, None), ("edgefleet-hub", "guess"), ("some-device", "guess")):
            attacker = Client(at, user, password)  # type: ignore[arg-type]
            try:
                assert not attacker.accepted, f"the broker let {user or 'an anonymous client'} in"
            finally:
                attacker.close()
        with hub.admin() as admin:
            [token] = admin.post("/api/v1/enrollment-tokens", json={}).json()["tokens"]
        enrolled = httpx.post(hub.url + "/api/v1/enroll", json={"token": token, "device_id": "dev-ok"}).json()
        device = Client(at, "dev-ok", enrolled["mqtt_password"])  # type: ignore[arg-type]
        try:
            assert device.accepted  # an enrolled device gets in with its own login
        finally:
            device.close()
    finally:
        hub.close()


def test_an_open_broker_takes_an_explicit_flag():
    def p(**kw: object):  # noqa: ANN202
        return plan(ServeOptions(**kw), "hub.example.org")  # type: ignore[arg-type]

    assert p().isolate and p(host="localhost").isolate  # loopback: isolated as well
    open_ = p(insecure_broker=True)
    assert not open_.isolate and any("anonymous" in n for n in open_.notes)
    assert p(host="0.0.0.0", insecure_broker=True, insecure_http=True).isolate  # beyond loopback: always
    assert not p(mqtt="mqtt://127.0.0.1:1883").isolate and p(mqtt="mqtt://127.0.0.1:1883", isolate=True).isolate
    try:
        p(isolate=True, insecure_broker=True)
    except Refused as exc:
        assert "contradict" in str(exc)
    else:
        raise AssertionError("--isolate with --insecure-broker on loopback was accepted")
