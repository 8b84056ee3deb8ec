"""Retry the failed devices of a rollout, and approve each wave (issue 14): a real hub, broker and simulated agents."""

from __future__ import annotations

import threading

import pytest

from simulator.fleet import Fleet
from tests.cli_setup import enrol
from tests.clirun import as_json, cli
from tests.rollout_support import all_running, build_versions, wait_rollout

PREFIX = "rt"


@pytest.fixture
def hub_options() -> dict:
    return {"rollout_tick_s": 0.2}


class FailsOnce:
    """A device's health check that fails its first run (a transient fault: a busy sensor, a full disk)."""

    def __init__(self) -> None:
        self.runs = 0
        self.lock = threading.Lock()

    def __call__(self, inst) -> None:
        from modules.runners import ModelError

        with self.lock:
            self.runs += 1
            if self.runs == 1:
                raise ModelError("transient fault: the camera was busy")


def test_retry_installs_the_failed_devices_again_and_approve_starts_each_next_wave(server, admin, tmp_path):
    build_versions(admin, tmp_path, n=2)
    fleet = Fleet(server.url, server.admin_token, 3, tmp_path / "sim", rate=1, telemetry_interval=0.5, prefix=PREFIX)
    ids = fleet.device_ids()
    fleet.start()
    try:
        flaky = FailsOnce()
        next(a for a in fleet.agents if a.device_id == ids[0]).installer.health_gate = flaky
        admin.post("/api/v1/deployments", json={"name": "rt", "module": "scorer:1", "target": "sim=true",
                                                "on_failure": "halt"}).raise_for_status()
        halted = wait_rollout(admin, "rt", "halted")
        # it halts at the first failure, maybe before the others finished installing
        assert halted["counts"].get("rolled_back", 0) + halted["counts"].get("failed", 0) == 1
        assert sum(halted["counts"].values()) == 3
        assert "transient fault" in halted["reason"]

        retried = as_json(cli(server, "rollout", "retry", "rt", "--json"))
        assert retried["retried"] == [ids[0]] and retried["phase"] == "installing"
        # its old failure no longer counts: pending until it reports on the new state (or already reinstalling)
        assert sum(retried["counts"].values()) == 3 and not {"failed", "rolled_back"} & set(retried["counts"])
        done = wait_rollout(admin, "rt", "succeeded")
        assert done["outcome"] == "succeeded" and flaky.runs == 2  # installed once more, and it took
        all_running(admin, ids, "scorer", 1)
        nothing = cli(server, "rollout", "retry", "rt", ok=False)
        assert nothing.returncode == 1 and "nothing to retry" in nothing.stderr

        # v2, one device per wave, each wave after the first waits for a person
        up = cli(server, "deployment", "update", "rt", "--module", "scorer:2", "--strategy", "canary:1",
                 "--approve").stderr
        assert "each wave after the first waits for rollout approve" in " ".join(up.split())
        waiting = wait_rollout(admin, "rt", "awaiting_approval")
        assert waiting["state"] == "wave[1].awaiting_approval" and waiting["counts"] == {"running": 1, "waiting": 2}
        assert "waits for approval" in cli(server, "rollout", "status", "rt").stdout
        approved = as_json(cli(server, "rollout", "approve", "rt", "--json"))
        assert approved["phase"] in ("installing", "succeeded") and approved["wave"] == 2
        done = wait_rollout(admin, "rt", "succeeded")
        all_running(admin, ids, "scorer", 2)
        actions = [e["action"] for e in admin.get("/api/v1/audit", params={"subject": "rt"}).json()]
        assert "rollout.approved" in actions and "rollout.retry" in actions
        late = cli(server, "rollout", "approve", "rt", ok=False)
        assert late.returncode == 1 and "no rollout in progress" in late.stderr
    finally:
        fleet.stop()


def test_retry_is_refused_once_the_devices_no_longer_want_that_version(server, admin, tmp_path):
    build_versions(admin, tmp_path, n=1)
    enrol(server, admin, "never-online", {"ring": "gone"})
    admin.post("/api/v1/deployments", json={"name": "gone", "module": "scorer:1", "target": "ring=gone"}
               ).raise_for_status()
    admin.post("/api/v1/rollouts/gone/abort").raise_for_status()
    refused = admin.post("/api/v1/rollouts/gone/retry")
    assert refused.status_code == 409 and "is aborted: its devices no longer want revision 1" in refused.text
    assert admin.post("/api/v1/rollouts/gone/approve").status_code == 409
