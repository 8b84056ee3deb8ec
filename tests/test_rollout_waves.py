"""Acceptance: waved rollouts to 50 simulated devices over a real broker; a broken version halts and rolls back."""

from __future__ import annotations

import httpx
import pytest

from hub.rollout.rollouts import wave_order
from simulator.fleet import Fleet
from simulator.scenarios import Scenario
from tests.rollout_support import DesiredRecorder, all_running, build_versions, cli, wait_rollout

N = 50
PREFIX = "wv"  # with this prefix, 11 of 50 devices fail scorer:3, 2 of them in the first 20% wave
NAME = "scorer-fleet"


@pytest.fixture
def hub_options() -> dict:
    return {"rollout_tick_s": 0.2}


def test_three_wave_rollout_then_broken_version_halts_in_wave_one_and_rolls_back(server, admin, broker, tmp_path):
    build_versions(admin, tmp_path, n=3)
    scenario = Scenario(fail_share=0.2, fail_modules=("scorer:3",))
    fleet = Fleet(server.url, server.admin_token, N, tmp_path / "sim", rate=2, telemetry_interval=0.5,
                  prefix=PREFIX, scenario=scenario)
    ids = fleet.device_ids()
    failing = {d for d in ids if scenario.failing(d)}
    first_wave = set(sorted(ids, key=lambda d: wave_order(NAME, d))[:10])
    assert failing & first_wave and len(failing) < N // 2  # the scenario's precondition, fixed by the ids
    recorder = DesiredRecorder(broker.url, ids)
    fleet.start()
    try:
        admin.post("/api/v1/deployments", json={"name": NAME, "module": "scorer:1", "target": "sim=true"}
                   ).raise_for_status()
        wait_rollout(admin, NAME, "succeeded")
        all_running(admin, ids, "scorer", 1)

        # v2 in three waves, gated on install failures, error rate and reporting devices
        gates = {"max_install_failure_rate": 0.0, "max_error_rate": 0.05, "min_reporting": 0.2}
        r = admin.patch(f"/api/v1/deployments/{NAME}", json={"module": "scorer:2", "strategy": "waves:10,50,100",
                                                             "bake_s": 2, "gates": gates})
        assert r.status_code == 200, r.text
        assert r.json()["revision"] == 2 and r.json()["published"] == 5  # wave 1: 10% of 50
        done = wait_rollout(admin, NAME, "succeeded")
        assert done["counts"] == {"running": N} and done["last_gate"]["ok"]
        all_running(admin, ids, "scorer", 2)
        waves = [e["detail"] for e in reversed(admin.get("/api/v1/audit", params={"subject": NAME}).json())
                 if e["action"] == "rollout.installing" and e["detail"]["rollout"] == done["id"]]
        assert [(w["wave"], w["wave_size"]) for w in waves] == [(1, 5), (2, 25), (3, 50)]

        # v3 fails its health check on 20% of devices: the first wave's gate fails and it is rolled back
        r = admin.patch(f"/api/v1/deployments/{NAME}", json={"module": "scorer:3", "strategy": "waves:20,60,100",
                                                             "bake_s": 2, "gates": gates})
        assert r.json()["published"] == 10
        st = wait_rollout(admin, NAME, "rolled_back")
        assert st["state"] == "rolled_back" and st["wave"] == 1
        assert "max_install_failure_rate" in st["reason"] and "simulated failure" in st["reason"]
        assert st["counts"] == {"rolled_back": 10, "not_moved": N - 10}  # ended before their wave: not "waiting"
        text = httpx.get(server.url + "/metrics").text  # the same counts, for Prometheus
        assert f'edgefleet_hub_rollout_devices{{deployment="{NAME}",state="rolled_back"}} 10' in text
        assert f'edgefleet_hub_rollout_devices{{deployment="{NAME}",state="not_moved"}} {N - 10}' in text
        assert 'edgefleet_hub_rollouts{phase="rolled_back"} 1' in text
        assert {d["id"] for d in st["devices"] if d["wave"] == 1} == first_wave
        all_running(admin, ids, "scorer", 2)  # the wave is back on the previous version
        assert admin.get(f"/api/v1/deployments/{NAME}").json()["stable_revision"] == 2

        shown = cli(server.url, server.admin_token, "rollout", "status", NAME, "--json")
        assert shown["state"] == "rolled_back" and shown["reason"] == st["reason"]
        assert "gate failed" in cli(server.url, server.admin_token, "rollout", "status", NAME)
    finally:
        fleet.stop()
        recorder.close()
    # only the first wave ever heard of scorer:3, and every device's revisions only went up
    for dev, states in recorder.per_device().items():
        revisions = [rev for rev, _ in states]
        assert revisions == sorted(set(revisions)), (dev, revisions)
        got_v3 = any(("scorer", 3) in mods for _, mods in states)
        assert got_v3 == (dev in first_wave), dev
