"""Reserved and bound broker identities, tried as an attacker would: a real mosquitto with the hub's password
file and ACL, a real hub, and real paho clients holding a device's valid credentials (issue 13)."""

from __future__ import annotations

import secrets
import threading
import time
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest

from edgefleet.broker import LocalBroker
from hub import HubConfig, HubServer
from hub.fleet.broker_auth import BrokerAuth, mosquitto_hash
from hub.testing import MqttProbe, wait_until
from protocol.messages import ReportedState, TelemetryBatch, TelemetryPoint
from protocol.topics import Channel, device_topic
from tests.pg import hub_db

pytestmark = pytest.mark.hubstore  # run again on PostgreSQL by scripts/test.sh

PUBLIC_GROUP = "edgefleet-ingest"  # the shared-subscription group name the hub used, documented in docs/scaling.md


class Client:
    """A paho client with a chosen client id that records its CONNACK, messages and disconnects."""

    def __init__(self, broker: LocalBroker, user: str, password: str, client_id: str) -> None:
        self.connack: Any = None
        self.messages: list[str] = []
        self.disconnected = threading.Event()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.c.username_pw_set(user, password)
        self.c.on_connect = lambda c, u, f, rc, p: setattr(self, "connack", rc)
        self.c.on_message = lambda c, u, m: self.messages.append(m.topic)
        self.c.on_disconnect = lambda *a: self.disconnected.set()
        self.c.reconnect_delay_set(60, 60)  # an evicted client stays evicted for the test's duration
        self.c.connect(broker.host, broker.port)
        self.c.loop_start()
        wait_until(lambda: self.connack is not None, 10, what="CONNACK")

    @property
    def accepted(self) -> bool:
        return not self.connack.is_failure

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def hub_config():
    return {}


@pytest.fixture
def isolated(tmp_data, monkeypatch, hub_config):
    """mosquitto on the hub's password file and ACL (as ``hub serve --isolate`` runs it) and the hub on it."""
    monkeypatch.delenv("EDGEFLEET_ADMIN_TOKEN", raising=False)
    auth = BrokerAuth(tmp_data / "broker", workers=hub_config.get("ingest_workers", 0))
    auth.write([])  # the hub's logins exist before the broker starts (as `hub serve --isolate` does it)
    broker = LocalBroker(kind="mosquitto", password_file=auth.password_file, acl_file=auth.acl_file).start()
    server = HubServer(HubConfig(tmp_data, auth.hub_url(broker.url), public_mqtt_url=broker.url, isolate=True,
                                 broker_pid=broker.proc.pid, **hub_db(tmp_data), **hub_config)).start()
    assert server.wait_mqtt(10)
    admin = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.admin_token}"}, timeout=30)
    yield broker, server, admin
    admin.close()
    server.stop()
    broker.stop()


def enroll(server: HubServer, admin: httpx.Client, device_id: str) -> httpx.Response:
    [token] = admin.post("/api/v1/enrollment-tokens", json={}).json()["tokens"]
    return httpx.post(server.url + "/api/v1/enroll", json={"token": token, "device_id": device_id})


def password_lines(server: HubServer) -> list[str]:
    return (server.config.data_dir / "broker" / "passwd").read_text().splitlines()


def test_a_device_cannot_enrol_as_the_hub_or_any_reserved_login(isolated):
    broker, server, admin = isolated
    for bad in ("edgefleet-hub", "edgefleet-hub-ingest-0", "edgefleet-anything", "EDGEFLEET-HUB", "Edgefleet-x"):
        r = enroll(server, admin, bad)
        assert r.status_code == 422, (bad, r.text)
        assert "reserved" in r.text, r.text
    r = enroll(server, admin, "dev1\n")  # would split its password-file line in two
    assert r.status_code == 422, r.text
    assert admin.get("/api/v1/devices").json() == []
    ok = enroll(server, admin, "dev1")
    assert ok.status_code == 200
    users = [line.split(":", 1)[0] for line in password_lines(server)]
    assert users.count("edgefleet-hub") == 1 and "dev1" in users and all(u.strip() == u and u for u in users)
    # the hub's login is still the hub's: a device password does not open it, and the hub stays connected
    assert not Client(broker, "edgefleet-hub", ok.json()["mqtt_password"], f"x-{secrets.token_hex(3)}").accepted
    assert server.hub.bridge.connected


def test_the_password_file_never_holds_a_reserved_or_malformed_device_entry(tmp_path):
    """Defence in depth: whatever the device table holds (an old hub, a hand edit), the broker files stay sound."""
    auth = BrokerAuth(tmp_path / "broker")
    h = mosquitto_hash("pw")
    n = auth.write([("edgefleet-hub", h), ("dev1\n", h), ("a:b", h), ("edgefleet-hub-ingest-0", h), ("ok-1", h)],
                   reload=False)
    lines = auth.password_file.read_text().splitlines()
    assert [line.split(":", 1)[0] for line in lines] == ["edgefleet-hub", "ok-1"]
    assert n == 1
    assert lines[0].split(":", 1)[1] != h  # the hub's entry is the hub's own password


def test_a_device_using_the_hubs_or_another_devices_client_id_evicts_nobody(isolated, caplog):
    broker, server, admin = isolated
    caplog.set_level("WARNING", logger="edgefleet.hub.bridge")
    creds = {d: enroll(server, admin, d).json()["mqtt_password"] for d in ("victim", "mallory")}
    victim = Client(broker, "victim", creds["victim"], "victim")
    assert victim.accepted
    attackers = [Client(broker, "mallory", creds["mallory"], server.config.mqtt_client_id),
                 Client(broker, "mallory", creds["mallory"], "victim")]
    assert all(a.accepted for a in attackers)
    # a round trip through the broker and the hub after both attacks: an evicted hub or victim has seen its
    # socket close by then (the broker closes the old session before it answers the newcomer's CONNECT)
    victim.publish(device_topic("victim", Channel.REPORTED), ReportedState(device="victim", revision=0, ts=1.0).encode(),
                   retain=True)
    wait_until(lambda: server.hub.db.one("SELECT reported FROM devices WHERE id = 'victim'")["reported"], 10,
               what="the hub hears the victim")
    assert not victim.disconnected.is_set(), "another device's login evicted the victim"
    lost = [r.getMessage() for r in caplog.records if "lost the broker" in r.getMessage()]
    assert lost == [], lost
    assert server.hub.bridge.connected
    for c in (victim, *attackers):
        c.close()


@pytest.mark.parametrize("hub_config", [{"ingest_workers": 1}])
def test_a_device_cannot_join_the_hubs_shared_subscription_group(isolated, hub_config, caplog):
    broker, server, admin = isolated
    caplog.set_level("WARNING", logger="edgefleet.hub.bridge")
    creds = {d: enroll(server, admin, d).json()["mqtt_password"] for d in ("sender", "mallory")}
    wait_until(lambda: server.hub.db.one("SELECT count(*) AS n FROM ingest_workers")["n"] >= 1, 30,
               what="the ingest worker running")
    thief = MqttProbe(f"mqtt://mallory:{creds['mallory']}@{broker.host}:{broker.port}")
    sender = MqttProbe(f"mqtt://sender:{creds['sender']}@{broker.host}:{broker.port}")
    try:
        for channel in ("telemetry", "data"):
            thief.subscribe(f"$share/{PUBLIC_GROUP}/edgefleet/v1/devices/+/{channel}")
        n = 30
        for seq in range(1, n + 1):
            sender.publish(device_topic("sender", Channel.TELEMETRY), TelemetryBatch(
                device="sender", seq=seq, ts=time.time(), points=[
                    TelemetryPoint(ts=time.time(), module="m", version=1, inferences=1, errors=0)]).encode())
        wait_until(lambda: server.hub.db.one("SELECT count(*) AS n FROM telemetry_batches WHERE device = 'sender'")
                   ["n"] == n, 20, what=f"all {n} batches stored by the hub and its worker")
        assert thief.messages == []
        # the worker, under a login of its own, took part in the hub's (secret) group
        wait_until(lambda: server.hub.db.one("SELECT received FROM ingest_workers WHERE idx = 0")["received"] > 0, 10,
                   what="the ingest worker's share of the batches")
        # the worker has a login of its own: it and the hub, bound to their logins, do not evict each other
        assert [r.getMessage() for r in caplog.records if "lost the broker" in r.getMessage()] == []
    finally:
        thief.close()
        sender.close()
