"""Two hub processes on one PostgreSQL, a real broker and a simulated fleet: failover, fencing, ingest that loses nothing.

Each hub is ``edgefleet hub serve --db postgresql://…`` in its own process, sharing the database and a
data directory (keys, blobs); the leader's lease is 2 s so failover fits in a test.
"""

from __future__ import annotations

import secrets
import signal
import subprocess
import sys

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from hub.store import open_database
from hub.testing import wait_until
from protocol.messages import TelemetryBatch, TelemetryPoint
from protocol.topics import Channel, device_topic
from simulator.fleet import Fleet
from tests.cluster import HubProcess, leader_of, stop_all
from tests.hubside import clear_hub_retained
from tests.rollout_support import DesiredRecorder, all_running, build_versions, rollout, wait_rollout

NAME = "scorer-cluster"


@pytest.fixture
def replicas(postgres, broker, tmp_path):
    """Two hub processes on a fresh database, both ready; the leader first."""
    db_url = postgres.new_database()
    token = f"cluster-{secrets.token_hex(16)}"
    shared = tmp_path / "shared"
    shared.mkdir()
    hubs = [HubProcess(n, shared, db_url, broker.url, token, log_dir=tmp_path) for n in ("a", "b")]
    try:
        for h in hubs:
            h.start()
        for h in hubs:
            h.wait_ready()
        leader = leader_of(hubs)
        yield [leader, *(h for h in hubs if h is not leader)], db_url
    finally:
        stop_all(hubs)
        clear_hub_retained(broker.url)


def controller_moves(api, rollout_id: int) -> list[tuple[str, int]]:
    """(state, wave) of each transition the controller recorded for a rollout, oldest first."""
    return [(e["action"].removeprefix("rollout."), e["detail"]["wave"])
            for e in reversed(api.get("/api/v1/audit", params={"subject": NAME, "limit": 500}).json())
            if e["actor"] == "controller" and e["detail"].get("rollout") == rollout_id]


def test_kill_9_of_the_leader_mid_rollout_the_other_replica_finishes_it(replicas, broker, tmp_path):
    (leader, follower), db_url = replicas
    n = 20
    api = follower.client()  # every operator call goes to the follower: it hands the signing to the leader
    build_versions(api, tmp_path, n=2)
    fleet = Fleet(follower.url, follower.token, n, tmp_path / "sim", rate=2, telemetry_interval=0.5, prefix="cl")
    ids = fleet.device_ids()
    recorder = DesiredRecorder(broker.url, ids)
    fleet.start()
    try:
        api.post("/api/v1/deployments", json={"name": NAME, "module": "scorer:1", "target": "sim=true"}
                 ).raise_for_status()
        wait_rollout(api, NAME, "succeeded")
        all_running(api, ids, "scorer", 1)
        r = api.patch(f"/api/v1/deployments/{NAME}", json={"module": "scorer:2", "strategy": "waves:20,60,100",
                                                           "bake_s": 3, "gates": {"max_install_failure_rate": 0.0}})
        assert r.status_code == 200, r.text
        assert r.json()["published"] == 0  # the follower does not sign: the leader publishes the first wave
        wait_until(lambda: rollout(api, NAME)["phase"] == "baking", 60, 0.1, "wave 1 baking")
        leader.kill()
        new = leader_of([follower], timeout=15)
        assert new is follower
        done = wait_rollout(api, NAME, "succeeded", timeout=120)
        all_running(api, ids, "scorer", 2)
    finally:
        fleet.stop()
        recorder.close()
    assert done["counts"] == {"running": n}
    # every wave was started once and the rollout finished once, across the two leaders
    moves = controller_moves(api, done["id"])
    assert [m for m in moves if m[0] == "installing"] == [("installing", 1), ("installing", 2), ("installing", 3)]
    assert moves.count(("succeeded", 3)) == 1
    # no device saw a revision twice with different content, or an older one after a newer one
    db = open_database(db_url)
    try:
        stored = {r["id"]: r["revision"] for r in db.query("SELECT id, revision FROM devices")}
        assert db.scalar("SELECT count(*) FROM devices WHERE desired_published = 0") == 0
    finally:
        db.close()
    for dev, states in recorder.per_device().items():
        revisions = [rev for rev, _ in states]
        assert revisions == sorted(set(revisions)), (dev, revisions)
        versions = [v for _, mods in states for _, v in mods]
        assert versions == sorted(versions), (dev, versions)  # never back to scorer:1 after scorer:2
        assert revisions[-1] == stored[dev]


def test_a_leader_paused_past_its_lease_cannot_publish_once_resumed(replicas, broker, tmp_path):
    (leader, follower), db_url = replicas
    api_old, api_new = leader.client(), follower.client()
    build_versions(api_new, tmp_path, n=2)
    [tok] = api_new.post("/api/v1/enrollment-tokens", json={"labels": {"pause": "yes"}}).json()["tokens"]
    api_new.post("/api/v1/enroll", json={"token": tok, "device_id": "paused-1"}).raise_for_status()
    recorder = DesiredRecorder(broker.url, ["paused-1"])
    try:
        leader.signal(signal.SIGSTOP)
        assert leader_of([follower], timeout=15) is follower
        r = api_new.post("/api/v1/deployments", json={"name": "p1", "module": "scorer:1", "target": "pause=yes"})
        r.raise_for_status()
        wait_until(lambda: len(recorder.per_device().get("paused-1", [])) >= 2, 20, 0.05, "the new leader published")
        leader.signal(signal.SIGCONT)
        # resumed, the old leader knows from its own clock that its lease ran out: it hands the work over
        r = api_old.post("/api/v1/deployments", json={"name": "p2", "module": "scorer:2", "target": "pause=yes",
                                                      "priority": 5})
        assert r.status_code == 200 and r.json()["published"] == 0, r.text
        assert leader.health()["leader"] is False and follower.is_leader()

        def newest() -> tuple | None:
            states = recorder.per_device().get("paused-1", [])
            return states[-1] if states and ("scorer", 2) in states[-1][1] else None
        last = wait_until(newest, 20, 0.05, "scorer:2 published by the leader")
    finally:
        recorder.close()
    db = open_database(db_url)
    try:
        row = db.one("SELECT revision, desired_published FROM devices WHERE id = 'paused-1'")
        epoch = db.scalar("SELECT epoch FROM leases WHERE name = 'leader'")
    finally:
        db.close()
    states = recorder.per_device()["paused-1"]
    revisions = [rev for rev, _ in states]
    assert revisions == sorted(set(revisions)) and last[0] == row["revision"] and row["desired_published"] == 1
    assert epoch >= 2  # the lease changed hands


@pytest.mark.parametrize("victim", ["leader", "follower"])
def test_killing_a_replica_during_ingest_loses_nothing(replicas, broker, victim):
    (leader, follower), db_url = replicas
    api = leader.client()
    devices = [f"ing-{victim[0]}-{i}" for i in range(5)]
    [tok] = api.post("/api/v1/enrollment-tokens", json={"uses": len(devices)}).json()["tokens"]
    for d in devices:
        api.post("/api/v1/enroll", json={"token": tok, "device_id": d}).raise_for_status()
    per_device = 300
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{secrets.token_hex(4)}", protocol=mqtt.MQTTv5)
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    killed = leader if victim == "leader" else follower
    db = open_database(db_url)
    try:
        for seq in range(per_device):
            for d in devices:  # QoS 1, each acknowledged by the broker: the broker has every one of them
                batch = TelemetryBatch(device=d, seq=seq, ts=1_700_000_000.0 + seq, points=[
                    TelemetryPoint(ts=1_700_000_000.0 + seq, module="m", version=1, inferences=2, errors=0)])
                pub.publish(device_topic(d, Channel.TELEMETRY), batch.encode(), qos=1).wait_for_publish(10)
            if seq == per_device // 3:
                wait_until(lambda: db.scalar("SELECT count(*) FROM telemetry_batches") > 0, 20, 0.05, "ingest running")
                killed.kill()  # mid-stream: messages in its hands, unacknowledged, and its share still coming
        total = per_device * len(devices)
        wait_until(lambda: db.scalar("SELECT count(*) FROM telemetry_batches") == total, 90, 0.2,
                   f"all {total} batches stored")
        assert db.query("SELECT device, seq FROM telemetry_batches GROUP BY device, seq HAVING count(*) > 1") == []
        assert db.scalar("SELECT sum(inferences) FROM telemetry_minutes") == 2 * total  # rollups counted once
        # the dead replica's session was adopted and ended (its share went to the survivor, nothing stuck there)
        wait_until(lambda: db.scalar("SELECT count(*) FROM mqtt_sessions WHERE client_id = ?",
                                     (f"hub-{killed.name}",)) == 0, 30, 0.2, "the dead replica's session adopted")
    finally:
        db.close()
        pub.loop_stop()
        pub.disconnect()


def test_ingest_workers_on_their_own_join_the_hubs_group(postgres, broker, tmp_path):
    db_url = postgres.new_database()
    token = f"cluster-{secrets.token_hex(16)}"
    (tmp_path / "shared").mkdir()
    hub = HubProcess("solo", tmp_path / "shared", db_url, broker.url, token, log_dir=tmp_path).start()
    log = (tmp_path / "ingest.log").open("wb")
    worker = subprocess.Popen([sys.executable, "-m", "edgefleet", "hub", "ingest", "--db", db_url, "--mqtt", broker.url,
                               "--processes", "2", "--mqtt-client-id", "elsewhere"], stdout=log,
                              stderr=subprocess.STDOUT, cwd=tmp_path)
    db = open_database(db_url)
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{secrets.token_hex(4)}", protocol=mqtt.MQTTv5)
    try:
        hub.wait_ready()
        with hub.client() as api:
            [tok] = api.post("/api/v1/enrollment-tokens", json={}).json()["tokens"]
            api.post("/api/v1/enroll", json={"token": tok, "device_id": "far-1"}).raise_for_status()
        wait_until(lambda: db.scalar("SELECT count(*) FROM mqtt_sessions WHERE client_id LIKE 'elsewhere-ingest-%'")
                   == 2, 60, 0.1, "both workers connected")
        pub.connect(broker.host, broker.port)
        pub.loop_start()
        for seq in range(400):
            batch = TelemetryBatch(device="far-1", seq=seq, ts=1_700_000_000.0 + seq, points=[
                TelemetryPoint(ts=1_700_000_000.0 + seq, module="m", version=1, inferences=1, errors=0)])
            pub.publish(device_topic("far-1", Channel.TELEMETRY), batch.encode(), qos=1).wait_for_publish(10)
        wait_until(lambda: db.scalar("SELECT count(*) FROM telemetry_batches") == 400, 60, 0.1, "400 stored")
        # the workers on "another machine" took their share of the group's messages, next to the hub
        wait_until(lambda: sum(r["received"] for r in db.query("SELECT received FROM ingest_workers")) > 0, 10, 0.1,
                   "the workers received some")
        assert db.scalar("SELECT sum(received) FROM ingest_workers") < 400  # and the hub the rest
        worker.send_signal(signal.SIGTERM)  # a clean stop ends their sessions: nothing left to adopt
        assert worker.wait(30) == 0
        assert db.scalar("SELECT count(*) FROM mqtt_sessions WHERE client_id LIKE 'elsewhere-%'") == 0
    finally:
        pub.loop_stop()
        pub.disconnect()
        if worker.poll() is None:
            worker.kill()
        db.close()
        hub.stop()
        clear_hub_retained(broker.url)
