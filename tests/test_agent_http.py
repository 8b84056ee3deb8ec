"""Bundles over HTTP(S) from the real hub: device credentials, Range, the same verification, resume after a restart.

Real parts: the hub (uvicorn + SQLite + MQTT bridge), the session's mosquitto, real agents (in this
process, and one ``python -m agent --transfer http`` daemon), real onnxruntime.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from agent.core import Agent
from agent.identity import Identity, save_identity
from hub.testing import MqttProbe, wait_until
from modules.examples import write_logreg_onnx, write_sample
from protocol.encoding import canonical_json
from protocol.manifest import CHUNK_SIZE, Manifest, choose_chunks, parse_spans
from protocol.messages import DesiredModule, DesiredState, decode
from protocol.schema import validate
from protocol.signing import sign
from protocol.topics import Channel, device_topic
from tests.hubside import RealHub, agent_running, until

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def hub(broker, tmp_path):
    h = RealHub(broker.url, tmp_path)
    yield h
    h.close()


def build(hub: RealHub, name: str, extra: dict[str, bytes] | None = None, entry: str | None = None,
          seed: int = 1) -> dict[str, Any]:
    """Register a logreg model (plus ``extra`` files) and build module ``name`` from it; the module record."""
    d = hub.workdir / f"src-{uuid.uuid4().hex[:8]}"
    d.mkdir(parents=True)
    paths = [write_logreg_onnx(d / "logreg.onnx", seed=seed)]
    for path, data in (extra or {}).items():
        (d / path).write_bytes(data)
        paths.append(d / path)
    model = hub.api.register_model(f"{name}-model", paths)
    body: dict[str, Any] = {"name": name, "models": [f"{model['name']}:{model['version']}"],
                            "sample": json.loads(write_sample(d / "sample.json").read_text())}
    if entry is not None:
        body["entry"] = entry
    return hub.api.post("/api/v1/modules", body)


def deploy(hub: RealHub, device: str, module: dict[str, Any], **options: Any) -> None:
    hub.api.post("/api/v1/deployments", {"name": f"{module['name']}-{device}", "target": device,
                                         "module": f"{module['name']}:{module['version']}", **options})


def hub_view(hub: RealHub, device: str) -> dict[str, Any] | None:
    """The module as the hub shows it (from the device's reported state)."""
    modules = hub.api.get(f"/api/v1/devices/{device}")["modules"]
    return modules[0] if modules else None


def manifest(hub: RealHub, module: dict[str, Any]) -> dict[str, Any]:
    return hub.api.get(f"/api/v1/bundles/{module['digest']}/release")["signed"]["manifest"]


def file_entry(hub: RealHub, module: dict[str, Any], path: str) -> dict[str, Any]:
    return next(f for f in manifest(hub, module)["files"] if f["path"] == path)


def fresh_chunks(hub: RealHub, module: dict[str, Any], path: str | None = None) -> list[tuple[str, int]]:
    """(digest, size) of what a device with an empty store fetches: each file's spans, or its fixed chunks."""
    signed = hub.api.get(f"/api/v1/bundles/{module['digest']}/release")["signed"]
    m = validate(Manifest, signed["manifest"])
    chosen = choose_chunks(m, parse_spans(signed, m), lambda digest: False)
    return [c for p, chunks in chosen.items() if path in (None, p) for c in chunks]


def blob(hub: RealHub, module: dict[str, Any], path: str) -> Path:
    """The hub's content-store file holding ``path`` of the module's bundle."""
    return hub.server.hub.store.path(file_entry(hub, module, path)["sha256"])


def corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:16] = bytes(b ^ 0xFF for b in data[:16])
    path.write_bytes(bytes(data))


def running(identity: Identity, data: Path, **kw: Any) -> contextlib.AbstractAsyncContextManager[Agent]:
    kw.setdefault("blob_retry", 0.3)
    return agent_running(identity, data, transfer="http", **kw)


def basic(device: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{device}:{password}".encode()).decode()}


def test_device_routes_authenticate_the_device_and_serve_ranges(hub, tmp_path):
    ident = hub.enroll(tmp_path / "dev")
    weights = os.urandom(CHUNK_SIZE + 5000)
    module = build(hub, "classifier", extra={"weights.bin": weights})
    chunk = file_entry(hub, module, "weights.bin")["chunks"][0]
    url = hub.server.url + "/api/v1/device"
    auth = basic(ident.device_id, ident.mqtt_password)
    downloads = hub.server.hub.downloads

    release = httpx.get(f"{url}/bundles/{module['digest']}/release", headers=auth)
    assert release.status_code == 200
    assert release.content == canonical_json(hub.api.get(f"/api/v1/bundles/{module['digest']}/release"))

    whole = httpx.get(f"{url}/chunks/{chunk}", headers=auth)
    assert whole.status_code == 200 and whole.content == weights[:CHUNK_SIZE]
    assert whole.headers["accept-ranges"] == "bytes" and whole.headers["etag"] == f'"{chunk}"'
    rest = httpx.get(f"{url}/chunks/{chunk}", headers={**auth, "Range": "bytes=1000-"})
    assert rest.status_code == 206 and rest.content == weights[1000:CHUNK_SIZE]
    assert rest.headers["content-range"] == f"bytes 1000-{CHUNK_SIZE - 1}/{CHUNK_SIZE}"
    tail = httpx.get(f"{url}/chunks/{chunk}", headers={**auth, "Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == weights[CHUNK_SIZE - 10:CHUNK_SIZE]
    past = httpx.get(f"{url}/chunks/{chunk}", headers={**auth, "Range": f"bytes={CHUNK_SIZE}-"})
    assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{CHUNK_SIZE}"

    refusals = [
        ({}, 401, "need HTTP Basic credentials", "no_credentials"),
        (basic(ident.device_id, "guess"), 401, f"wrong password for device {ident.device_id!r}", "wrong_password"),
        (basic("nobody-here", "x"), 401, "'nobody-here' is not enrolled", "unknown_device"),
    ]
    for headers, status, detail, reason in refusals:
        before = downloads.refused[reason]
        resp = httpx.get(f"{url}/chunks/{chunk}", headers=headers)
        assert resp.status_code == status and detail in resp.json()["detail"]
        assert resp.headers["www-authenticate"].startswith("Basic")
        assert downloads.refused[reason] == before + 1
    missing = httpx.get(f"{url}/chunks/{'0' * 64}", headers=auth)
    assert missing.status_code == 404 and "no released chunk" in missing.json()["detail"]
    assert httpx.get(f"{url}/bundles/{'0' * 64}/release", headers=auth).status_code == 404

    hub.api.request("DELETE", f"/api/v1/devices/{ident.device_id}")
    gone = httpx.get(f"{url}/chunks/{chunk}", headers=auth)
    assert gone.status_code == 403 and "was decommissioned at" in gone.json()["detail"]
    metrics = httpx.get(hub.server.url + "/metrics").text
    assert 'edgefleet_hub_device_http_refused_total{reason="decommissioned"} 1' in metrics


def test_http_daemon_installs_and_runs_with_no_bundle_bytes_over_mqtt(hub, tmp_path):
    data = tmp_path / "dev"
    ident = hub.enroll(data)
    assert json.loads((data / "identity.json").read_text())["hub_url"] == hub.server.url
    module = build(hub, "classifier", extra={"weights.bin": os.urandom(CHUNK_SIZE + 1000)})
    proc = subprocess.Popen([sys.executable, "-m", "agent", "--data", str(data), "--transfer", "http",
                             "--api-port", "0", "--telemetry-interval", "0.5", "--log-level", "WARNING"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deploy(hub, ident.device_id, module)
        wait_until(lambda: (m := hub_view(hub, ident.device_id)) and m["state"] == "running", 60,
                   what="module running", interval=0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    chunk_bytes = dict(fresh_chunks(hub, module))
    assert hub.server.hub.bridge.blob_bytes_sent == 0  # nothing came over the MQTT blob topics
    assert hub.server.hub.downloads.bytes_sent == sum(chunk_bytes.values())  # each chunk once, over HTTP
    assert hub.server.hub.downloads.chunks_served == len(chunk_bytes)
    assert not list((data / "downloads").iterdir())  # no partial chunk left behind


def test_a_chunk_corrupted_in_the_hub_store_is_refused_and_nothing_activates(hub, tmp_path):
    data = tmp_path / "dev"
    ident = hub.enroll(data)
    module = build(hub, "classifier")
    corrupt(blob(hub, module, "logreg.onnx"))
    bad_chunk = fresh_chunks(hub, module, "logreg.onnx")[0][0]

    async def main() -> None:
        async with running(ident, data) as agent:
            deploy(hub, ident.device_id, module)
            view = await until(lambda: (m := hub_view(hub, ident.device_id)) and m["state"] == "failed" and m, 30,
                               "install failed at the hub")
            assert "do not hash to the digest" in view["error"] and bad_chunk[:12] in view["error"]
            assert agent.rejected["blob"] == 3  # asked three times, refused each time
            assert agent.installer.current("classifier") is None and not agent.active
            assert not agent.chunks.has(bad_chunk)
            assert not (data / "modules" / "classifier" / module["digest"]).exists()

    asyncio.run(main())


def test_wrong_password_and_decommissioned_device_are_refused_with_the_reason_reported(hub, broker, tmp_path):
    module = build(hub, "classifier")
    real = hub.enroll(tmp_path / "a")
    wrong = dataclasses.replace(real, mqtt_password="not-the-password")
    save_identity(tmp_path / "a", wrong)
    gone = hub.enroll(tmp_path / "b")
    hub.api.request("DELETE", f"/api/v1/devices/{gone.device_id}")
    # The hub forgot the device; a desired state it signed earlier (here: now) still names the bundle.
    state = DesiredState(device=gone.device_id, revision=1, expires=int(time.time()) + 3600, modules=[
        DesiredModule(name="classifier", version=module["version"], bundle=module["digest"], size=module["size"])])
    probe = MqttProbe(broker.url)
    desired_topic = device_topic(gone.device_id, Channel.DESIRED)

    def reported_error() -> str:
        msgs = [m for m in probe.messages if m.topic == device_topic(gone.device_id, Channel.REPORTED) and m.payload]
        mods = decode(Channel.REPORTED, msgs[-1].payload).modules if msgs else []
        return mods[0].error if mods and mods[0].state == "failed" else ""

    async def main() -> None:
        async with running(wrong, tmp_path / "a"):
            deploy(hub, wrong.device_id, module)
            view = await until(lambda: (m := hub_view(hub, wrong.device_id)) and m["state"] == "failed" and m, 30,
                               "install refused at the hub")
            assert "HTTP 401" in view["error"] and f"wrong password for device {wrong.device_id!r}" in view["error"]
        probe.subscribe(device_topic(gone.device_id, Channel.REPORTED))
        probe.publish(desired_topic, canonical_json(sign(state.to_dict(), [hub.server.hub.keys.director_key])),
                      retain=True)
        async with running(gone, tmp_path / "b") as agent:
            error = await until(reported_error, 30, "refusal reported on the reported-state topic")
            assert "HTTP 403" in error and "was decommissioned at" in error
            assert agent.installer.current("classifier") is None

    try:
        asyncio.run(main())
    finally:
        probe.publish(desired_topic, b"", retain=True)
        probe.close()
    assert hub.server.hub.downloads.refused["wrong_password"] >= 1
    assert hub.server.hub.downloads.refused["decommissioned"] >= 1


def test_a_restart_mid_download_fetches_only_what_is_missing(hub, tmp_path):
    data = tmp_path / "dev"
    ident = hub.enroll(data)
    # Three spans (seed 0): fewer than the agent's 4 download workers, so while each retries an unservable
    # weights chunk one stays free to fetch the other files (a worker keeps retrying the chunk it holds).
    weights = np.random.default_rng(0).bytes(CHUNK_SIZE + 100_000)
    module = build(hub, "classifier", extra={"weights.bin": weights})
    weights_chunks = [c for c, _ in fresh_chunks(hub, module, "weights.bin")]
    assert len(weights_chunks) == 3
    others = [c for c, _ in fresh_chunks(hub, module) if c not in weights_chunks]
    weights_blob = blob(hub, module, "weights.bin")
    away = weights_blob.with_name(weights_blob.name + ".away")
    weights_blob.rename(away)  # the hub cannot serve weights.bin for now: the first run stops part-way
    downloads = hub.server.hub.downloads

    async def first_run() -> None:
        async with running(ident, data) as agent:
            deploy(hub, ident.device_id, module)
            view = await until(lambda: (m := hub_view(hub, ident.device_id)) and "HTTP 500" in m["error"] and m, 30,
                               "transfer trouble reported")
            assert view["state"] == "downloading" and "blob is unreadable" in view["error"]
            await until(lambda: all(agent.chunks.has(c) for c in others), 10, "the servable chunks stored")
            assert not any(agent.chunks.has(c) for c in weights_chunks)

    async def second_run() -> None:
        async with running(ident, data) as agent:
            await until(lambda: (m := hub_view(hub, ident.device_id)) and m["state"] == "running", 30, "running")
            assert agent.rejected["blob"] == 0  # a re-fetched stored chunk would have been refused

    asyncio.run(first_run())
    sent = downloads.bytes_sent
    away.rename(weights_blob)
    corrupt(blob(hub, module, "logreg.onnx"))  # fetching a stored chunk again would now fail the install
    partial = data / "downloads" / weights_chunks[0]
    partial.parent.mkdir(exist_ok=True)
    partial.write_bytes(weights[:1000])  # a chunk cut short by the restart: resumed with a Range request
    asyncio.run(second_run())
    assert downloads.bytes_sent - sent == len(weights) - 1000
    assert (data / "modules" / "classifier" / "current").readlink().name == module["digest"]


def test_an_identity_from_before_the_hub_url_loads_and_http_mode_says_what_is_missing(hub, tmp_path):
    from agent.identity import load_identity

    data = tmp_path / "old"
    ident = hub.enroll(data)
    raw = json.loads((data / "identity.json").read_text())
    del raw["hub_url"]  # as an older agent wrote it
    (data / "identity.json").write_text(json.dumps(raw))
    old = load_identity(data)
    assert old.hub_url is None and old.device_id == ident.device_id
    Agent(old, data, transfer="mqtt")  # the default transfer needs no hub URL
    with pytest.raises(ValueError, match="predates it"):
        Agent(old, data, transfer="http")
    with pytest.raises(ValueError, match="is not http"):
        Agent(old, data, transfer="http", hub_url="ftp://hub")
    proc = subprocess.run([sys.executable, "-m", "agent", "--data", str(data), "--api-port", "0"], cwd=ROOT,
                          env={**os.environ, "EDGEFLEET_TRANSFER": "http"}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "pass --hub-url or enrol again" in proc.stderr
