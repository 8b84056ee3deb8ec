"""The MQTT bridge against the real broker: bundle transfer, coalescing, hostile input, de-duplication."""

from __future__ import annotations

import json
import os
import re
import secrets

import httpx
import pytest

from hub import HubServer
from hub.testing import wait_until
from modules.examples import write_logreg_onnx
from protocol.encoding import sha256_hex
from protocol.manifest import CHUNK_SIZE
from protocol.messages import BlobRequest, DataBatch, DataRecord, TelemetryBatch, TelemetryPoint
from protocol.signing import load_trusted_root
from protocol.topics import Channel, blob_wildcard, device_topic
from protocol.verify import accept_manifest

pytestmark = pytest.mark.hubstore  # run again on PostgreSQL by scripts/test.sh

INBOUND = (Channel.REPORTED, Channel.STATUS, Channel.TELEMETRY, Channel.DATA, Channel.BLOB_REQ, Channel.CMD_RES)


@pytest.fixture
def device(admin, server) -> str:
    token = admin.post("/api/v1/enrollment-tokens", json={}).json()["tokens"][0]
    device_id = f"t-{secrets.token_hex(4)}"
    httpx.post(server.url + "/api/v1/enroll", json={"token": token, "device_id": device_id}).raise_for_status()
    return device_id


def metric(server: HubServer, name: str, channel: str | None = None) -> float:
    text = httpx.get(server.url + "/metrics").text
    labels = f'{{channel="{channel}"}}' if channel else ""
    match = re.search(rf"^{name}{re.escape(labels)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def processed(server: HubServer, channel: Channel) -> int:
    return server.hub.bridge.processed[channel.value]


def telemetry(device: str, seq: int, n: int = 3) -> TelemetryBatch:
    points = [TelemetryPoint(ts=1000.0 + seq * 10 + i, module="scorer", version=1, inferences=10 + i, errors=i)
              for i in range(n)]
    return TelemetryBatch(device=device, seq=seq, ts=1000.0 + seq, points=points)


def test_blob_request_serves_manifest_and_chunks_once_per_pass(admin, server, probe, device, tmp_path):
    model = write_logreg_onnx(tmp_path / "model.onnx")
    weights = os.urandom(2 * CHUNK_SIZE + 1234)  # three chunks: the transfer spans several parts
    admin.post("/api/v1/models", data={"name": "big"}, files=[
        ("files", ("model.onnx", model.read_bytes())), ("files", ("weights.bin", weights))]).raise_for_status()
    bundle = admin.post("/api/v1/modules", json={"name": "big", "models": ["big:1"]}).json()["digest"]
    envelope = admin.get(f"/api/v1/bundles/{bundle}/release").json()
    chunks = [c for f in envelope["signed"]["manifest"]["files"] for c in f["chunks"]]
    assert len(chunks) == 4

    probe.subscribe(blob_wildcard(bundle))
    request = BlobRequest(device=device, bundle=bundle, manifest=True, chunks=chunks).encode()
    before = processed(server, Channel.BLOB_REQ)
    probe.publish(device_topic(device, Channel.BLOB_REQ), request)
    probe.publish(device_topic(device, Channel.BLOB_REQ), request)  # asking again: waiting already, or covered
    wait_until(lambda: processed(server, Channel.BLOB_REQ) == before + 2, what="both requests handled")
    got = probe.wait_for(lambda m: len(m) >= 1 + len(chunks))

    parts = {m.topic.rsplit("/", 1)[1]: m.payload for m in got}
    assert len(got) == len(parts) == 1 + len(chunks)  # every part exactly once
    root = load_trusted_root(admin.get("/api/v1/root").json())
    manifest = accept_manifest(json.loads(parts.pop("manifest")), root, bundle, "big")
    assert all(sha256_hex(data) == digest for digest, data in parts.items())
    assert b"".join(parts[c] for c in manifest.files[1].chunks) == weights  # weights.bin, sorted after model.onnx
    sent = metric(server, "edgefleet_hub_blob_bytes_sent_total")
    assert sent == sum(len(m.payload) for m in got)

    rejected = metric(server, "edgefleet_hub_messages_rejected_total", "blob-req")
    unknown = BlobRequest(device=device, bundle=bundle, chunks=["0" * 64]).encode()
    probe.publish(device_topic(device, Channel.BLOB_REQ), unknown)
    wait_until(lambda: metric(server, "edgefleet_hub_messages_rejected_total", "blob-req") == rejected + 1)


def test_hostile_input_on_every_channel_is_rejected_and_hub_keeps_serving(admin, server, probe, device):
    stranger = f"t-{secrets.token_hex(4)}"
    for channel in INBOUND:
        topic = device_topic(device, channel)
        before = metric(server, "edgefleet_hub_messages_rejected_total", channel.value)
        bad = [
            b"not json at all {",
            json.dumps({"v": 2, "device": device, "online": True, "id": "x", "ok": True}).encode(),
            json.dumps({"v": 1}).encode(),
            os.urandom(1024 * 1024),
            json.dumps({"v": 1, "device": "someone-else", "online": True, "revision": 0, "ts": 1, "seq": 1,
                        "points": [], "records": [], "bundle": "a" * 64}).encode(),
        ]
        for payload in bad:
            probe.publish(topic, payload)
        probe.publish(device_topic(stranger, channel), b"{}")  # not enrolled
        want = before + len(bad) + 1
        wait_until(lambda ch=channel.value, want=want: metric(server, "edgefleet_hub_messages_rejected_total", ch)
                   >= want, what=f"rejections on {channel.value}")

    probe.publish(device_topic(device, Channel.TELEMETRY), telemetry(device, seq=1).encode())
    rows = wait_until(lambda: admin.get("/api/v1/telemetry", params={"device": device}).json(), what="telemetry")
    assert [r["ts"] for r in rows] == [1012.0, 1011.0, 1010.0]  # newest first
    assert httpx.get(server.url + "/healthz").json()["mqtt_connected"] is True


def test_replayed_batches_are_stored_once(admin, server, probe, device):
    before = processed(server, Channel.TELEMETRY)
    batch = telemetry(device, seq=7).encode()
    probe.publish(device_topic(device, Channel.TELEMETRY), batch)
    probe.publish(device_topic(device, Channel.TELEMETRY), batch)
    probe.publish(device_topic(device, Channel.TELEMETRY), telemetry(device, seq=8, n=1).encode())
    records = [DataRecord(ts=1.0, module="scorer", version=1, input={"x": [[1, 2, 3, 4]]}, output={"p": [[0.5]]})] * 2
    data = DataBatch(device=device, seq=3, ts=1.0, records=records).encode()
    probe.publish(device_topic(device, Channel.DATA), data)
    probe.publish(device_topic(device, Channel.DATA), data)
    wait_until(lambda: processed(server, Channel.TELEMETRY) == before + 3 and processed(server, Channel.DATA) >= 2,
               what="all batches handled")
    assert server.hub.bridge.writer.wait_idle(10)

    rows = admin.get("/api/v1/telemetry", params={"device": device, "module": "scorer"}).json()
    assert len(rows) == 4
    assert metric(server, "edgefleet_hub_telemetry_rows_total") == 4
    stored = server.hub.db.scalar("SELECT count(*) FROM data_records WHERE device = ?", (device,))
    assert stored == 2
    shown = admin.get(f"/api/v1/devices/{device}").json()
    assert shown["inferences"] == 10 + 11 + 12 + 10 and shown["errors"] == 0 + 1 + 2 + 0
