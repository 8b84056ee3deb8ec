"""The root of trust kept off the hub (docs/security.md): a hub process with no root key on its disk works end to
end, a root rotation signed elsewhere with 2 of 3 root keys reaches a running device, the hub never invents a
missing root key, and an expired offline root leaves the hub running in a degraded mode that can publish a new one."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import httpx
import pytest

from hub.trust.keys import KeySetupError, load_or_create_keys
from hub.trust.root_admin import init_offline
from protocol.signing import key_id, load_private, load_trusted_root
from tests.clirun import ROOT, as_json, cli
from tests.hubprocess import ProcessHub
from tests.hubside import agent_running, until
from tests.pg import hub_db


def edgefleet(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    """The CLI without a hub (the commands that run where the keys are)."""
    proc = subprocess.run([sys.executable, "-m", "edgefleet", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert (proc.returncode == 0) is ok, f"{args}: {proc.stdout}\n{proc.stderr}"
    return proc


def test_offline_root_hub_process_end_to_end_and_a_root_signed_elsewhere_reaches_the_device(broker, tmp_path):
    data, offline = tmp_path / "hub", tmp_path / "offline"
    init = as_json(edgefleet("keys", "init", "--data", str(data), "--offline-root", str(offline),
                             "--root-keys", "3", "--root-threshold", "2", "--json"))
    assert init["root_threshold"] == 2 and len(init["root_key_files"]) == 3
    assert sorted(p.name for p in (data / "keys").iterdir()) == ["director.key", "release.key", "root.json"]
    hub = ProcessHub(broker.url, tmp_path, data)
    try:
        status = as_json(cli(hub, "keys", "show", "--json"))["status"]
        assert status["held"] == ["director", "release"] and not status["degraded"]
        device_dir = tmp_path / "device"
        ident = hub.enroll(device_dir)
        assert ident.trusted_root().roles["root"][1] == 2

        async def main() -> None:
            async with agent_running(ident, device_dir) as agent:
                first = await asyncio.to_thread(hub.deploy, ident.device_id)
                await until(lambda: (a := agent.active.get("classifier")) and a.version == first["version"], 90,
                            "the first version running")
                # the director key is rotated with the root keys offline: prepare, sign 2 of 3 elsewhere, publish
                unsigned = tmp_path / "root-2.json"
                cli(hub, "keys", "rotate", "director", "--prepare", "--out", str(unsigned))
                assert (data / "keys" / "director.key.new").exists()
                one = as_json(edgefleet("keys", "sign-root", str(unsigned), "--key", str(offline / "root-1.key"),
                                        "--current", str(offline / "root.json"), "--json"))
                assert not one["own_threshold_met"] and not one["follows_current"] and "1 of 2" in one["own_problem"]
                refused = cli(hub, "keys", "publish-root", str(unsigned), ok=False)
                assert "root signature check failed: 1 of 2 required (too few" in " ".join(refused.stderr.split())
                two = as_json(edgefleet("keys", "sign-root", str(unsigned), "--key", str(offline / "root-3.key"),
                                        "--current", str(offline / "root.json"), "--json"))
                assert two["own_threshold_met"] and two["follows_current"] and two["signatures"] == 2
                published = as_json(cli(hub, "keys", "publish-root", str(unsigned), "--json"))
                assert published["root_version"] == 2 and published["committed"] == ["director"]
                assert published["resigned_states"] >= 1
                await until(lambda: agent.root.version == 2, 30, "the device trusts root version 2")
                new_director = key_id(load_private((data / "keys" / "director.key").read_text()))
                assert new_director in agent.root.roles["director"][0]
                second = await asyncio.to_thread(hub.deploy, ident.device_id)  # signed by the new director key only
                await until(lambda: (a := agent.active.get("classifier")) and a.version == second["version"], 90,
                            "a state signed by the new director key applied")
                assert not agent.desired_error

        asyncio.run(main())
        assert not any((data / "keys").glob("root*.key*"))  # no root key was ever written on the hub
    finally:
        hub.close()


def test_the_hub_never_generates_a_missing_root_key(tmp_path):
    keys = tmp_path / "hub" / "keys"
    ring = load_or_create_keys(keys)  # first start: an empty directory gets all three keys
    assert ring.holds("root") and ring.root.version == 1
    (keys / "root.key").unlink()
    ring = load_or_create_keys(keys)  # offline-root mode: the same root, not a new one
    assert not ring.holds("root") and ring.holds("director") and ring.root.version == 1
    assert not (keys / "root.key").exists()
    with pytest.raises(Exception, match="does not hold the root key"):
        ring.key("root")

    (keys / "root.json").rename(tmp_path / "root.json.bak")
    with pytest.raises(KeySetupError, match="root.json is missing but director.key, release.key exist"):
        load_or_create_keys(keys)
    proc = edgefleet("hub", "serve", "--data", str(tmp_path / "hub"), ok=False)  # refused before anything starts
    reason = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(reason) == 1 and "root.json is missing" in reason[0], proc.stderr
    assert not (keys / "root.json").exists() and not (keys / "root.key").exists()

    (tmp_path / "root.json.bak").rename(keys / "root.json")
    (keys / "release.key").write_text(load_private("11" * 32).private_bytes_raw().hex() + "\n")
    with pytest.raises(KeySetupError, match="release.key is not a release key of"):
        load_or_create_keys(keys)


def test_an_expired_offline_root_leaves_the_hub_degraded_until_a_new_root_is_published(server_factory, tmp_path):
    data, offline = tmp_path / "hub", tmp_path / "offline"
    init_offline(data / "keys", offline, root_keys=2, threshold=2, expires=int(time.time()) - 60)
    server, admin = server_factory(data)
    status = admin.get("/api/v1/keys").json()
    assert status["degraded"] and "has expired" in status["problems"][0]
    metrics = admin.get("/metrics").text
    root_left = next(float(line.split()[-1]) for line in metrics.splitlines()
                     if line.startswith('edgefleet_key_expiry_seconds{role="root"}'))
    assert root_left < 0
    assert 'edgefleet_key_held{role="root"} 0' in metrics

    unsigned = admin.post("/api/v1/keys/rotate", json={"role": "root", "prepare": True}).json()["root"]
    path = tmp_path / "root-2.json"
    path.write_text(json.dumps(unsigned))
    for key in ("root-1.key", "root-2.key"):
        edgefleet("keys", "sign-root", str(path), "--key", str(offline / key))
    res = admin.post("/api/v1/roots", json=json.loads(path.read_text()))
    assert res.status_code == 200, res.text
    status = admin.get("/api/v1/keys").json()
    assert not status["degraded"] and status["root_version"] == 2 and status["expires_in_s"]["root"] > 300 * 86400
    assert not load_trusted_root(admin.get("/api/v1/root").json()).expired()


def test_an_online_root_near_expiry_is_renewed_at_start(server_factory, tmp_path):
    from protocol.signing import ROLES, make_root

    keys = tmp_path / "hub" / "keys"
    ring = load_or_create_keys(keys)
    soon = make_root({r: [ring.held[r]] for r in ROLES}, [ring.held["root"]], expires=int(time.time()) + 10 * 86400)
    (keys / "root.json").write_text(json.dumps(soon))
    server, admin = server_factory(tmp_path / "hub")
    assert until_sync(lambda: server.hub.keys.root.version == 2)  # the maintenance pass at start renewed it
    root = admin.get("/api/v1/root").json()
    assert root["signed"]["expires"] > time.time() + 300 * 86400
    assert admin.get("/api/v1/roots/1").json()["signed"]["expires"] == soon["signed"]["expires"]


def until_sync(predicate, timeout: float = 20.0) -> bool:
    from hub.testing import wait_until

    return bool(wait_until(predicate, timeout, 0.05, "condition"))


@pytest.fixture
def server_factory(broker, monkeypatch):
    """Start a hub (in this process) on a given data directory; stopped after the test."""
    import secrets

    from hub.config import HubConfig
    from hub.server import HubServer

    monkeypatch.delenv("EDGEFLEET_ADMIN_TOKEN", raising=False)
    started = []

    def start(data):
        s = HubServer(HubConfig(data, broker.url, mqtt_client_id=f"hub-{secrets.token_hex(4)}", **hub_db(data))).start()
        assert s.wait_mqtt(10)
        c = httpx.Client(base_url=s.url, headers={"Authorization": f"Bearer {s.admin_token}"}, timeout=60)
        started.append((s, c))
        return s, c

    yield start
    for s, c in started:
        c.close()
        s.stop()


def test_publish_root_refuses_what_a_device_or_the_hub_could_not_use(tmp_path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from hub.errors import Conflict, Invalid
    from hub.trust.root_admin import next_root_body, prepare_rotation, publish_root
    from protocol.signing import add_signatures, sign

    keys, offline = tmp_path / "keys", tmp_path / "offline"
    init_offline(keys, offline, root_keys=2, threshold=1)
    root_1 = load_private((offline / "root-1.key").read_text())
    ring = load_or_create_keys(keys)

    def signed(body):
        return sign(body, [root_1])

    with pytest.raises(Invalid, match="publish version 2 first"):
        publish_root(ring, signed({**next_root_body(ring), "version": 3}))
    with pytest.raises(Invalid, match="expired at"):
        publish_root(ring, signed(next_root_body(ring, expires=int(time.time()) - 1)))
    with pytest.raises(Conflict, match="neither the hub's director key nor a prepared one"):
        publish_root(ring, signed(next_root_body(ring, {"director": [Ed25519PrivateKey.generate()]})))
    assert ring.root.version == 1 and not (keys / "roots" / "2.json").exists()

    # a prepared director rotation, signed offline; the hub crashes after the commit point (root.json written)
    unsigned = prepare_rotation(ring, "director")
    pending = load_private((keys / "director.key.new").read_text())
    envelope = add_signatures(unsigned, [root_1])
    (keys / "root.json").write_text(json.dumps(envelope))
    ring = load_or_create_keys(keys)  # the listed .new key is made the director key
    assert key_id(ring.key("director")) == key_id(pending) and not (keys / "director.key.new").exists()

    # the release role moves to CI: publishing a root without the hub's release key retires it on the hub
    ci = Ed25519PrivateKey.generate()
    res = publish_root(ring, signed(next_root_body(ring, {"release": [ci]})))
    assert res["retired"] == ["release"] and (keys / "release.key.revoked").exists()
    assert not ring.holds("release") and load_or_create_keys(keys).held.keys() == {"director"}
