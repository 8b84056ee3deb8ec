"""A device written from docs/protocol.md alone (tests/docdevice.py) against a real hub on a real mosquitto with
the hub's password file and ACL: enrol, get a model deployed, write byte-identical files, show running and online,
and refuse tampered documents."""

from __future__ import annotations

import copy
import json
import random
import time

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from edgefleet.broker import LocalBroker
from hub import HubConfig, HubServer
from hub.fleet.broker_auth import BrokerAuth
from hub.testing import wait_until
from modules.examples import write_logreg_onnx, write_sample
from tests.docdevice import DocDevice, P, Refused, canonical, check_release, load_root, sha256
from tests.pg import hub_db


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """mosquitto on the hub's password file and ACL (as ``hub serve --isolate`` runs it) and the hub on it."""
    monkeypatch.delenv("EDGEFLEET_ADMIN_TOKEN", raising=False)
    data = tmp_path / "hub"
    auth = BrokerAuth(data / "broker")
    auth.write([])
    broker = LocalBroker(kind="mosquitto", password_file=auth.password_file, acl_file=auth.acl_file).start()
    server = HubServer(HubConfig(data, auth.hub_url(broker.url), public_mqtt_url=broker.url, isolate=True,
                                 broker_pid=broker.proc.pid, **hub_db(data))).start()
    assert server.wait_mqtt(10)
    admin = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.admin_token}"}, timeout=30)
    try:
        yield server, admin
    finally:
        admin.close()
        server.stop()
        broker.stop()


def test_a_device_written_from_the_docs_installs_reports_and_refuses_tampering(isolated, tmp_path):
    server, admin = isolated
    model_file = write_logreg_onnx(tmp_path / "logreg.onnx", seed=7)
    weights = tmp_path / "weights.bin"  # large and random: the release lists content-defined spans for it
    weights.write_bytes(random.Random(7).randbytes(1_500_000))
    r = admin.post("/api/v1/models", data={"name": "doc-model"},
                   files=[("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in (model_file, weights)])
    assert r.status_code in (200, 201), r.text
    sample = json.loads(write_sample(tmp_path / "sample.json").read_text())
    module = admin.post("/api/v1/modules", json={"name": "doc-mod", "models": ["doc-model:1"], "sample": sample})
    assert module.status_code in (200, 201), module.text
    built = module.json()
    [token] = admin.post("/api/v1/enrollment-tokens", json={}).json()["tokens"]

    out = tmp_path / "device"
    device = DocDevice(server.url, token, "doc-1", out, {"os": "docs-only"}).start(telemetry_interval=0.5)
    try:
        r = admin.post("/api/v1/deployments", json={"name": "doc", "module": f"doc-mod:{built['version']}",
                                                    "target": "doc-1"})
        assert r.status_code in (200, 201), r.text

        def running() -> dict | None:
            d = admin.get("/api/v1/devices/doc-1").json()
            mods = [(m["name"], m["version"], m["bundle"], m.get("state")) for m in d.get("modules", [])]
            return d if d.get("online") and mods == [("doc-mod", built["version"], built["digest"], "running")] else None

        view = wait_until(running, 45, interval=0.2, what="the hub to show doc-mod running on doc-1")
        assert view["last_seen"], view
        dep = wait_until(lambda: (d := admin.get("/api/v1/deployments/doc").json())["rollout"]["state"] == "succeeded"
                         and d, 20, interval=0.2, what="the deployment's rollout to succeed")
        assert dep["counts"] == {"running": 1} and dep["bundle"] == built["digest"], dep
        def telemetry() -> list[dict]:
            rows = admin.get("/api/v1/telemetry", params={"device": "doc-1"}).json()
            return rows.get("items", rows) if isinstance(rows, dict) else rows

        rows = wait_until(telemetry, 20, interval=0.2, what="the device's telemetry at the hub")
        assert {r["module"] for r in rows} == {"doc-mod"}, rows
        assert [d["id"] for d in admin.get("/api/v1/devices", params={"status": "online"}).json()] == ["doc-1"]

        written = out / "doc-mod" / str(built["version"])
        [onnx] = [p for p in written.rglob("*.onnx")]
        assert onnx.read_bytes() == model_file.read_bytes()
        [blob] = [p for p in written.rglob("weights.bin")]
        assert blob.read_bytes() == weights.read_bytes()
        assert device.spans_used, "the release listed no spans: the CDC path went untested"
        assert device.refused == {}, device.refused

        tampered_states_are_refused(server, device)
        tampered_releases_are_refused(server, device)
        assert [m["state"] for m in device.reports] == ["running"]
        wait_until(lambda: "forbidden" in admin.get("/api/v1/devices/doc-1").json()["reported"]["error"], 10,
                   what="the last refusal reported to the hub")

        # a director key rotation: root 2 on root/+ and a state re-signed by the new key, in either order (§10)
        applied = device.applied["signed"]  # type: ignore[index]
        r = admin.post("/api/v1/keys/rotate", json={"role": "director"})
        assert r.status_code == 200 and r.json()["resigned_states"] >= 1, r.text

        def moved_on() -> dict | None:
            d = admin.get("/api/v1/devices/doc-1").json()
            ok = d["reported_revision"] == d["revision"] > applied["revision"] and d["state"] == "running"
            return d if ok and not d["reported"]["error"] else None

        wait_until(moved_on, 20, interval=0.2, what="the device to accept the state re-signed after the rotation")
        assert device.root["version"] == 2 and device.refused["root"] == 1  # the forged root of earlier only
        assert device.applied["signed"]["modules"] == applied["modules"]  # type: ignore[index]
    finally:
        device.stop()
    wait_until(lambda: admin.get("/api/v1/devices/doc-1").json()["online"] is False, 10, what="offline after stop")


def sign(signed: dict, key: Ed25519PrivateKey) -> dict:
    """An envelope as §7 describes it, signed by one of the hub's own keys (the test is the operator)."""
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return {"signed": signed, "signatures": [{"keyid": sha256(public), "sig": key.sign(canonical(signed)).hex()}]}


def tampered_states_are_refused(server: HubServer, device: DocDevice) -> None:
    """Modified copies of the applied state, fed to the device as if from the broker: each refused with its reason,
    the applied state kept. The identical retained copy is a no-op (§5)."""
    applied = device.applied
    assert applied is not None
    topic = f"{P}devices/doc-1/desired"
    device.handle(topic, canonical(copy.deepcopy(applied)))
    assert device.refused == {} and device.error == ""
    director, release = server.hub.keys.director_key, server.hub.keys.release_key
    state, now = applied["signed"], int(time.time())
    revision, version = state["revision"], state["modules"][0]["version"]
    policy = {"type": "release-policy", "v": 1, "version": 1, "expires": now + 3600,
              "modules": {"doc-mod": {"min_version": 1, "revoked": [version]}}}
    cases = [
        ({**applied, "signed": {**state, "revision": revision + 1}}, "not signed by a threshold of the director"),
        (sign({**state, "revision": revision + 1}, release), "not signed by a threshold of the director"),
        (sign({**state, "revision": revision + 1, "device": "doc-2"}, director), "is for device 'doc-2'"),
        (sign({**state, "modules": []}, director), f"revision {revision} is not above {revision}"),
        (sign({**state, "revision": revision + 1, "expires": now - 1}, director), "desired state expired"),
        (sign({**state, "revision": revision + 1, "expires": now + 40 * 86400}, director), "s ahead of now"),
        (sign({**state, "revision": revision + 1, "v": 2}, director), "unsupported schema version"),
        (sign({**state, "revision": revision + 1, "policy": sign(policy, director)}, director),
         "release policy is not signed"),
        (sign({**state, "revision": revision + 1, "policy": sign(policy, release)}, director),
         f"doc-mod version {version} is forbidden"),
    ]
    for n, (envelope, reason) in enumerate(cases, 1):
        device.handle(topic, canonical(envelope))
        assert device.refused["desired"] == n and reason in device.error, (n, device.error)
        assert device.applied is applied
    root = copy.deepcopy(device.root)
    device.handle(f"{P}root/{root['version'] + 1}", canonical({"signed": {**root, "version": root["version"] + 1},
                                                                  "signatures": []}))
    assert device.refused["root"] == 1 and device.root == root


def tampered_releases_are_refused(server: HubServer, device: DocDevice) -> None:
    """The release as §6 serves it over HTTP, and modified copies of it against the device's release checks."""
    module = device.applied["signed"]["modules"][0]  # type: ignore[index]
    r = httpx.get(f"{server.url}/api/v1/device/bundles/{module['bundle']}/release", auth=(device.id, device.password))
    assert r.status_code == 200, r.text
    genuine = r.json()
    assert check_release(device.root, genuine, module["bundle"], module, None, time.time())["manifest"]["name"] == \
        "doc-mod"
    signed, release_key = genuine["signed"], server.hub.keys.release_key
    renamed = {**signed, "manifest": {**signed["manifest"], "name": "other"}}
    cases = [
        ({**genuine, "signed": renamed}, module, "not signed by a threshold of the release role"),
        (sign(signed, server.hub.keys.director_key), module, "not signed by a threshold of the release role"),
        (sign(renamed, release_key), module, "does not hash to its bundle digest"),
        (sign({**signed, "expires": int(time.time()) - 1}, release_key), module, "release expired"),
        (genuine, {**module, "size": module["size"] + 1}, "another size"),
        (genuine, {**module, "version": module["version"] + 1}, "the state names doc-mod"),
    ]
    for envelope, entry, reason in cases:
        with pytest.raises(Refused, match=reason):
            check_release(device.root, envelope, module["bundle"], entry, None, time.time())


def test_the_verifier_refuses_a_root_signed_by_someone_else(isolated):
    server, admin = isolated
    [token] = admin.post("/api/v1/enrollment-tokens", json={}).json()["tokens"]
    root = httpx.post(server.url + "/api/v1/enroll", json={"token": token, "device_id": "doc-2"}).json()["root"]
    assert load_root(root)["version"] >= 1
    bad = copy.deepcopy(root)
    bad["signed"]["expires"] += 1
    with pytest.raises(Refused, match="not signed by a threshold"):
        load_root(bad)

