"""Broker isolation with a real mosquitto: per-device logins and an ACL the hub generates; decommission revokes."""

from __future__ import annotations

import secrets
import threading
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest

from edgefleet.broker import LocalBroker
from hub import HubConfig, HubServer
from hub.fleet.broker_auth import BrokerAuth, mosquitto_hash
from hub.testing import wait_until
from protocol.messages import ReportedState
from protocol.topics import HUB_STATUS_TOPIC, Channel, device_topic, root_topic, root_wildcard
from tests.pg import hub_db
from tests.rollout_support import build_versions

pytestmark = pytest.mark.hubstore  # run again on PostgreSQL by scripts/test.sh


class Client:
    """A paho client that records its CONNACK, messages and disconnects."""

    def __init__(self, broker: LocalBroker, user: str | None, password: str | None) -> None:
        self.connack: Any = None
        self.messages: list[str] = []
        self.disconnected = threading.Event()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"iso-{secrets.token_hex(4)}",
                             protocol=mqtt.MQTTv5)
        if user:
            self.c.username_pw_set(user, password)
        self.c.on_connect = lambda c, u, f, rc, p: setattr(self, "connack", rc)
        self.c.on_message = lambda c, u, m: self.messages.append(m.topic)
        self.c.on_disconnect = lambda *a: self.disconnected.set()
        self.c.connect(broker.host, broker.port)
        self.c.loop_start()
        wait_until(lambda: self.connack is not None, 10, what="CONNACK")

    @property
    def accepted(self) -> bool:
        return not self.connack.is_failure

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def test_mosquitto_hash_matches_mosquitto_passwd_format():
    h = mosquitto_hash("secret", salt=bytes(12))
    assert h.startswith("$7$101$AAAAAAAAAAAAAAAA$") and len(h.split("$")[-1]) == 88


@pytest.fixture
def isolated(tmp_data, monkeypatch):
    monkeypatch.delenv("EDGEFLEET_ADMIN_TOKEN", raising=False)
    auth = BrokerAuth(tmp_data / "broker")
    auth.write([])  # the hub's own login must exist before the broker starts
    broker = LocalBroker(kind="mosquitto", password_file=auth.password_file, acl_file=auth.acl_file).start()
    server = HubServer(HubConfig(tmp_data, auth.hub_url(broker.url), public_mqtt_url=broker.url, isolate=True,
                                 broker_pid=broker.proc.pid, mqtt_client_id=f"hub-{secrets.token_hex(4)}",
                                 **hub_db(tmp_data))).start()
    assert server.wait_mqtt(10)
    yield broker, server
    server.stop()
    broker.stop()


def test_devices_are_confined_to_their_own_topics_and_decommission_revokes(isolated, tmp_path):
    broker, server = isolated
    admin = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.admin_token}"})
    build_versions(admin, tmp_path, n=1)
    creds = {}
    for dev in ("iso-a", "iso-b"):
        [token] = admin.post("/api/v1/enrollment-tokens", json={}).json()["tokens"]
        r = httpx.post(server.url + "/api/v1/enroll", json={"token": token, "device_id": dev}).json()
        assert r["mqtt_username"] == dev and "edgefleet-hub" not in r["mqtt_url"]
        creds[dev] = r["mqtt_password"]

    assert not Client(broker, None, None).accepted  # anonymous
    assert not Client(broker, "iso-a", creds["iso-b"]).accepted  # someone else's password
    a = Client(broker, "iso-a", creds["iso-a"])
    assert a.accepted
    a.c.subscribe([("#", 1), (device_topic("iso-b", Channel.DESIRED), 1), (device_topic("iso-a", Channel.DESIRED), 1),
                   (HUB_STATUS_TOPIC, 1), (root_wildcard(), 1)])
    # what every device must read: the hub's presence and the chain of signed roots
    wait_until(lambda: HUB_STATUS_TOPIC in a.messages and root_topic(1) in a.messages, 10,
               what="hub status and root v1 readable by a device")
    admin.post("/api/v1/deployments", json={"name": "iso", "module": "scorer:1"}).raise_for_status()
    # positive control: A gets its own desired state ...
    wait_until(lambda: device_topic("iso-a", Channel.DESIRED) in a.messages, 10, what="A's desired state")
    # ... and B's publishes on B's topics, yet A never receives anything of B's
    b = Client(broker, "iso-b", creds["iso-b"])
    b.c.publish(device_topic("iso-b", Channel.REPORTED), ReportedState(device="iso-b", revision=1, ts=1.0).encode(),
                qos=1).wait_for_publish(5)
    wait_until(lambda: server.hub.db.one("SELECT reported FROM devices WHERE id = 'iso-b'")["reported"], 10,
               what="the hub hears B")
    # A may not publish as B: the broker drops it, the hub never sees it
    before = server.hub.bridge.received.get("reported", 0)
    a.c.publish(device_topic("iso-b", Channel.REPORTED), ReportedState(device="iso-b", revision=99, ts=2.0).encode(),
                qos=1).wait_for_publish(5)
    a.c.publish(device_topic("iso-a", Channel.REPORTED), ReportedState(device="iso-a", revision=1, ts=2.0).encode(),
                qos=1).wait_for_publish(5)
    wait_until(lambda: server.hub.db.one("SELECT reported FROM devices WHERE id = 'iso-a'")["reported"], 10,
               what="the hub hears A on its own topic")
    assert server.hub.bridge.received.get("reported", 0) == before + 1
    assert '"revision":99' not in server.hub.db.one("SELECT reported FROM devices WHERE id = 'iso-b'")["reported"]
    shared = {HUB_STATUS_TOPIC, root_topic(1)}
    assert all("/iso-a/" in t or t in shared for t in a.messages), a.messages

    # decommission: the live session is cut at once and the login no longer works
    assert admin.delete("/api/v1/devices/iso-a").json()["decommissioned"]
    assert a.disconnected.wait(10)
    assert not Client(broker, "iso-a", creds["iso-a"]).accepted
    assert Client(broker, "iso-b", creds["iso-b"]).accepted
    assert admin.get("/api/v1/devices/iso-a").status_code == 404
    assert [e["action"] for e in admin.get("/api/v1/audit", params={"subject": "iso-a"}).json()][0] == \
        "device.decommissioned"
    a.close()
    b.close()
    admin.close()
