"""Bounded input: names, integers, floats and collection sizes are checked where they enter, and a bad
record is refused alone (issue 13). Each case was a real failure before the fix."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from hub.ingest.telemetry import pack
from hub.ingest.writer import BatchWriter
from hub.testing import MqttProbe, wait_until
from protocol.messages import DesiredModule, TelemetryBatch, TelemetryPoint
from protocol.topics import Channel, device_topic
from tests.hubside import HubSide, new_device, running_agent, until
from tests.pg import hub_store
from tests.rollout_support import build_versions

# --- the agent: module names in a signed desired state ---------------------------------------


@pytest.fixture
def hubside(broker, tmp_path):
    # deep enough that a bundle built under a hostile name still lands inside tmp_path
    h = HubSide(broker.url, tmp_path / "hub" / "work" / "dir")
    yield h
    h.close()


@pytest.mark.parametrize("bad", ["../../victimdir", "..", "ok\x00name"])
def test_agent_refuses_a_module_name_that_is_not_a_name_and_keeps_serving(hubside, tmp_path, bad):
    """A signed desired state naming module ``../../victimdir`` installed outside DATA and removing it deleted
    the directory; ``..`` wiped DATA/modules; a NUL killed reporting. Now: refused whole, counted, reported."""
    data = tmp_path / "agent"
    data.mkdir()
    victim = tmp_path / "victimdir"
    victim.mkdir()
    (victim / "precious").write_text("keep me")
    device = new_device()
    good = hubside.build("classifier", 1)
    hostile = hubside.build(bad, 1) if "\x00" not in bad else good
    hostile_module = DesiredModule(name=bad, version=1, bundle=hostile.digest, size=hostile.manifest.size,
                                   deployment="test")

    async def main() -> None:
        async with running_agent(hubside, device, data) as agent:
            hubside.publish_desired(device, 1, [hostile_module])
            await until(lambda: agent.rejected["desired"] or hubside.module_state(device, bad), 20,
                        "the hostile state refused or acted on")
            assert agent.rejected["desired"] == 1, "the desired state naming a non-name was accepted"
            rep = await until(lambda: (r := hubside.reported(device)) and r.error and r, 10, "refusal reported")
            assert "name" in rep.error and bad.split("\x00")[0] in rep.error, rep.error
            # the agent keeps running and reporting: the next valid state installs and serves
            hubside.publish_desired(device, 2, [good.desired()])
            await until(lambda: hubside.module_state(device, "classifier") == "running", 30, "valid module running")
            assert hubside.reported(device).error == ""
        assert sorted(p.name for p in victim.iterdir()) == ["precious"]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["agent", "hub", "victimdir"]

    asyncio.run(main())


def test_installer_checks_the_name_again_before_touching_the_filesystem(tmp_path):
    """Defence in depth: a module that reached the installer without the protocol check still cannot escape."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from agent.install import Installer, InstallError
    from modules.store import ContentStore
    from protocol.signing import load_trusted_root, make_root

    key = Ed25519PrivateKey.generate()
    root = load_trusted_root(make_root({"root": [key], "release": [key], "director": [key]}, [key]))
    data = tmp_path / "agent"
    data.mkdir()
    victim = tmp_path / "victimdir"
    victim.mkdir()
    (victim / "precious").write_text("keep me")
    inst = Installer(data, root, ContentStore(data / "chunks"))

    async def never() -> dict:
        raise AssertionError("the installer fetched a bundle for a module it should have refused")

    for bad in ("../../victimdir", "..", "a/b", "x\x00"):
        module = DesiredModule(name=bad, version=1, bundle="a" * 64, size=1, deployment="t")
        with pytest.raises(InstallError, match="name"):
            asyncio.run(inst.install(module, never))
        with pytest.raises(InstallError, match="name"):
            inst.remove(bad)
    assert sorted(p.name for p in victim.iterdir()) == ["precious"]
    assert not (data / "modules").exists() or not any((data / "modules").iterdir())


# --- the hub's API: names, numbers and sizes -------------------------------------------------


@pytest.mark.parametrize("name", ["a/b", "../x", "..", ".", "x\n", " x", "x\x00y", "a" * 65])
def test_deployment_names_that_are_not_names_are_refused_at_creation(admin, tmp_path, name):
    build_versions(admin, tmp_path, n=1)
    r = admin.post("/api/v1/deployments", json={"name": name, "module": "scorer:1"})
    assert r.status_code == 422, r.text
    assert "name" in r.text
    assert admin.get("/api/v1/deployments").json() == []


def test_device_id_with_a_trailing_newline_is_refused_at_enrolment(server, admin):
    [token] = admin.post("/api/v1/enrollment-tokens", json={}).json()["tokens"]
    for bad in ("dev1\n", "dev1\r", "dev\tx", "../dev"):
        r = httpx.post(server.url + "/api/v1/enroll", json={"token": token, "device_id": bad})
        assert r.status_code == 422, (bad, r.text)
        assert "device" in r.text.lower()
    assert admin.get("/api/v1/devices").json() == []
    assert httpx.post(server.url + "/api/v1/enroll", json={"token": token, "device_id": "dev1"}).status_code == 200


@pytest.mark.parametrize("field,value", [("priority", "NaN"), ("priority", "Infinity"), ("bake_s", "NaN"),
                                         ("wave_timeout_s", "-Infinity"), ("device_max_error_rate", "NaN"),
                                         ("priority", str(2**63))])
def test_non_finite_or_oversized_numbers_give_422_not_500(admin, tmp_path, field, value):
    build_versions(admin, tmp_path, n=1)
    body = '{"name": "d", "module": "scorer:1", "' + field + '": ' + value + "}"  # NaN is not JSON: written by hand
    r = admin.post("/api/v1/deployments", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert field in r.text
    assert admin.get("/api/v1/deployments").json() == []


def test_collections_have_size_caps(server, admin, tmp_path):
    huge = {f"k{i}": "v" for i in range(10_000)}
    r = admin.post("/api/v1/enrollment-tokens", json={"labels": huge})
    assert r.status_code == 422 and "labels" in r.text, r.text[:300]
    [token] = admin.post("/api/v1/enrollment-tokens", json={}).json()["tokens"]
    r = httpx.post(server.url + "/api/v1/enroll", json={"token": token, "device_id": "d1", "facts": huge})
    assert r.status_code == 422 and "facts" in r.text, r.text[:300]
    assert httpx.post(server.url + "/api/v1/enroll", json={"token": token, "device_id": "d1"}).status_code == 200
    r = admin.patch("/api/v1/devices/d1", json={"labels": huge})
    assert r.status_code == 422 and "labels" in r.text, r.text[:300]
    r = admin.patch("/api/v1/devices/d1", json={"unset": [f"k{i}" for i in range(10_000)]})
    assert r.status_code == 422 and "unset" in r.text, r.text[:300]

    build_versions(admin, tmp_path, n=1)
    target = ",".join(f"dev-{i}" for i in range(100_000))
    r = admin.post("/api/v1/deployments", json={"name": "d", "module": "scorer:1", "target": target})
    assert r.status_code == 422 and "target" in r.text, r.text[:300]
    r = admin.post("/api/v1/deployments", json={"name": "d", "module": "scorer:1", "gates": huge})
    assert r.status_code == 422 and "gates" in r.text, r.text[:300]
    r = admin.patch("/api/v1/models/scorer-model/versions/1", json={"tags": huge})
    assert r.status_code == 422 and "tags" in r.text, r.text[:300]
    r = admin.post("/api/v1/models", data={"name": "m2", "tags": json.dumps(huge)},
                   files=[("files", ("model.onnx", (tmp_path / "m1" / "model.onnx").read_bytes()))])
    assert r.status_code == 422 and "tags" in r.text, r.text[:300]
    assert admin.get("/api/v1/deployments").json() == []


def test_model_and_module_names_are_names(admin, tmp_path):
    build_versions(admin, tmp_path, n=1)
    model = (tmp_path / "m1" / "model.onnx").read_bytes()
    for bad in ("../m", "a b", "m\n", "..", "x:1"):
        r = admin.post("/api/v1/models", data={"name": bad}, files=[("files", ("model.onnx", model))])
        assert r.status_code == 422 and "name" in r.text, (bad, r.text)
    for bad_file in ("mo del.onnx", "model\n.onnx", "..onnx\x01"):
        r = admin.post("/api/v1/models", data={"name": "m"}, files=[("files", (bad_file, model))])
        assert r.status_code == 422, (bad_file, r.text)
    for bad in ("../m", "a/b", "m\n"):
        r = admin.post("/api/v1/modules", json={"name": bad, "models": ["scorer-model:1"]})
        assert r.status_code == 422 and "name" in r.text, (bad, r.text)
    r = admin.post("/api/v1/modules", json={"name": "ok", "models": ["scorer-model:1"], "entry": "def run(x): return x",
                                            "entry_name": "../evil.py"})
    assert r.status_code == 422, r.text


# --- telemetry: one bad record never takes others with it ------------------------------------


@pytest.fixture
def hub_options():
    # a long flush window: the hostile batch and device B's batches land in one database write
    return {"writer_flush_s": 1.0}


def _batch(device: str, seq: int, n: int = 1) -> bytes:
    return TelemetryBatch(device=device, seq=seq, ts=time.time(), points=[
        TelemetryPoint(ts=time.time(), module="m", version=1, inferences=n, errors=0)]).encode()


def test_a_seq_beyond_63_bits_is_refused_alone_and_the_other_devices_batches_are_stored(server, admin):
    tokens = admin.post("/api/v1/enrollment-tokens", json={"count": 2}).json()["tokens"]
    for token, dev in zip(tokens, ("dev-a", "dev-b")):
        httpx.post(server.url + "/api/v1/enroll", json={"token": token, "device_id": dev}).raise_for_status()
    rejected_before = server.hub.bridge.rejected.get("telemetry", 0)
    probe = MqttProbe(server.config.mqtt_url)
    try:
        probe.publish(device_topic("dev-a", Channel.TELEMETRY), _batch("dev-a", 2**63))
        for seq in range(1, 6):
            probe.publish(device_topic("dev-b", Channel.TELEMETRY), _batch("dev-b", seq))
        wait_until(lambda: server.hub.bridge.processed.get("telemetry", 0) >= 6, 10, what="6 batches handled")
        assert server.hub.bridge.writer.wait_idle(10)
    finally:
        probe.close()
    stored = {r["device"]: r["n"] for r in server.hub.db.query(
        "SELECT device, count(*) AS n FROM telemetry_batches GROUP BY device")}
    assert stored == {"dev-b": 5}
    assert server.hub.bridge.rejected.get("telemetry", 0) == rejected_before + 1


def test_the_batch_writer_falls_back_to_one_record_at_a_time(tmp_path):
    """Whatever slips past validation and fails in SQLite loses only itself (counted), never its neighbours."""
    db = hub_store(tmp_path)  # the hub's own schema: telemetry_batches, rollups, data_records
    stored_points = []
    writer = BatchWriter(db, flush_s=60.0, batch_rows=10_000, on_telemetry_rows=stored_points.append)
    good = [TelemetryBatch(device="dev-b", seq=s, ts=1.0, points=[
        TelemetryPoint(ts=1.0, module="m", version=1, inferences=1, errors=0)]) for s in range(1, 6)]
    bad = TelemetryBatch(device="dev-a", seq=2**63, ts=1.0, points=[
        TelemetryPoint(ts=1.0, module="m", version=1, inferences=1, errors=0)])
    for msg in (good[0], good[1], bad, good[2], good[3], good[4]):
        writer._put("telemetry", [pack(msg)])  # the writer's own queue, past the decoder's checks
    writer.data([("dev-b", 1, 0, 1.0, "m", 1, "[]", "[]"), ("dev-a", 2**63, 0, 1.0, "m", 1, "[]", "[]")])
    writer.data([("dev-b", 2, 0, 1.0, "m", 1, "[]", "[]")])
    writer.start()
    writer.stop()
    assert [r["seq"] for r in db.query("SELECT seq FROM telemetry_batches WHERE device = 'dev-b' ORDER BY seq")] == \
        [1, 2, 3, 4, 5]
    assert db.one("SELECT count(*) AS n FROM telemetry_batches WHERE device = 'dev-a'")["n"] == 0
    assert [(r["device"], r["seq"]) for r in db.query("SELECT device, seq FROM data_records ORDER BY seq")] == \
        [("dev-b", 1), ("dev-b", 2)]
    assert db.one("SELECT sum(inferences) AS n FROM telemetry_minutes WHERE device = 'dev-b'")["n"] == 5
    assert sum(stored_points) == 5
    assert writer.failed == 2  # the telemetry batch and the data row set that could not be stored
    db.close()


# --- the rule itself --------------------------------------------------------------------------


def test_the_name_rule_says_which_part_it_breaks():
    from protocol.encoding import ProtocolError
    from protocol.messages import decode
    from protocol.names import check_file_path, check_name

    for ok in ("a", "A-1.b_c", "_private", "x" * 64, "model.onnx", "a..b"):
        assert check_name(ok) == ok
    for bad, reason in [("", "empty"), (".", "relative directory"), ("..", "relative directory"),
                        (".hidden", "starts with '.'"), ("-rf", "starts with '-'"), ("a/b", "'/'"), ("a\\b", "'\\'"),
                        ("a\x00", "NUL"), ("dev1\n", "whitespace"), (" a", "whitespace"), ("a\x7f", "control"),
                        ("a:1", "':'"), ("caf\u00e9", "'\u00e9'"), ("x" * 65, "65 characters")]:
        with pytest.raises(ProtocolError, match=reason.replace("\\", "\\\\").replace(".", "\\.")):
            check_name(bad, "module name")
    assert check_file_path("sub/model.onnx") == "sub/model.onnx"
    for bad in ("/etc/passwd", "a//b", "a/../b", "a/./b", "a/" * 8 + "b", "x" * 129):
        with pytest.raises(ProtocolError, match="unsafe file path"):
            check_file_path(bad)
    # NaN is not JSON: refused by name, whichever decoder path reads it
    with pytest.raises(ProtocolError, match="NaN is not a JSON number"):
        decode(Channel.TELEMETRY, b'{"v": 1, "device": "d", "seq": 1, "ts": NaN, "points": []}')
    with pytest.raises(ProtocolError, match="seq: Expected `int` <= 9223372036854775807"):
        decode(Channel.TELEMETRY, b'{"v": 1, "device": "d", "seq": 9223372036854775808, "ts": 1, "points": []}')
