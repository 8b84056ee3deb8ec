"""Ingest workers share telemetry through an MQTT 5 shared subscription, and every batch is stored once."""

from __future__ import annotations

import secrets
import time

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from hub.config import HubConfig
from hub.server import HubServer
from protocol.messages import TelemetryBatch, TelemetryPoint
from protocol.topics import Channel, device_topic
from tests.pg import hub_db

pytestmark = pytest.mark.hubstore  # run again on PostgreSQL by scripts/test.sh


def wait_until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)  # the workers are other processes: their progress is read from the shared database
    raise AssertionError(f"timed out waiting for {what}")


def test_two_ingest_workers_share_the_load_and_store_each_batch_once(broker, tmp_data):
    server = HubServer(HubConfig(tmp_data, broker.url, mqtt_client_id=f"hub-{secrets.token_hex(4)}",
                                 ingest_workers=2, **hub_db(tmp_data))).start()
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"dev-{secrets.token_hex(4)}", protocol=mqtt.MQTTv5)
    try:
        assert server.wait_mqtt(10)
        db = server.hub.db
        wait_until(lambda: len(db.query("SELECT idx FROM ingest_workers")) == 2, 30, "both workers up")
        admin = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.admin_token}"})
        [token] = admin.post("/api/v1/enrollment-tokens", json={}).json()["tokens"]
        httpx.post(server.url + "/api/v1/enroll", json={"token": token, "device_id": "ing-1"}).raise_for_status()
        pub.connect(broker.host, broker.port)
        pub.loop_start()
        topic = device_topic("ing-1", Channel.TELEMETRY)
        batches = [TelemetryBatch(device="ing-1", seq=i, ts=1000.0 + i, points=[
            TelemetryPoint(ts=1000.0 + i, module="m", version=1, inferences=3, errors=0)]).encode() for i in range(300)]
        for payload in batches + batches[:50]:  # 50 replays
            pub.publish(topic, payload, qos=1).wait_for_publish(10)
        wait_until(lambda: db.scalar("SELECT sum(points) FROM telemetry_batches WHERE device = 'ing-1'") == 300, 60,
                   "300 batches stored")
        # the workers took part (the broker spreads the group's messages), and nothing was stored twice
        wait_until(lambda: all(w["received"] > 0 for w in db.query("SELECT received FROM ingest_workers")), 10,
                   "every worker received some")
        assert db.scalar("SELECT sum(inferences) FROM telemetry_minutes WHERE device = 'ing-1'") == 900
        assert 'edgefleet_hub_ingest_worker_messages_total{worker="1",outcome="received"}' in \
            httpx.get(server.url + "/metrics").text
        # a malformed batch is refused by whichever process gets it, and the others keep going
        pub.publish(topic, b"not json", qos=1).wait_for_publish(10)
        pub.publish(topic, TelemetryBatch(device="ing-1", seq=300, ts=2000.0, points=[]).encode(), qos=1)
        late = TelemetryBatch(device="ing-1", seq=301, ts=2001.0, points=[
            TelemetryPoint(ts=2001.0, module="m", version=1, inferences=1, errors=0)]).encode()
        pub.publish(topic, late, qos=1).wait_for_publish(10)
        wait_until(lambda: db.scalar("SELECT sum(points) FROM telemetry_batches WHERE device = 'ing-1'") == 301, 30,
                   "a batch after the malformed one is stored")
        admin.close()
    finally:
        pub.loop_stop()
        pub.disconnect()
        server.stop()
    assert not any(p.is_alive() for p in server.hub._ingest_workers)
