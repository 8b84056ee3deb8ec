"""A device cannot make the hub republish bundles without bound (issue 13: any device made the hub send 20 MB for
5.5 KB of requests, every 30 s). A real paho client holding an enrolled device's id spams blob requests; the
bytes the hub publishes stay within that device's budget, counted, and another device is still served."""

from __future__ import annotations

import os
import time

import httpx
import pytest

from hub.mqtt.blob_carousel import Carousel
from hub.mqtt.ratelimit import MANIFEST_COST, DeviceBudgets
from hub.testing import MqttProbe, wait_until
from modules.examples import write_logreg_onnx
from protocol.manifest import CHUNK_SIZE
from protocol.messages import BlobRequest
from protocol.signing import load_trusted_root
from protocol.topics import MANIFEST_PART, Channel, blob_wildcard, device_topic
from protocol.verify import accept_manifest

BURST, RATE = 4 * CHUNK_SIZE, 2 * CHUNK_SIZE  # bytes, bytes/s: small, to reach them with a small bundle


@pytest.fixture
def hub_options():
    return {"blob_gather_s": 0, "blob_device_burst_bytes": BURST, "blob_device_rate_bps": RATE}  # per-device copies


def big_module(admin: httpx.Client, tmp_path) -> tuple[str, list[str]]:
    """A module whose bundle has ~10 chunks (a model file and 2.3 MB of weights beside it): (digest, chunks)."""
    model = write_logreg_onnx(tmp_path / "model.onnx")
    admin.post("/api/v1/models", data={"name": "big"}, files=[
        ("files", ("model.onnx", model.read_bytes())), ("files", ("weights.bin", os.urandom(9 * CHUNK_SIZE)))
    ]).raise_for_status()
    built = admin.post("/api/v1/modules", json={"name": "big", "models": ["big:1"]}).json()
    manifest = accept_manifest(admin.get(f"/api/v1/bundles/{built['digest']}/release").json(),
                               load_trusted_root(admin.get("/api/v1/root").json()), built["digest"], "big")
    return built["digest"], [c for f in manifest.files for c in f.chunks]


def test_a_device_spamming_blob_requests_gets_its_budget_and_no_more(server, admin, tmp_path):
    bundle, chunks = big_module(admin, tmp_path)
    assert len(chunks) >= 10
    tokens = admin.post("/api/v1/enrollment-tokens", json={"count": 2}).json()["tokens"]
    for token, device in zip(tokens, ("spammer", "patient")):
        httpx.post(server.url + "/api/v1/enroll", json={"token": token, "device_id": device}).raise_for_status()

    watcher = MqttProbe(server.hub.config.mqtt_url)  # what actually goes out on the bundle's topic
    spammer = MqttProbe(server.hub.config.mqtt_url)  # a real client publishing as the enrolled device
    try:
        watcher.subscribe(blob_wildcard(bundle))
        bridge = server.hub.bridge
        before = bridge.processed.get(Channel.BLOB_REQ.value, 0)
        ask_all = BlobRequest(device="spammer", bundle=bundle, manifest=True, chunks=chunks).encode()
        n, started = 60, time.monotonic()
        for _ in range(n):  # unbounded, this is 60 copies of the bundle: ~140 MB
            spammer.publish(device_topic("spammer", Channel.BLOB_REQ), ask_all)
        wait_until(lambda: bridge.processed.get(Channel.BLOB_REQ.value, 0) >= before + n, 30, what="the requests")
        elapsed = time.monotonic() - started
        budget = BURST + RATE * elapsed  # what the bucket can have paid for (a chunk costs at least its size)
        assert bridge.blob_bytes_sent <= budget, (bridge.blob_bytes_sent, budget)
        assert bridge.budgets.limited >= n // 2
        metrics = httpx.get(server.url + "/metrics").text
        assert f"edgefleet_hub_blob_requests_limited_total {bridge.budgets.limited}" in metrics
        watcher.wait_for(lambda ms: sum(len(m.payload) for m in ms) == bridge.blob_bytes_sent, 10)  # all out

        # the spammer's budget is its own: another device still gets what it asks for, at once
        seen = len(watcher.messages)
        ask_some = BlobRequest(device="patient", bundle=bundle, manifest=True, chunks=chunks[:3])
        spammer.publish(device_topic("patient", Channel.BLOB_REQ), ask_some.encode())
        watcher.wait_for(lambda ms: {MANIFEST_PART, *chunks[:3]} <= {m.topic.rsplit("/", 1)[1] for m in ms[seen:]}, 10)
    finally:
        watcher.close()
        spammer.close()


def test_the_budget_refills_at_its_rate_and_forgets_idle_devices():
    budgets = DeviceBudgets(burst=4 * CHUNK_SIZE, rate=CHUNK_SIZE)
    parts = [MANIFEST_PART] + [f"c{i}" for i in range(6)]
    assert budgets.admit("d", parts, now=0.0) == parts[:4]  # manifest + 3 chunks fit in 4 chunks' worth
    assert budgets.admit("d", parts[4:], now=0.5) == ["c3"]  # half a chunk more: room for one
    assert budgets.admit("d", ["c4"], now=0.6) == []
    assert budgets.limited == 3 and budgets.refused_bytes == (3 + 2 + 1) * CHUNK_SIZE
    assert budgets.admit("other", parts, now=1.5) == parts[:4]  # per device
    assert budgets.admit("d", ["x"], now=1000.0) == ["x"]
    budgets._prune(now=10_000.0)
    assert len(budgets) == 0  # full buckets hold nothing worth keeping
    assert DeviceBudgets(burst=0, rate=0).admit("d", parts * 100, now=0.0) == parts * 100  # off
    with pytest.raises(ValueError):
        DeviceBudgets(burst=MANIFEST_COST, rate=1)


def test_the_carousel_charges_a_device_only_for_what_it_newly_waits_for():
    c = Carousel(quiet=1.0, max_hold=30, covered=30)
    charged: list[list[str]] = []

    def admit(parts: list[str]) -> list[str]:
        charged.append(list(parts))
        return parts[:2]

    c.request("b", "d", True, ["c1", "c2"], now=0.0, admit=admit)
    assert charged == [[MANIFEST_PART, "c1", "c2"]] and c.pending("b") == {MANIFEST_PART: {"d"}, "c1": {"d"}}
    c.request("b", "d", True, ["c1", "c2"], now=0.1, admit=admit)  # it waits for two already: charged for c2 only
    assert charged[-1] == ["c2"] and set(c.pending("b")) == {MANIFEST_PART, "c1", "c2"}
