"""API and enrolment tokens that can be listed, expired and revoked; the env admin token replacing the last one;
the audit log recording every mutation in a hash chain that names the first edited or deleted row (issue 13)."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from hub import HubConfig, HubServer
from hub.audit import record, seal, verify
from hub.testing import wait_until
from tests.clirun import as_json, cli
from tests.pg import hub_db, hub_env, hub_store
from tests.rollout_support import build_versions, wait_rollout

ROOT = Path(__file__).resolve().parents[1]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.hubstore  # run again on PostgreSQL by scripts/test.sh
def test_api_tokens_are_named_listed_expired_and_revoked(server, admin):
    made = admin.post("/api/v1/tokens", json={"name": "ci", "role": "operator"}).json()
    ci = made["token"]
    assert len(ci) >= 32 and made["role"] == "operator" and len(made["id"]) == 12
    with httpx.Client(base_url=server.url, headers=bearer(ci)) as c:
        assert c.post("/api/v1/enrollment-tokens", json={}).status_code == 200  # an operator's right
        assert c.get("/api/v1/tokens").status_code == 403  # an admin's
        assert c.get("/api/v1/whoami").json() == {"name": "ci", "role": "operator", "id": made["id"]}
    assert admin.get("/api/v1/whoami").json()["role"] == "admin"
    assert httpx.get(server.url + "/api/v1/whoami").status_code == 401
    listed = admin.get("/api/v1/tokens")
    assert {t["name"]: t["role"] for t in listed.json()} == {"admin": "admin", "ci": "operator"}
    assert ci not in listed.text and server.admin_token not in listed.text  # ids and names, never a token
    stored = server.hub.db.query("SELECT token_hash FROM api_tokens")
    assert all(ci not in r["token_hash"] for r in stored) and len(stored) == 2  # hashed at rest
    assert admin.post("/api/v1/tokens", json={"name": "ci", "role": "viewer"}).status_code == 409  # names are unique
    assert admin.post("/api/v1/tokens", json={"name": "../x", "role": "viewer"}).status_code == 422

    assert admin.delete("/api/v1/tokens/ci").json()["state"] == "revoked"
    r = httpx.get(server.url + "/api/v1/devices", headers=bearer(ci))
    assert r.status_code == 401 and "revoked" in r.json()["detail"]

    brief = admin.post("/api/v1/tokens", json={"name": "brief", "role": "viewer", "expires_in": 1}).json()
    wait_until(lambda: httpx.get(server.url + "/api/v1/devices", headers=bearer(brief["token"])).status_code == 401,
               10, 0.1, "the one-second token to expire")
    r = httpx.get(server.url + "/api/v1/devices", headers=bearer(brief["token"]))
    assert "expired at" in r.json()["detail"]
    states = {t["name"]: t["state"] for t in admin.get("/api/v1/tokens", params={"all": "true"}).json()}
    assert states == {"admin": "active", "ci": "revoked", "brief": "expired"}

    # the last admin token cannot be revoked; once another exists it can, by id
    assert admin.delete("/api/v1/tokens/admin").status_code == 409
    other = admin.post("/api/v1/tokens", json={"name": "admin2", "role": "admin"}).json()
    first_id = next(t["id"] for t in admin.get("/api/v1/tokens").json() if t["name"] == "admin")
    assert admin.delete(f"/api/v1/tokens/{first_id[:8]}").status_code == 200
    assert httpx.get(server.url + "/api/v1/devices", headers=bearer(server.admin_token)).status_code == 401
    assert httpx.get(server.url + "/api/v1/tokens", headers=bearer(other["token"])).status_code == 200


def test_token_cli_create_list_revoke(server):
    made = as_json(cli(server, "token", "create", "--name", "robot", "--role", "viewer", "--expires", "30d", "--json"))
    assert made["expires_at"] is not None and made["state"] == "active"
    listed = as_json(cli(server, "token", "list", "--json"))
    assert [t["name"] for t in listed] == ["admin", "robot"] and made["token"] not in str(listed)
    cli(server, "token", "revoke", made["id"])
    r = httpx.get(server.url + "/api/v1/devices", headers=bearer(made["token"]))
    assert r.status_code == 401


def test_enrolment_tokens_are_listed_and_revoked(server, admin):
    made = admin.post("/api/v1/enrollment-tokens", json={"count": 2, "labels": {"site": "a"}}).json()
    keep, drop = made["tokens"]
    listed = admin.get("/api/v1/enrollment-tokens")
    assert sorted(t["id"] for t in listed.json()) == sorted(made["ids"])
    assert keep not in listed.text and drop not in listed.text
    revoked = as_json(cli(server, "device", "token", "revoke", made["ids"][1], "--json"))
    assert revoked["state"] == "revoked"
    r = httpx.post(server.url + "/api/v1/enroll", json={"token": drop, "device_id": "d-dropped"})
    assert r.status_code == 403 and "revoked" in r.json()["detail"]
    assert httpx.post(server.url + "/api/v1/enroll", json={"token": keep, "device_id": "d-kept"}).status_code == 200
    assert admin.get("/api/v1/enrollment-tokens").json() == []  # nothing left that can enrol
    every = {t["id"]: t for t in as_json(cli(server, "device", "token", "list", "--all", "--json"))}
    assert every[made["ids"][0]]["state"] == "used" and every[made["ids"][0]]["used_by"] == "d-kept"
    assert every[made["ids"][1]]["state"] == "revoked"
    [token] = as_json(cli(server, "device", "token", "--json"))["tokens"]  # the bare form still creates one
    assert len(token) >= 24


def serve(data: Path, broker_url: str, token: str | None) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "EDGEFLEET_ADMIN_TOKEN"}
    if token is not None:
        env["EDGEFLEET_ADMIN_TOKEN"] = token
    return subprocess.Popen([sys.executable, "-m", "edgefleet", "hub", "serve", "--data", str(data), "--mqtt", broker_url,
                             "--port", "0"], cwd=ROOT, env={**env, **hub_env(data)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_the_env_admin_token_replaces_the_previous_one(broker, tmp_path, monkeypatch):
    data = tmp_path / "hub"
    first, second = secrets.token_urlsafe(32), secrets.token_urlsafe(32)

    def start(token: str) -> HubServer:
        monkeypatch.setenv("EDGEFLEET_ADMIN_TOKEN", token)
        return HubServer(HubConfig(data, broker.url, mqtt_client_id=f"hub-{secrets.token_hex(4)}", **hub_db(data)))  # `with` starts it

    with start(first) as s:
        robot = httpx.post(s.url + "/api/v1/tokens", headers=bearer(first), json={"name": "robot", "role": "viewer"})
        robot_token = robot.json()["token"]
    with start(second) as s:
        r = httpx.get(s.url + "/api/v1/devices", headers=bearer(first))
        assert r.status_code == 401 and "revoked" in r.json()["detail"]  # it used to stay valid for ever
        assert httpx.get(s.url + "/api/v1/devices", headers=bearer(second)).status_code == 200
        assert httpx.get(s.url + "/api/v1/devices", headers=bearer(robot_token)).status_code == 200  # API tokens stay
        assert (data / "admin-token").read_text().strip() == second
        replaced = httpx.get(s.url + "/api/v1/audit", headers=bearer(second), params={"action": "token.replaced"})
        assert [e["actor"] for e in replaced.json()] == ["hub"]

    # a revoked token never comes back, and a short one is refused: each with one line, before anything starts
    for token, reason in ((first, "was revoked at"), ("abc", "is 3 characters: a token must have at least 32")):
        proc = serve(data, broker.url, token)
        try:
            out, errs = proc.communicate(timeout=120)
        finally:
            proc.kill()  # a hub that started anyway (as before this check) must not outlive the test
        assert proc.returncode == 1, (out, errs)
        assert reason in errs and len(errs.strip().splitlines()) == 1, errs


@pytest.mark.hubstore  # run again on PostgreSQL by scripts/test.sh
def test_every_mutation_is_audited_in_a_chain_that_names_the_edited_or_deleted_row(server, admin, tmp_path):
    admin.post("/api/v1/tokens", json={"name": "ci", "role": "operator"}).raise_for_status()
    admin.post("/api/v1/enrollment-tokens", json={}).raise_for_status()
    admin.post("/api/v1/keys/rotate", json={"role": "director"}).raise_for_status()
    build_versions(admin, tmp_path, n=1)  # a model registered, a module built
    admin.post("/api/v1/deployments", json={"name": "d", "module": "scorer:1", "target": "*"}).raise_for_status()
    wait_rollout(admin, "d", "succeeded")  # the controller's own records come before the list below, not after it
    admin.post("/api/v1/alerts/rules", json={"name": "off", "kind": "offline", "threshold": 1}).raise_for_status()
    admin.delete("/api/v1/alerts/rules/off").raise_for_status()  # a route that records nothing itself
    admin.delete("/api/v1/tokens/ci").raise_for_status()
    events = admin.get("/api/v1/audit").json()
    seen = {(e["action"], e["actor"]) for e in events}
    for action in ("token.created", "enrollment_tokens.created", "keys.rotated", "model.registered", "module.built",
                   "deployment.revision", "alert_rule.added", "api.delete_alert_rule", "token.revoked"):
        assert (action, "admin") in seen, (action, sorted(seen))
    assert all(e["ts"] and e["hash"] for e in events)
    assert sorted(a for a, _ in seen if a.startswith("api.")) == ["api.delete_alert_rule"]  # no double records

    ok = admin.get("/api/v1/audit/verify").json()
    assert ok["ok"] and ok["rows"] == len(events) and ok["head"]["id"] == events[0]["id"]
    assert "intact" in cli(server, "audit", "verify").stdout

    ids = [e["id"] for e in reversed(events)]

    def tamper(sql: str, row: int) -> None:  # behind the hub's back, on whichever store it runs
        with server.hub.db.transaction() as tx:
            tx.execute(sql, (row,))

    tamper("UPDATE audit SET actor = 'someone-else' WHERE id = ?", ids[3])
    broken = admin.get("/api/v1/audit/verify").json()
    assert not broken["ok"] and broken["broken"]["id"] == ids[3] and "edited" in broken["broken"]["reason"]
    assert broken["rows"] == 3
    proc = cli(server, "audit", "verify", ok=False)
    assert proc.returncode == 1 and f"row {ids[3]} " in proc.stderr
    tamper("UPDATE audit SET actor = 'admin' WHERE id = ?", ids[3])  # put back: intact again
    assert admin.get("/api/v1/audit/verify").json()["ok"]
    tamper("DELETE FROM audit WHERE id = ?", ids[5])
    broken = admin.get("/api/v1/audit/verify").json()
    assert not broken["ok"] and broken["broken"]["id"] == ids[6]
    assert f"does not chain to row {ids[4]}" in broken["broken"]["reason"]


def test_audit_rows_of_an_older_hub_join_the_chain(tmp_path):
    db = hub_store(tmp_path)
    with db.transaction() as tx:  # as a hub before the chain wrote them: no hashes
        for i in range(3):
            tx.execute("INSERT INTO audit (ts, actor, action, subject, detail) VALUES (?, 'old', 'x', ?, '{}')",
                       (1.5 + i, f"s{i}"))
    seal(db)
    record(db, "new", "y", "s3")
    assert verify(db) | {"head": None} == {"ok": True, "rows": 4, "broken": None, "head": None}
    with db.transaction() as tx:  # a row stripped of its hash later is not chained again: it is reported
        tx.execute("UPDATE audit SET hash = NULL WHERE subject = 's1'")
    seal(db)
    assert verify(db)["broken"]["reason"].endswith("has no hash: it was written around the chain")
    db.close()
