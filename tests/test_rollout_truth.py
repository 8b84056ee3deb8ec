"""Rollouts that say the truth: updates keep their plan, waves name who holds them, results name who was left out."""

from __future__ import annotations

import httpx
import pytest

from hub.errors import Invalid
from hub.fleet.targeting import check_target
from hub.store import dumps
from tests.clirun import cli
from tests.rollout_support import build_versions, rollout

pytestmark = pytest.mark.hubstore  # run again on PostgreSQL by scripts/test.sh


@pytest.fixture
def hub_options() -> dict:
    return {"rollout_tick_s": 3600}  # the test drives the controller step by step


def enrol(server, admin, ids: list[str], labels: dict[str, str]) -> None:
    tokens = admin.post("/api/v1/enrollment-tokens", json={"count": len(ids), "labels": labels}).json()["tokens"]
    for t, d in zip(tokens, ids, strict=True):
        httpx.post(server.url + "/api/v1/enroll", json={"token": t, "device_id": d}).raise_for_status()


def report(hub, mods, devices, version: int, state: str, online: bool = True) -> None:
    with hub.db.transaction() as tx:
        for d in devices:
            tx.execute("UPDATE devices SET online = ?, reported = ? WHERE id = ?", (int(online), dumps({"modules": [
                {"name": "scorer", "version": version, "bundle": mods[version - 1]["digest"], "state": state}]}), d))


def step(server, admin, name: str) -> dict:
    server.hub.rollouts.step(rollout(admin, name)["id"])
    return rollout(admin, name)


def test_an_update_keeps_the_strategy_bake_and_gates_and_shows_the_effective_plan(server, admin, tmp_path):
    build_versions(admin, tmp_path, n=3)
    ids = [f"up-{i}" for i in range(4)]
    enrol(server, admin, ids, {"ring": "up"})
    first = admin.post("/api/v1/deployments", json={
        "name": "up", "module": "scorer:1", "target": "ring=up", "strategy": "waves:50", "bake_s": 60,
        "gates": {"max_error_rate": 0.05}, "on_failure": "halt", "wave_timeout_s": 120}).json()
    assert first["plan"]["strategy"] == "waves:50,100" and first["plan"]["inherited"] == []

    r = admin.patch("/api/v1/deployments/up", json={"module": "scorer:2"})  # only the version
    assert r.status_code == 200, r.text
    plan = r.json()["plan"]
    assert plan["strategy"] == "waves:50,100" and plan["waves"] == ["50%", "100%"]
    assert plan["bake_s"] == 60 and plan["on_failure"] == "halt" and plan["wave_timeout_s"] == 120
    assert plan["gates"]["max_error_rate"] == 0.05 and plan["gates"]["max_install_failure_rate"] == 0
    assert set(plan["inherited"]) == {"strategy", "bake_s", "gates", "on_failure", "wave_timeout_s", "approve", "window"}
    st = rollout(admin, "up")
    assert st["waves"] == 2 and st["counts"] == {"pending": 2, "waiting": 2}  # not everyone at once

    # what is given replaces (the bake) or merges (the gates); the rest stays
    plan = admin.patch("/api/v1/deployments/up", json={"module": "scorer:3", "bake_s": 0,
                                                       "gates": {"min_reporting": 0.5}}).json()["plan"]
    assert plan["bake_s"] == 0 and plan["strategy"] == "waves:50,100"
    assert plan["gates"]["max_error_rate"] == 0.05 and plan["gates"]["min_reporting"] == 0.5
    assert "bake_s" not in plan["inherited"] and "gates" not in plan["inherited"]

    # the CLI sends only what it is given, and prints the plan it got
    out = cli(server, "deployment", "update", "up", "--module", "scorer:1").stderr
    assert "rollout plan: waves:50,100 (waves 50%, 100%); bake 0s;" in out, out
    assert "max_error_rate=0.05" in out and "on failure halt" in out and "from the last rollout: strategy" in out


def test_a_held_wave_names_its_devices_counts_down_and_the_result_names_who_was_left_out(server, admin, tmp_path):
    hub = server.hub
    mods = build_versions(admin, tmp_path, n=1)
    ids = [f"ho-{i}" for i in range(4)]
    enrol(server, admin, ids, {"ring": "ho"})
    admin.post("/api/v1/deployments", json={"name": "ho", "module": "scorer:1", "target": "ring=ho",
                                            "wave_timeout_s": 300}).raise_for_status()
    report(hub, mods, ids[:3], 1, "running")
    report(hub, mods, ids[3:], 1, "pending", online=False)  # one device went away before it installed
    st = step(server, admin, "ho")
    assert st["state"] == "wave[1].installing"
    assert [d["id"] for d in st["holding"]] == ["ho-3"] and st["holding"][0]["online"] is False
    assert st["holding_count"] == 1 and 0 < st["wave_timeout_in_s"] <= 300
    with hub.db.transaction() as tx:  # the wave timeout has passed (no sleeping in tests)
        tx.execute("UPDATE rollouts SET phase_started_at = 0")
    done = step(server, admin, "ho")
    assert done["phase"] == "succeeded"
    assert done["outcome"] == done["reason"] == "succeeded with 1 not updated (1 offline): ho-3"
    assert [d["id"] for d in done["not_updated"]] == ["ho-3"] and done["not_updated_count"] == 1
    assert done["counts"] == {"running": 3, "pending": 1}

    # a device that joins after the rollout finished was not targeted by it: "new", not "waiting"
    enrol(server, admin, ["ho-late"], {"ring": "ho"})
    after = rollout(admin, "ho")
    assert after["counts"].get("waiting") is None and after["counts"]["new"] == 1
    assert next(d for d in after["devices"] if d["id"] == "ho-late")["state"] == "new"
    # the CLI's status shows the outcome
    assert "succeeded with 1 not updated (1 offline): ho-3" in cli(server, "rollout", "status", "ho").stdout


def test_a_rollout_where_every_device_updated_says_plain_succeeded(server, admin, tmp_path):
    mods = build_versions(admin, tmp_path, n=1)
    enrol(server, admin, ["ok-0", "ok-1"], {"ring": "ok"})
    admin.post("/api/v1/deployments", json={"name": "ok", "module": "scorer:1", "target": "ring=ok"})
    report(server.hub, mods, ["ok-0", "ok-1"], 1, "running")
    done = step(server, admin, "ok")
    assert done["outcome"] == "succeeded" and done["reason"] == "" and done["not_updated"] == []


@pytest.mark.parametrize("target, why", [
    ("site==berlin", "use '=' once"), ("site!==berlin", "use '!=' once"), ("site~berlin", "'~' is not an operator"),
    ("=berlin", "has no key"), ("site=", "has no value"), ("site=berlin,,tier=a", "empty item"),
    ("site=ber~lin", "mistyped operator"), ("site=berlin,", "empty item"), ("si te=x", "not a label key"),
    ("dev 1", "neither a device id nor a label condition"),
])
def test_typo_selectors_are_refused_with_the_reason(admin, server, tmp_path, target, why):
    with pytest.raises(Invalid, match=why):
        check_target(target)
    if target == "site==berlin":  # once through the API too
        build_versions(admin, tmp_path, n=1)
        r = admin.post("/api/v1/deployments", json={"name": "typo", "module": "scorer:1", "target": target})
        assert r.status_code == 422 and "use '=' once" in r.json()["detail"]


def test_good_selectors_still_parse():
    assert check_target("*").everyone
    assert check_target("site=berlin, tier!=dev").matches("x", {"site": "berlin", "tier": "prod"})
    assert check_target("dev-1,dev.2").ids == {"dev-1", "dev.2"}
    assert check_target("k8s.io/zone=eu-1").equals == (("k8s.io/zone", "eu-1"),)
