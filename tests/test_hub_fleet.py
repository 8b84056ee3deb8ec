"""Enrolment, deployments and signed desired state over the real broker."""

from __future__ import annotations

import json
import secrets

import httpx
import pytest

from hub.testing import wait_until
from modules.examples import write_logreg_onnx
from protocol.messages import ModuleReport, ReportedState, Status
from protocol.signing import load_trusted_root
from protocol.topics import Channel, device_topic
from protocol.verify import accept_desired
from tests.clirun import as_json, cli

pytestmark = pytest.mark.hubstore  # run again on PostgreSQL by scripts/test.sh


@pytest.fixture
def module(admin, tmp_path) -> dict:
    path = write_logreg_onnx(tmp_path / "model.onnx")
    admin.post("/api/v1/models", data={"name": "logreg"},
               files=[("files", ("model.onnx", path.read_bytes()))]).raise_for_status()
    r = admin.post("/api/v1/modules", json={"name": "scorer", "models": ["logreg:1"]})
    r.raise_for_status()
    return r.json()


def unique_id() -> str:
    return f"t-{secrets.token_hex(4)}"


def tokens(admin: httpx.Client, count: int = 1, **labels: str) -> list[str]:
    r = admin.post("/api/v1/enrollment-tokens", json={"count": count, "labels": labels})
    r.raise_for_status()
    return r.json()["tokens"]


def test_enrolment_token_is_single_use_and_precise(admin, server):
    [token] = tokens(admin, site="lab")
    device = unique_id()
    r = httpx.post(server.url + "/api/v1/enroll", json={"token": token, "device_id": device, "facts": {"arch": "x86"}})
    assert r.status_code == 200
    body = r.json()
    assert body["device_id"] == device and body["mqtt_username"] == device and body["mqtt_password"]
    assert body["mqtt_url"] == server.config.device_mqtt_url
    assert load_trusted_root(body["root"]).version == 1

    again = httpx.post(server.url + "/api/v1/enroll", json={"token": token})
    assert again.status_code == 403 and "already used" in again.json()["detail"]
    never = httpx.post(server.url + "/api/v1/enroll", json={"token": "made-up"})
    assert never.status_code == 403 and "never issued" in never.json()["detail"]

    [second] = tokens(admin)
    taken = httpx.post(server.url + "/api/v1/enroll", json={"token": second, "device_id": device})
    assert taken.status_code == 409
    generated = httpx.post(server.url + "/api/v1/enroll", json={"token": second}).json()["device_id"]  # not spent by 409
    assert generated.startswith("dev-") and len(generated) == 12

    [expired] = tokens(admin)
    with server.hub.db.transaction() as tx:
        tx.execute("UPDATE enrollment_tokens SET expires_at = 1")
    r = httpx.post(server.url + "/api/v1/enroll", json={"token": expired})
    assert r.status_code == 403 and "expired" in r.json()["detail"]

    dev = admin.get(f"/api/v1/devices/{device}").json()
    assert dev["labels"] == {"site": "lab"} and dev["facts"] == {"arch": "x86"} and dev["state"] == "idle"
    assert admin.get("/api/v1/devices/nope").status_code == 404


def test_deployment_publishes_signed_retained_desired_state(admin, server, probe, module):
    [lab_token, other_token] = tokens(admin, 2, site="lab")
    device, bystander = unique_id(), unique_id()
    httpx.post(server.url + "/api/v1/enroll", json={"token": lab_token, "device_id": device}).raise_for_status()
    httpx.post(server.url + "/api/v1/enroll", json={"token": other_token, "device_id": bystander}).raise_for_status()
    root = load_trusted_root(admin.get("/api/v1/root").json())

    r = admin.post("/api/v1/deployments", json={"name": "d1", "module": "scorer:1", "target": "site=lab"})
    assert r.status_code == 200 and r.json()["published"] == 2, r.text
    r = admin.post("/api/v1/deployments", json={"name": "d2", "module": "scorer:1", "target": device, "priority": 5})
    assert r.json()["published"] == 1
    # nothing changes for any module list (d2 outranks d1): nothing is re-signed or re-published
    for name, target, prio in (("d2", device, 5), ("d1", "site=lab", 0)):
        again = admin.post("/api/v1/deployments", json={"name": name, "module": "scorer:1", "target": target,
                                                        "priority": prio})
        assert again.json()["published"] == 0

    probe.subscribe(device_topic(device, Channel.DESIRED))  # after publishing: only a retained copy can arrive
    # publishing is asynchronous: revision 3 may land just after our SUBACK, behind a retained revision 2
    got = probe.wait_for(lambda m: any(json.loads(x.payload)["signed"]["revision"] == 3 for x in m))
    assert got[0].retain
    msg = got[-1]
    state = accept_desired(json.loads(msg.payload), root, device, last_revision=2)
    assert state.revision == 3  # enrolment, d1, d2
    assert [(m.name, m.version, m.bundle, m.size, m.deployment) for m in state.modules] == [
        ("scorer", 1, module["digest"], module["size"], "d2")]
    assert admin.get(f"/api/v1/devices/{device}").json()["revision"] == 3

    # the device reports; the hub shows its state
    probe.publish(device_topic(device, Channel.STATUS), Status(device=device, online=True).encode())
    report = ReportedState(device=device, revision=3, ts=1.0, facts={"os": "linux"},
                           modules=[ModuleReport(name="scorer", version=1, bundle=module["digest"], state="running")])
    probe.publish(device_topic(device, Channel.REPORTED), report.encode())
    shown = wait_until(lambda: (d := admin.get(f"/api/v1/devices/{device}").json())["state"] == "running" and d,
                       what="device state running")
    assert shown["online"] and shown["facts"] == {"os": "linux"}
    assert shown["modules"][0]["state"] == "running"
    d2 = admin.get("/api/v1/deployments/d2").json()
    assert d2["counts"] == {"running": 1} and d2["module"] == "scorer:1"
    summary = admin.get("/api/v1/fleet/summary").json()
    assert summary["devices"] == 2 and summary["online"] == 1 and summary["by_state"]["running"] == 1

    # a state for one device is refused by another: the device id is inside the signature
    with pytest.raises(ValueError, match="not"):
        accept_desired(json.loads(msg.payload), root, bystander, last_revision=0)


def test_a_group_token_provisions_a_fleet_in_bulk_and_runs_out(admin, server):
    [token] = admin.post("/api/v1/enrollment-tokens", json={"uses": 5, "labels": {"line": "a"}}).json()["tokens"]
    ids = [unique_id() for _ in range(3)]
    r = httpx.post(server.url + "/api/v1/enroll/batch",
                   json={"token": token, "devices": [{"device_id": i, "facts": {"n": str(k)}} for k, i in enumerate(ids)]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [d["device_id"] for d in body["devices"]] == ids and body["mqtt_url"] == server.config.device_mqtt_url
    assert len({d["mqtt_password"] for d in body["devices"]}) == 3 and load_trusted_root(body["root"]).version == 1
    for k, i in enumerate(ids):
        dev = admin.get(f"/api/v1/devices/{i}").json()
        assert dev["labels"] == {"line": "a"} and dev["facts"] == {"n": str(k)}
    creds = dict(server.hub.fleet.broker_credentials())
    assert all(creds[i].startswith("$7$") for i in ids)

    # all or none: 2 uses left, 3 asked for; then a duplicate id in the batch; then one already enrolled
    three = {"token": token, "devices": [{"device_id": unique_id()} for _ in range(3)]}
    r = httpx.post(server.url + "/api/v1/enroll/batch", json=three)
    assert r.status_code == 403 and "2 use(s) left" in r.json()["detail"]
    assert all(admin.get(f"/api/v1/devices/{d['device_id']}").status_code == 404 for d in three["devices"])
    twice = unique_id()
    r = httpx.post(server.url + "/api/v1/enroll/batch", json={"token": token, "devices": [{"device_id": twice}] * 2})
    assert r.status_code == 422 and "twice" in r.json()["detail"]
    r = httpx.post(server.url + "/api/v1/enroll/batch", json={"token": token, "devices": [{"device_id": ids[0]}]})
    assert r.status_code == 409

    # the same token on the one-device path spends its last two uses (a generated id for the second)
    one = httpx.post(server.url + "/api/v1/enroll", json={"token": token, "device_id": unique_id()})
    assert one.status_code == 200
    assert httpx.post(server.url + "/api/v1/enroll", json={"token": token}).json()["device_id"].startswith("dev-")
    spent = httpx.post(server.url + "/api/v1/enroll", json={"token": token})
    assert spent.status_code == 403 and "used up (all 5 uses)" in spent.json()["detail"]
    r = admin.post("/api/v1/enrollment-tokens", json={"uses": 0})
    assert r.status_code == 422

    group = as_json(cli(server, "device", "token", "--uses", "2", "--json"))
    assert group["uses"] == 2
    for _ in range(2):
        assert httpx.post(server.url + "/api/v1/enroll", json={"token": group["token"]}).status_code == 200
    assert httpx.post(server.url + "/api/v1/enroll", json={"token": group["token"]}).status_code == 403
    r = httpx.post(server.url + "/api/v1/enroll/batch", json={"token": token, "devices": []})
    assert r.status_code == 422


def test_bad_deployment_requests(admin, module):
    assert admin.post("/api/v1/deployments", json={"name": "x", "module": "nope:1"}).status_code == 422
    assert admin.post("/api/v1/deployments", json={"name": "x", "module": "scorer"}).status_code == 422
    assert admin.post("/api/v1/deployments",
                      json={"name": "x", "module": "scorer:1", "target": "a=b,dev1"}).status_code == 422
    assert admin.get("/api/v1/deployments/none").status_code == 404
