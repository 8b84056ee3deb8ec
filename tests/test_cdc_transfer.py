"""Content-defined chunking: the chunker, the release's spans, and delta updates to real agents.

Real parts: pyfastcdc's compiled chunker, the hub (uvicorn + SQLite + MQTT bridge), the session's
mosquitto, real agents with their chunk stores, onnxruntime.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.transfer import BundleFetch
from hub.testing import wait_until
from modules.bundle import build_manifest, sign_release
from modules.chunking import MAX_SIZE, MIN_SIZE, bundle_spans, cut, cut_files
from modules.examples import write_logreg_onnx, write_sample
from modules.store import ContentStore
from protocol.encoding import ProtocolError, canonical_json
from protocol.manifest import CHUNK_SIZE, Manifest, choose_chunks, fixed_chunks, parse_spans
from protocol.messages import DesiredModule
from protocol.signing import load_trusted_root, make_root
from protocol.verify import accept_manifest
from tests.hubside import HubSide, RealHub, agent_running, new_device, running_agent, until

MB = 1024 * 1024
ROOT = Path(__file__).resolve().parents[1]
BEFORE_SPANS = "1423ec01ff68b50e9c4ec19c199ca66ee1d73ef7"  # the last commit whose agent knew nothing of spans


def noise(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).bytes(n)


def digests(data: bytes) -> list[str]:
    return [hashlib.sha256(data[o:o + n]).hexdigest() for o, n in cut(data)]


# --- the chunker -----------------------------------------------------------------------------------


def test_boundaries_are_deterministic_and_within_min_and_max():
    data = noise(8 * MB, 1)
    spans = cut(data)
    assert spans == cut(bytes(data))  # same bytes, same cut
    assert spans[0][0] == 0 and all(o + n == o2 for (o, n), (o2, _) in zip(spans, spans[1:]))
    assert sum(n for _, n in spans) == len(data)
    assert all(MIN_SIZE <= n <= MAX_SIZE for _, n in spans[:-1]) and 0 < spans[-1][1] <= MAX_SIZE
    assert len({n for _, n in spans}) > len(spans) // 2  # content-defined: lengths vary, unlike fixed chunks
    flat = bytes(4 * MB)  # no content to find boundaries in: cut at the maximum
    assert [n for _, n in cut(flat)] == [MAX_SIZE] * 8


def test_an_insertion_at_the_start_changes_only_the_first_span():
    data = noise(8 * MB, 2)
    before = digests(data)
    after = digests(noise(1024, 3) + data)
    new = [d for d in after if d not in set(before)]
    assert new == after[:1]  # one new span; every later one is unchanged
    assert len(after) == len(before)
    # fixed-size chunks, for contrast: every one moves
    fixed = {hashlib.sha256(data[i:i + CHUNK_SIZE]).digest() for i in range(0, len(data), CHUNK_SIZE)}
    shifted = noise(1024, 3) + data
    assert not fixed & {hashlib.sha256(shifted[i:i + CHUNK_SIZE]).digest() for i in range(0, len(shifted), CHUNK_SIZE)}


def test_a_deletion_in_the_middle_changes_only_nearby_spans():
    data = noise(8 * MB, 4)  # a seed where the cut takes four spans to fall back in step (most take one)
    edited = data[:4 * MB] + data[4 * MB + 5000:]
    known = set(digests(data))
    new = [(o, n) for (o, n), d in zip(cut(edited), digests(edited)) if d not in known]
    assert new and all(o + n == o2 for (o, n), (o2, _) in zip(new, new[1:]))  # one run of spans
    assert new[0][0] <= 4 * MB < new[-1][0] + new[-1][1]  # around the edit
    assert sum(n for _, n in new) <= MB  # an eighth of the file; fixed-size chunks would resend half of it


# --- spans in the release ---------------------------------------------------------------------------


def two_file_bundle(tmp_path: Path) -> tuple[Manifest, dict[str, Path]]:
    files = {"model.onnx": write_logreg_onnx(tmp_path / "model.onnx"), "weights.bin": tmp_path / "weights.bin"}
    files["weights.bin"].write_bytes(noise(2 * MB, 5))
    return build_manifest("m", 1, "onnx", files, model="model.onnx"), files


def test_spans_list_only_files_they_cut_differently_and_leave_the_digest_alone(tmp_path):
    manifest, files = two_file_bundle(tmp_path)
    spans = bundle_spans(manifest, cut_files(files))
    assert spans is not None and list(spans.files) == ["weights.bin"]  # model.onnx is one chunk either way
    key = Ed25519PrivateKey.generate()
    root = load_trusted_root(make_root({"root": [key], "release": [key], "director": [key]}, [key]))
    envelope = sign_release(manifest, [key], int(time.time()) + 60, spans)
    # What an agent from before spans checks: the signature, the digest of the manifest as received, and
    # the digest of the manifest as it parsed it (unknown release fields are not part of either).
    accepted = accept_manifest(envelope, root, manifest.digest(), "m")
    assert accepted.digest() == manifest.digest()
    parsed = parse_spans(envelope["signed"], manifest)
    assert sum(n for _, n in parsed["weights.bin"]) == 2 * MB
    assert b"".join(files["weights.bin"].read_bytes()[o:o + n] for o, n in cut(files["weights.bin"].read_bytes())) \
        == files["weights.bin"].read_bytes()


def test_spans_that_contradict_the_manifest_are_refused(tmp_path):
    manifest, files = two_file_bundle(tmp_path)
    doc = {"spans": bundle_spans(manifest, cut_files(files)).to_dict()}  # type: ignore[union-attr]
    weights = doc["spans"]["files"]["weights.bin"]
    for bad, reason in [
        ({"files": {"other.bin": weights}}, "does not list"),
        ({"files": {"weights.bin": weights[:-1]}}, "add up to"),
        ({"files": {"weights.bin": [{**weights[0], "size": 0}, *weights[1:]]}}, r"size: Expected `int` >= 1"),
        ({"files": {"weights.bin": [{**weights[0], "sha256": "x"}, *weights[1:]]}}, "sha256"),
        ({"files": {"weights.bin": weights, "model.onnx": [{"sha256": weights[0]["sha256"],
                                                           "size": manifest.files[0].size}]}}, "two sizes"),
    ]:
        with pytest.raises(ProtocolError, match=reason):
            parse_spans({"spans": {"chunker": "x", **bad}}, manifest)
    assert parse_spans({}, manifest) == {}  # a release from before spans


def test_each_file_is_fetched_by_the_list_with_fewer_bytes_missing(tmp_path):
    manifest, files = two_file_bundle(tmp_path)
    spans = parse_spans({"spans": bundle_spans(manifest, cut_files(files)).to_dict()}, manifest)  # type: ignore[union-attr]
    weights = next(f for f in manifest.files if f.path == "weights.bin")
    store = ContentStore(tmp_path / "store")
    assert choose_chunks(manifest, spans, store.has)["weights.bin"] == spans["weights.bin"]  # empty store: spans
    data = files["weights.bin"].read_bytes()
    for i in range(len(weights.chunks)):  # a device that holds the fixed chunks (it ran an older agent)
        store.put(data[i * CHUNK_SIZE:(i + 1) * CHUNK_SIZE])
    assert choose_chunks(manifest, spans, store.has)["weights.bin"] == fixed_chunks(weights)
    assert choose_chunks(manifest, spans, store.has)["model.onnx"] == fixed_chunks(manifest.files[0])


def test_chunks_of_the_list_a_device_did_not_choose_are_ignored_not_refused(tmp_path):
    """On a shared blob topic, devices from before spans ask for fixed chunks while others fetch spans."""
    manifest, files = two_file_bundle(tmp_path)
    key = Ed25519PrivateKey.generate()
    root = load_trusted_root(make_root({"root": [key], "release": [key], "director": [key]}, [key]))
    envelope = sign_release(manifest, [key], int(time.time()) + 60, bundle_spans(manifest, cut_files(files)))
    refused: list[str] = []
    module = DesiredModule(name="m", version=1, bundle=manifest.digest(), size=manifest.size)
    fetch = BundleFetch("dev", module, root, ContentStore(tmp_path / "chunks"), tmp_path / "manifests",
                        publish=None, reject=lambda kind, topic, reason: refused.append(reason))  # type: ignore[arg-type]
    fetch.on_part("manifest", canonical_json(envelope))
    assert fetch.manifest is not None
    data = files["weights.bin"].read_bytes()
    fixed = data[:CHUNK_SIZE]
    fetch.on_part(hashlib.sha256(fixed).hexdigest(), fixed)  # another device's fixed chunk: not for us
    assert refused == [] and fetch.chunks.stored == 0
    (_, first), *_ = cut(data)
    fetch.on_part(hashlib.sha256(data[:first]).hexdigest(), data[:first])  # our first span: stored
    assert fetch.chunks.stored_bytes == first and refused == []
    stray = data[1:first + 1]
    fetch.on_part(hashlib.sha256(stray).hexdigest(), stray)  # genuine bytes, but no list names them
    assert refused == ["chunk is not listed in the bundle's release"]


# --- real agents ------------------------------------------------------------------------------------


@pytest.fixture
def hubside(broker, tmp_path):
    h = HubSide(broker.url, tmp_path / "hub")
    yield h
    h.close()


def test_a_release_without_spans_installs_and_a_later_release_with_spans_reuses_its_chunks(hubside, tmp_data):
    """A hub from before spans, then an upgraded one: the device keeps working and keeps its delta."""
    device = new_device()
    old = hubside.build("classifier", 1, pad_bytes=2 * MB, pad_seed=9)
    assert "spans" not in old.envelope["signed"]
    new = hubside.build("classifier", 2, pad_bytes=2 * MB, pad_seed=9, spans=True)
    assert "pad.bin" in new.envelope["signed"]["spans"]["files"]

    async def main() -> None:
        async with running_agent(hubside, device, tmp_data) as agent:
            hubside.publish_desired(device, 1, [old.desired()])
            await until(lambda: hubside.module_state(device, "classifier") == "running", 20, "old release running")
            assert set(hubside.chunk_requests(old.digest)) == {c for f in old.manifest.files for c in f.chunks}
            stored = agent.chunks.stored_bytes
            hubside.publish_desired(device, 2, [new.desired()])
            await until(lambda: hubside.reported(device).revision == 2
                        and hubside.module_state(device, "classifier") == "running", 20, "new release running")
            # pad.bin is the same bytes: its fixed chunks are all in the store, so none of its spans is fetched
            assert agent.chunks.stored_bytes - stored < 10_000  # the new model.onnx only
            pad_spans = {s["sha256"] for s in new.envelope["signed"]["spans"]["files"]["pad.bin"]}
            assert not set(hubside.chunk_requests(new.digest)) & pad_spans

    asyncio.run(main())


@pytest.fixture
def hub(broker, tmp_path):
    h = RealHub(broker.url, tmp_path)
    yield h
    h.close()


def build(hub: RealHub, version: int, weights: bytes) -> dict[str, Any]:
    """Register a logreg model with a ``weights.bin`` and build module "detector" from it."""
    d = hub.workdir / f"src-{uuid.uuid4().hex[:8]}"
    d.mkdir(parents=True)
    (d / "weights.bin").write_bytes(weights)
    model = hub.api.register_model("detector-model", [write_logreg_onnx(d / "logreg.onnx", seed=1), d / "weights.bin"])
    built = hub.api.post("/api/v1/modules", {"name": "detector", "models": [f"{model['name']}:{model['version']}"],
                                             "sample": json.loads(write_sample(d / "sample.json").read_text())})
    assert built["version"] == version
    return built


def test_the_hub_leaves_spans_out_of_a_release_they_would_make_too_large(hub, monkeypatch):
    from hub.registry import bundles

    first = hub.api.get(f"/api/v1/bundles/{build(hub, 1, noise(2 * MB, 31))['digest']}/release")
    spans = first["signed"].pop("spans")
    assert len(spans["files"]["weights.bin"]) > 5
    # A limit between the size of such a release without spans and with them (same file sizes, same layout)
    monkeypatch.setattr(bundles, "MAX_ENVELOPE_BYTES", len(canonical_json(first)) + 100)
    big = build(hub, 2, noise(2 * MB, 32))
    assert "spans" not in hub.api.get(f"/api/v1/bundles/{big['digest']}/release")["signed"]
    served = hub.server.hub.downloads
    for f in hub.api.get(f"/api/v1/bundles/{big['digest']}/release")["signed"]["manifest"]["files"]:
        assert all(served.chunk(c).length > 0 for c in f["chunks"])  # the fixed chunks are indexed


@pytest.mark.parametrize("transfer", ["mqtt", "http"])
def test_inserting_1kb_at_the_start_of_a_model_moves_a_few_percent_of_it(hub, tmp_path, transfer):
    size = 6 * MB
    weights = noise(size, 11)
    data = tmp_path / "dev"
    ident = hub.enroll(data)
    v1 = build(hub, 1, weights)
    release = hub.api.get(f"/api/v1/bundles/{v1['digest']}/release")["signed"]
    assert release["spans"]["chunker"].startswith("fastcdc2020/")
    bridge, downloads = hub.server.hub.bridge, hub.server.hub.downloads

    def deploy(module: dict[str, Any]) -> None:
        ref = f"detector:{module['version']}"
        if module["version"] == 1:
            hub.api.post("/api/v1/deployments", {"name": "detector", "target": ident.device_id, "module": ref})
        else:
            hub.api.request("PATCH", "/api/v1/deployments/detector", json={"module": ref})

    def running(module: dict[str, Any]) -> bool:
        mods = hub.api.get(f"/api/v1/devices/{ident.device_id}")["modules"]
        return bool(mods) and mods[0]["bundle"] == module["digest"] and mods[0]["state"] == "running"

    async def main() -> None:
        async with agent_running(ident, data, transfer=transfer, blob_retry=0.3) as agent:
            deploy(v1)
            await until(lambda: running(v1), 60, "v1 running")
            first = agent.chunks.stored_bytes
            assert first >= size  # a fresh device fetches everything once
            sent = bridge.blob_bytes_sent + downloads.bytes_sent
            v2 = build(hub, 2, noise(1024, 12) + weights)
            deploy(v2)
            await until(lambda: running(v2), 60, "v2 running")
            moved = agent.chunks.stored_bytes - first
            hub_moved = bridge.blob_bytes_sent + downloads.bytes_sent - sent
            assert 1024 < moved < 0.05 * size, f"v2 moved {moved} bytes of a {size}-byte file"
            assert hub_moved < 0.05 * size  # chunks (and, over MQTT, the release envelope) the hub sent
            files = {p.name: p.read_bytes() for p in (data / "modules" / "detector" / v2["digest"] / "files").iterdir()}
            assert files["weights.bin"] == noise(1024, 12) + weights  # assembled from old and new spans

    asyncio.run(main())


def test_an_agent_from_before_spans_installs_releases_with_spans(hub, tmp_path):
    """The agent as it was before spans (from git history), run as a daemon against today's hub."""
    old = tmp_path / "old-code"
    old.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", BEFORE_SPANS, "agent", "modules", "protocol"],
                             capture_output=True)
    assert archive.returncode == 0, f"needs the repository's history with {BEFORE_SPANS}: {archive.stderr.decode()}"
    (tmp_path / "old.tar").write_bytes(archive.stdout)
    with tarfile.open(tmp_path / "old.tar") as tar:
        tar.extractall(old, filter="data")
    weights = noise(3 * MB, 21)
    data = tmp_path / "dev"
    ident = hub.enroll(data)
    v1 = build(hub, 1, weights)
    v2 = build(hub, 2, noise(1024, 22) + weights)
    assert "weights.bin" in hub.api.get(f"/api/v1/bundles/{v2['digest']}/release")["signed"]["spans"]["files"]

    def state(module: dict[str, Any]) -> str | None:
        mods = hub.api.get(f"/api/v1/devices/{ident.device_id}")["modules"]
        return mods[0]["state"] if mods and mods[0]["bundle"] == module["digest"] else None

    assert "spans" not in (old / "agent" / "transfer.py").read_text()
    # ``-m`` puts the working directory first on sys.path: the old agent, modules and protocol packages load
    proc = subprocess.Popen([sys.executable, "-m", "agent", "--data", str(data), "--api-port", "0",
                             "--log-level", "WARNING"], cwd=old)
    try:
        hub.api.post("/api/v1/deployments", {"name": "detector", "target": ident.device_id, "module": "detector:1"})
        wait_until(lambda: state(v1) in ("running", "failed") or proc.poll() is not None, 60, what="v1 installed")
        assert state(v1) == "running"
        hub.api.request("PATCH", "/api/v1/deployments/detector", json={"module": "detector:2"})
        wait_until(lambda: state(v2) in ("running", "failed") or proc.poll() is not None, 60, what="v2 installed")
        assert state(v2) == "running"  # fetched by its fixed-size chunks, as before
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
