"""Rotation converges, releases are revoked, and the release role can live outside the hub (the Uptane split):
a real hub on real mosquitto, its retained documents checked exactly as a device checks them (TrustState)."""

from __future__ import annotations

import json
import secrets
import shutil
import time
from pathlib import Path

import httpx
import pytest

from hub.testing import MqttProbe
from hub.trust.keys import load_or_create_keys
from modules.examples import write_logreg_onnx
from protocol.signing import key_id, load_private
from protocol.topics import Channel, device_topic
from protocol.trust import TrustState
from tests.clirun import as_json, cli
from tests.pg import hub_db


def register_and_build(admin: httpx.Client, tmp_path: Path, versions: int = 2) -> list[dict]:
    """Module ``m`` versions 1..n from one model (each version samples at another rate, so its bundle differs)."""
    model = write_logreg_onnx(tmp_path / "model.onnx")
    admin.post("/api/v1/models", data={"name": "logreg"},
               files=[("files", (model.name, model.read_bytes(), "application/octet-stream"))]).raise_for_status()
    built = []
    for i in range(versions):
        r = admin.post("/api/v1/modules", json={"name": "m", "models": ["logreg:1"], "collect_rate_ppm": 1000 * (i + 1)})
        r.raise_for_status()
        built.append(r.json())
    return built


def enroll(server, admin: httpx.Client) -> tuple[str, dict]:
    token = admin.post("/api/v1/enrollment-tokens", json={}).json()["tokens"][0]
    dev = httpx.post(server.url + "/api/v1/enroll", json={"token": token, "device_id": f"dev-{secrets.token_hex(5)}"})
    dev.raise_for_status()
    return dev.json()["device_id"], dev.json()["root"]


def retained_desired(broker_url: str, device: str) -> dict:
    """The retained desired state a device gets when it (re)subscribes now."""
    probe = MqttProbe(broker_url)
    try:
        probe.subscribe(device_topic(device, Channel.DESIRED))
        return json.loads(probe.wait_for(lambda m: any(x.retain and x.payload for x in m), 10)[-1].payload)
    finally:
        probe.close()


def test_rotating_the_director_key_re_signs_the_retained_states(server, admin, broker, tmp_path):
    device, pinned = enroll(server, admin)
    built = register_and_build(admin, tmp_path, versions=1)
    admin.post("/api/v1/deployments", json={"name": "d", "module": "m:1", "target": device}).raise_for_status()
    before = retained_desired(broker.url, device)
    old = key_id(load_private((server.config.data_dir / "keys" / "director.key").read_text()))
    assert [s["keyid"] for s in before["signatures"]] == [old]

    rotated = admin.post("/api/v1/keys/rotate", json={"role": "director"}).json()
    assert rotated["revoked"] == old and rotated["resigned_states"] == 1
    after = retained_desired(broker.url, device)  # what a device that was offline during the rotation gets
    assert [s["keyid"] for s in after["signatures"]] == [rotated["keyid"]]
    trust = TrustState(pinned)
    with pytest.raises(Exception, match="does not trust"):  # it takes the new root first (roots before states)
        TrustState(pinned).accept_desired(after, device, time.time())
    trust.update_root(admin.get("/api/v1/roots/2").json())
    state = trust.accept_desired(after, device, time.time())
    assert state.revision == before["signed"]["revision"] + 1 and state.modules[0].bundle == built[0]["digest"]

    rotated = admin.post("/api/v1/keys/rotate", json={"role": "release"}).json()  # releases converge the same way
    assert rotated["resigned_releases"] == 1
    trust.update_root(admin.get("/api/v1/roots/3").json())
    release = admin.get(f"/api/v1/bundles/{built[0]['digest']}/release").json()
    assert trust.accept_release(release, built[0]["digest"], "m", 0, time.time()).version == 1


def test_revocation_refuses_deploying_and_installing_a_revoked_version(server, admin, broker, tmp_path):
    device, pinned = enroll(server, admin)
    register_and_build(admin, tmp_path, versions=2)
    admin.post("/api/v1/deployments", json={"name": "d", "module": "m:1", "target": device}).raise_for_status()
    busy = admin.post("/api/v1/modules/m/versions/1/revoke", json={})
    assert busy.status_code == 409 and "deployed by d" in busy.json()["detail"]

    admin.post("/api/v1/deployments", json={"name": "d", "module": "m:2", "target": device}).raise_for_status()
    revoked = as_json(cli(server, "module", "revoke", "m:1", "--and-older", "--json"))
    assert revoked["version"] == 1 and revoked["modules"] == {"m": {"min_version": 2, "revoked": []}}
    refused = admin.post("/api/v1/deployments", json={"name": "d", "module": "m:1", "target": device})
    assert refused.status_code == 409 and "below the minimum 2 set by release policy version 1" in refused.json()["detail"]

    state = retained_desired(broker.url, device)  # re-signed with the policy in it: devices learn it at once
    assert state["signed"]["policy"]["signed"]["version"] == 1
    trust = TrustState(pinned)
    trust.accept_desired(state, device, time.time())
    assert trust.policy.refusal("m", 1)
    old_release = admin.get("/api/v1/modules/m/versions/1").json()
    with pytest.raises(Exception, match="below the minimum 2"):  # a director sending the device back is refused
        trust.accept_release(old_release["envelope"], old_release["digest"], "m", 0, time.time())


def test_the_release_role_held_by_ci_signs_releases_and_revocations(broker, tmp_path, monkeypatch):
    from hub.config import HubConfig
    from hub.server import HubServer

    keys = tmp_path / "hub" / "keys"
    load_or_create_keys(keys)
    (tmp_path / "ci").mkdir()
    ci_key = tmp_path / "ci" / "release.key"
    shutil.move(keys / "release.key", ci_key)  # the release role moves to CI; the hub keeps root and director
    monkeypatch.delenv("EDGEFLEET_ADMIN_TOKEN", raising=False)
    server = HubServer(HubConfig(tmp_path / "hub", broker.url, mqtt_client_id=f"hub-{secrets.token_hex(4)}",
                                 **hub_db(tmp_path / "hub"))).start()
    try:
        assert server.wait_mqtt(10)
        admin = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.admin_token}"}, timeout=60)
        device, _ = enroll(server, admin)
        built = register_and_build(admin, tmp_path, versions=2)
        assert [b["signed"] for b in built] == [False, False]
        unsigned = admin.post("/api/v1/deployments", json={"name": "d", "module": "m:2", "target": device})
        assert unsigned.status_code == 409 and "no release signature yet" in unsigned.json()["detail"]

        for ref in ("m:1", "m:2"):
            assert as_json(cli(server, "module", "sign", ref, "--key", str(ci_key), "--json"))["signed"]
        stranger = tmp_path / "ci" / "stranger.key"
        cli(server, "keys", "generate", str(stranger))
        forged = cli(server, "module", "sign", "m:1", "--key", str(stranger), ok=False)
        assert "signed by a key the root does not trust" in " ".join(forged.stderr.split())
        admin.post("/api/v1/deployments", json={"name": "d", "module": "m:2", "target": device}).raise_for_status()

        no_key = admin.post("/api/v1/modules/m/versions/1/revoke", json={})
        assert no_key.status_code == 409 and "does not hold the release key" in no_key.json()["detail"]
        res = as_json(cli(server, "module", "revoke", "m:1", "--key", str(ci_key), "--json"))
        assert res["modules"] == {"m": {"min_version": 0, "revoked": [1]}}
        assert admin.get("/api/v1/release-policy").json()["signed"]["version"] == 1
        again = admin.post("/api/v1/deployments", json={"name": "d", "module": "m:1", "target": device})
        assert again.status_code == 409 and "version 1 is revoked" in again.json()["detail"]
        status = admin.get("/api/v1/keys").json()
        assert status["held"] == ["director", "root"] and "release" in status["expires_in_s"]
        admin.close()
    finally:
        server.stop()
