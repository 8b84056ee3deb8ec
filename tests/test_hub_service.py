"""``edgefleet hub serve`` as a service: a stable broker address, a supervised broker, and no orphans."""

from __future__ import annotations

import json
import secrets
import signal
import socket
from types import SimpleNamespace

import httpx
import psutil

from edgefleet.broker import LocalBroker, free_port
from edgefleet.hubservice import broker_port
from hub import HubConfig, HubServer
from hub.testing import MqttProbe, wait_until
from protocol.messages import Status
from protocol.topics import Channel, device_topic
from tests.pg import hub_db
from tests.rollout_support import build_versions
from tests.servicehub import ServedHub, alive, running
from tests.test_fleet_isolation import Client


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex(("127.0.0.1", port)) == 0


def with_endpoint(hub: ServedHub, tmp_path) -> None:
    """A web endpoint too: its gateway and worker processes are the hub's children as well."""
    with hub.admin() as admin:
        build_versions(admin, tmp_path, name="svc", n=1)
        admin.post("/api/v1/endpoints", json={"name": "svc-web", "module": "svc:1"}).raise_for_status()


def test_the_broker_port_is_chosen_once_per_data_directory(tmp_path):
    first = broker_port(tmp_path / "data")
    assert broker_port(tmp_path / "data") == first  # recorded: every restart dials the same address
    assert json.loads((tmp_path / "data" / "broker" / "address.json").read_text())["port"] == first
    other = free_port()
    assert broker_port(tmp_path / "data", other) == other  # an explicit choice wins, and is recorded
    assert broker_port(tmp_path / "data") == other


def test_sigterm_stops_the_broker_and_the_endpoint_processes(tmp_path):
    hub = ServedHub(tmp_path / "data").start()
    try:
        with_endpoint(hub, tmp_path)
        children = hub.descendants()
        assert hub.broker_pid in {p.pid for p in children}
        assert len(children) >= 3, [p.cmdline() for p in children]  # broker, gateway, its worker
        assert hub.signal(signal.SIGTERM) == 0  # as kill, timeout, docker stop and systemd stop it
        assert alive(children, 10) == []
        assert not listening(hub.broker_port) and not listening(hub.port)
    finally:
        hub.close()


def test_sigterm_stops_the_embedded_iotcore_broker_too(tmp_path):
    hub = ServedHub(tmp_path / "data", "--insecure-broker", env={"EDGEFLEET_BROKER": "iotcore"}).start()
    try:
        children = hub.descendants()
        assert any("iotcore" in " ".join(p.cmdline()) for p in children)
        assert hub.signal(signal.SIGTERM) == 0
        assert alive(children, 10) == []
        assert not listening(hub.broker_port)
    finally:
        hub.close()


def test_after_kill_9_nothing_outlives_the_hub_and_a_restart_reuses_the_broker_address(tmp_path):
    hub = ServedHub(tmp_path / "data").start()
    try:
        with_endpoint(hub, tmp_path)
        port, children = hub.broker_port, hub.descendants()
        assert hub.signal(signal.SIGKILL) == -signal.SIGKILL
        assert alive(children, 10) == []  # the kernel takes the broker down; gateways see their stdin close
        assert not listening(port)
        hub.start()  # the documented restart: the same command
        assert hub.broker_port == port and listening(port)
        with hub.admin() as admin:  # the endpoint came back with it
            wait_until(lambda: "error" not in admin.get("/api/v1/endpoints/svc-web").json().get("status", {"error": 1}),
                       60, 0.2, "the endpoint's gateway running again")
    finally:
        hub.close()


def test_a_broker_port_held_by_another_process_is_refused_in_one_line(tmp_path):
    data = tmp_path / "data"
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", broker_port(data)))
        squatter.listen()
        hub = ServedHub(data)
        assert hub.launch().wait(60) == 1
        lines = [ln for ln in hub.log().splitlines() if "error:" in ln]
        assert len(lines) == 1 and "in use by another process" in lines[0] and "address.json" in lines[0], hub.log()


def test_the_hub_restarts_its_broker_and_reloads_the_live_one(tmp_path):
    hub = ServedHub(tmp_path / "data", "--isolate").start()
    try:
        first = hub.broker_pid
        psutil.Process(first).kill()  # the broker dies under the hub
        wait_until(lambda: hub.broker_pid != first and listening(hub.broker_port), 30, 0.1, "the broker restarted")
        assert running(psutil.Process(hub.broker_pid)) and hub.broker_port in {
            c.laddr.port for c in psutil.Process(hub.broker_pid).net_connections() if c.status == "LISTEN"}
        with hub.admin() as admin:
            wait_until(lambda: httpx.get(hub.url + "/healthz").json()["mqtt_connected"], 30, 0.1, "hub reconnected")
            [token] = admin.post("/api/v1/enrollment-tokens", json={}).json()["tokens"]
            enrolled = httpx.post(hub.url + "/api/v1/enroll", json={"token": token, "device_id": "after-restart"}).json()

        at = SimpleNamespace(host="127.0.0.1", port=hub.broker_port)
        device = Client(at, "after-restart", enrolled["mqtt_password"])  # type: ignore[arg-type]
        try:
            assert device.accepted  # the reload went to the live broker: no manual signal needed
        finally:
            device.close()
    finally:
        hub.close()


def test_devices_whose_status_the_broker_lost_are_not_shown_online(tmp_data, monkeypatch):
    """A restarted broker has no retained statuses: a device that did not reconnect must not stay "online"."""
    monkeypatch.delenv("EDGEFLEET_ADMIN_TOKEN", raising=False)
    broker = LocalBroker(kind="mosquitto").start()
    config = HubConfig(tmp_data, broker.url, mqtt_client_id=f"hub-{secrets.token_hex(4)}", **hub_db(tmp_data))
    try:
        with HubServer(config) as server:
            assert server.wait_mqtt(10)
            headers = {"Authorization": f"Bearer {server.admin_token}"}
            for dev in ("stays", "stranded"):
                [token] = httpx.post(server.url + "/api/v1/enrollment-tokens", headers=headers, json={}).json()["tokens"]
                httpx.post(server.url + "/api/v1/enroll", json={"token": token, "device_id": dev}).raise_for_status()
            probe = MqttProbe(broker.url)
            for dev in ("stays", "stranded"):
                probe.publish(device_topic(dev, Channel.STATUS), Status(device=dev, online=True, ts=1.0).encode(),
                              retain=True)
            wait_until(lambda: all(d["online"] for d in httpx.get(server.url + "/api/v1/devices", headers=headers).json()),
                       10, what="both online")
            probe.close()
        broker.stop()  # no persistence: the retained statuses are gone, and "stranded" never comes back
        broker = LocalBroker(kind="mosquitto", port=broker.port).start()
        probe = MqttProbe(broker.url)
        try:
            with HubServer(config) as server:
                assert server.wait_mqtt(10)
                probe.publish(device_topic("stays", Channel.STATUS), Status(device="stays", online=True, ts=2.0).encode(),
                              retain=True)  # the device that reconnected says so
                headers = {"Authorization": f"Bearer {server.admin_token}"}
                wait_until(lambda: httpx.get(server.url + "/api/v1/devices/stays", headers=headers).json()["online"], 10,
                           what="the reconnected device online")
                assert httpx.get(server.url + "/api/v1/devices/stranded", headers=headers).json()["online"] is False
        finally:
            probe.publish(device_topic("stays", Channel.STATUS), b"", retain=True)
            probe.close()
    finally:
        broker.stop()
