"""The rollout state machine: its transition table, and a walk through it by the real controller and database."""

from __future__ import annotations

import httpx
import pytest

from hub.errors import Invalid
from hub.rollout import rollout_states as S
from hub.rollout.rollout_plan import Wave, parse_strategy
from hub.store import dumps
from tests.rollout_support import build_versions, rollout

pytestmark = pytest.mark.hubstore  # run again on PostgreSQL by scripts/test.sh


def test_transition_table_is_exactly_what_check_allows():
    states = list(S.TRANSITIONS)
    for old in states:
        for new in states:
            if new in S.TRANSITIONS[old]:
                S.check(old, new)
            else:
                with pytest.raises(S.IllegalTransition):
                    S.check(old, new)
    assert S.TERMINAL == {S.SUCCEEDED, S.ROLLED_BACK, S.ABORTED, S.SUPERSEDED}
    assert S.display(S.BAKING, 1) == "wave[2].baking" and S.display(S.HALTED, 1) == "halted"


def test_strategies():
    assert parse_strategy("all") == [Wave()]
    assert parse_strategy("canary:3") == [Wave(devices=3), Wave()]
    assert parse_strategy("canary:5%") == [Wave(percent=5), Wave()]
    assert parse_strategy("waves:1,10,50") == [Wave(1), Wave(10), Wave(50), Wave()]
    assert [w.size(50) for w in parse_strategy("waves:1,10,50,100")] == [1, 5, 25, 50]
    for bad in ("some", "waves:50,10", "canary:0", "waves:0,100"):
        with pytest.raises(Invalid):
            parse_strategy(bad)


@pytest.fixture
def hub_options() -> dict:
    # a long tick: the test drives the controller step by step (the loop would only do the same steps)
    return {"rollout_tick_s": 3600}

def test_controller_walks_the_table(server, admin, tmp_path):
    hub = server.hub
    mods = build_versions(admin, tmp_path, n=3)
    tokens = admin.post("/api/v1/enrollment-tokens", json={"count": 4, "labels": {"ring": "a"}}).json()["tokens"]
    ids = [f"st-{i}" for i in range(4)]
    for t, d in zip(tokens, ids, strict=True):
        httpx.post(server.url + "/api/v1/enroll", json={"token": t, "device_id": d}).raise_for_status()

    def report(devices, version: int, state: str) -> None:
        with hub.db.transaction() as tx:
            for d in devices:
                tx.execute("UPDATE devices SET reported = ? WHERE id = ?", (dumps({"modules": [
                    {"name": "scorer", "version": version, "bundle": mods[version - 1]["digest"], "state": state,
                     "error": "boom" if state == "rolled_back" else ""}]}), d))

    def step() -> str:
        st = rollout(admin, "walk")
        hub.rollouts.step(st["id"])
        return rollout(admin, "walk")["state"]

    def elapse() -> None:  # the bake time has passed (no sleeping in tests)
        with hub.db.transaction() as tx:
            tx.execute("UPDATE rollouts SET phase_started_at = 0")

    r = admin.post("/api/v1/deployments", json={"name": "walk", "module": "scorer:1", "target": "ring=a"}).json()
    assert r["published"] == 4 and rollout(admin, "walk")["state"] == "wave[1].installing"
    report(ids, 1, "running")
    assert step() == "succeeded"

    admin.patch("/api/v1/deployments/walk", json={"module": "scorer:2", "strategy": "waves:50", "bake_s": 60})
    st = rollout(admin, "walk")
    assert st["state"] == "wave[1].installing" and st["counts"] == {"pending": 2, "waiting": 2}
    moved = [d["id"] for d in st["devices"] if d["wave"] == 1]
    assert step() == "wave[1].installing"  # nobody has installed yet
    report(moved, 2, "running")
    assert step() == "wave[1].baking"
    assert admin.post("/api/v1/rollouts/walk/pause").json()["state"] == "paused"
    assert admin.post("/api/v1/rollouts/walk/pause").status_code == 409
    assert admin.post("/api/v1/rollouts/walk/resume").json()["state"] == "wave[1].baking"
    elapse()
    assert step() == "wave[2].installing"
    report(ids, 2, "running")
    assert step() == "wave[2].baking"
    elapse()
    assert step() == "succeeded"
    assert admin.get("/api/v1/deployments/walk").json()["stable_revision"] == 2

    # a failure with on_failure=halt: halted, resumed (fails again), aborted -> devices back on revision 2
    admin.patch("/api/v1/deployments/walk", json={"module": "scorer:3", "strategy": "canary:1", "on_failure": "halt"})
    moved = [d["id"] for d in rollout(admin, "walk")["devices"] if d["wave"] == 1]
    report(moved, 3, "rolled_back")
    assert step() == "halted" and "1 of 1 devices" in rollout(admin, "walk")["reason"]
    assert admin.post("/api/v1/rollouts/walk/resume").json()["state"] == "halted"
    assert admin.post("/api/v1/rollouts/walk/abort").json()["state"] == "aborted"
    assert hub.db.one("SELECT desired FROM devices WHERE id = ?", (moved[0],))["desired"].count(mods[1]["digest"])

    # rolling back on failure (an update keeps the last rollout's "halt" unless told otherwise); then a rollback
    # by hand re-deploys an earlier revision as a new one
    admin.patch("/api/v1/deployments/walk", json={"module": "scorer:3", "strategy": "canary:1", "on_failure": "rollback"})
    moved = [d["id"] for d in rollout(admin, "walk")["devices"] if d["wave"] == 1]
    report(moved, 3, "failed")
    assert step() == "rolled_back"
    back = admin.post("/api/v1/rollouts/walk/rollback", json={"to_revision": 1}).json()
    assert back["revision"] == 5 and back["module"] == "scorer:1"
    revs = admin.get("/api/v1/deployments/walk/revisions").json()
    assert [r["module"] for r in revs] == ["scorer:1", "scorer:3", "scorer:3", "scorer:2", "scorer:1"]

    seen = {(e["detail"].get("rollout"), e["action"]) for e in admin.get("/api/v1/audit", params={"subject": "walk"}).json()}
    for action in ("created", "installing", "baking", "paused", "succeeded", "halted", "aborted", "rolling_back",
                   "rolled_back"):
        assert any(a == f"rollout.{action}" for _, a in seen), action
    assert all(e["actor"] for e in admin.get("/api/v1/audit").json())
