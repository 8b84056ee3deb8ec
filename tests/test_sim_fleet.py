"""The simulator: many real agents on one loop over real MQTT connections, enrolled through the hub API."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from simulator.fleet import Fleet, run_fleet
from simulator.outbox import FleetOutboxes
from tests.hubside import HubSide, running_agent, until


@pytest.fixture
def hub(broker, tmp_path):
    h = HubSide(broker.url, tmp_path / "hub")
    yield h
    h.close()


def fake_hub_api(hub: HubSide, calls: list[str]) -> httpx.MockTransport:
    """The two hub endpoints the simulator uses, answering as the contract says."""

    def handle(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        body = json.loads(request.content)
        if request.url.path == "/api/v1/enrollment-tokens":
            if request.headers.get("authorization") != "Bearer admin-token":
                return httpx.Response(401, json={"detail": "bad token"})
            assert body["labels"] == {"sim": "true"}
            return httpx.Response(200, json={"tokens": [f"tok-{body['uses']}" for _ in range(body["count"])]})
        if request.url.path == "/api/v1/enroll/batch":
            if not body["token"].startswith("tok-"):
                return httpx.Response(403, json={"detail": "unknown enrolment token"})
            return httpx.Response(200, json={
                "devices": [{"device_id": d["device_id"], "mqtt_username": None, "mqtt_password": None}
                            for d in body["devices"]],
                "mqtt_url": hub.broker_url, "root": hub.root, "hub_time": time.time()})
        return httpx.Response(404, json={"detail": "not found"})

    return httpx.MockTransport(handle)


def test_fleet_in_background_thread_installs_everywhere_and_reuses_identities(hub, tmp_path):
    n = 12
    calls: list[str] = []
    bundle = hub.build("classifier", 1)
    fleet = Fleet("http://hub.test", "admin-token", n, tmp_path / "sim", rate=20, telemetry_interval=0.5,
                  prefix="simt", http_transport=fake_hub_api(hub, calls), enroll_batch=5)
    for dev in fleet.device_ids():
        hub.publish_desired(dev, 1, [bundle.desired(collect_rate_ppm=100_000)])
    fleet.start()
    try:
        deadline = time.monotonic() + 40
        while not all(s["modules"] and s["modules"][0]["state"] == "running" and s["inferences"] > 0
                      for s in fleet.snapshots()):
            assert time.monotonic() < deadline, fleet.snapshots()
            time.sleep(0.2)
        assert len(fleet.runner_cache) == 1  # one onnxruntime session shared by every device
        # fleet provisioning: one group token, and the devices enrolled in bulk (5 per request here)
        assert calls == ["/api/v1/enrollment-tokens"] + ["/api/v1/enroll/batch"] * 3
        # every device gets its own telemetry stream
        deadline = time.monotonic() + 20
        while not all(hub.telemetry(d) for d in fleet.device_ids()):
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        fleet.stop()
    assert all(not s["connected"] for s in fleet.snapshots())

    calls.clear()
    agents = asyncio.run(run_fleet("http://hub.test", "admin-token", n, tmp_path / "sim", rate=0, duration=1.0,
                                   prefix="simt"))
    assert calls == [] and len(agents) == n  # identities re-used: no tokens, no enrolment


def test_enrolment_refusal_is_a_clear_error(hub, tmp_path):
    calls: list[str] = []
    fleet = Fleet("http://hub.test", "wrong", 2, tmp_path / "sim", http_transport=fake_hub_api(hub, calls))

    async def main() -> None:
        with pytest.raises(Exception, match="HTTP 401"):
            await fleet.run(duration=0.1)

    asyncio.run(main())
    assert fleet.error is not None


def test_agents_share_one_loop_and_reconnect_after_broker_restart(tmp_path):
    from agent.core import Agent
    from agent.mqtt import AsyncMqttClient
    from edgefleet.broker import LocalBroker

    b = LocalBroker().start()
    hub = None
    try:
        hub = HubSide(b.url, tmp_path / "hub")
        agents = [Agent(hub.identity(f"rc-{i}", tmp_path / f"rc-{i}"), tmp_path / f"rc-{i}", telemetry_interval=0.2,
                        mqtt_client_factory=lambda cid, url, will: AsyncMqttClient(cid, url, will=will, backoff_cap=1.0))
                  for i in range(5)]

        async def main() -> None:
            nonlocal hub
            tasks = [asyncio.create_task(a.run()) for a in agents]
            await until(lambda: all(a.client.connected.is_set() for a in agents), 10, "all connected")
            hub.close()
            b.stop()
            await until(lambda: not any(a.client.connected.is_set() for a in agents), 10, "all offline")
            await until(lambda: all(len(a.outbox) >= 3 for a in agents), 10, "telemetry stored while offline")
            b.start()
            hub = HubSide(b.url, tmp_path / "hub2")
            await until(lambda: all(a.client.connected.is_set() for a in agents), 20, "all reconnected")
            await until(lambda: all(len(a.outbox) <= 1 for a in agents), 20, "outbox drained")
            for a in agents:
                seqs = [t.seq for t in hub.telemetry(a.device_id)]
                # stored-and-forwarded, in order, nothing lost; QoS 1 is at least once (a batch in flight when the
                # broker died may arrive twice: the hub de-duplicates by seq, docs/protocol.md)
                first = list(dict.fromkeys(seqs))
                assert first == list(range(first[0], first[0] + len(first))) and len(first) >= 3, seqs
            await asyncio.gather(*(a.stop() for a in agents))
            await asyncio.gather(*tasks)

        asyncio.run(main())
    finally:
        if hub is not None:
            hub.close()
        b.stop()


def test_the_fleet_outbox_keeps_each_devices_rows_apart_and_survives_a_restart(tmp_path):
    fleet = FleetOutboxes(tmp_path / "outbox.db")
    a, b = fleet.for_device("a", max_rows=5), fleet.for_device("b", max_rows=5)
    for i in range(8):
        a.put("telemetry", f"a{i}".encode())
    b.put("telemetry", b"b0")
    rows = a.peek(100)
    assert [p for _, _, p in rows] == [f"a{i}".encode() for i in range(3, 8)]  # the bound drops a's oldest only
    assert len(a) == 5 and a.dropped == 3 and len(b) == 1 and b.dropped == 0
    b.delete(rows[0][0])  # another device's row id: not b's to delete
    a.delete(rows[0][0])
    assert [p for _, _, p in a.peek(2)] == [b"a4", b"a5"] and [p for _, _, p in b.peek(5)] == [b"b0"]
    seqs = [a.next_seq("telemetry") for _ in range(3)]
    assert b.next_seq("telemetry") == 1
    fleet.close()
    again = FleetOutboxes(tmp_path / "outbox.db").for_device("a", max_rows=5)  # persisted, like a device's own file
    assert again.next_seq("telemetry") == seqs[-1] + 1 and again.dropped == 3 and len(again) == 4


def test_drop_link_is_a_dead_link_the_broker_announces_and_the_agent_recovers_from(hub, tmp_path):
    """The simulator's flaky devices: drop_link() cuts the socket without DISCONNECT, so the last will goes out."""
    from protocol.messages import decode
    from protocol.topics import Channel

    async def main() -> None:
        async with running_agent(hub, "flaky-1", tmp_path / "flaky-1") as agent:
            await until(lambda: agent.client.connected.is_set(), 10, "connected")
            agent.client.drop_link()
            await until(lambda: any(not decode(Channel.STATUS, p).online for p in hub.messages("flaky-1", Channel.STATUS)),
                        15, "the broker publishing the last will (offline)")
            await until(lambda: agent.client.connected.is_set() and agent.client.reconnects >= 1, 15, "reconnected")
            # The hub's watcher sees the new "online" some time after the agent's CONNACK: await it, then
            # check it is the last word (the last will must not land after the reconnect's announcement).
            await until(lambda: decode(Channel.STATUS, hub.messages("flaky-1", Channel.STATUS)[-1]).online, 15,
                        "the hub seeing the agent online again")
            statuses = [decode(Channel.STATUS, p).online for p in hub.messages("flaky-1", Channel.STATUS)]
            assert statuses[-1] is True and False in statuses  # offline was announced, then online again

    asyncio.run(main())
