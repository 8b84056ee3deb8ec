"""examples/ci/pipeline.sh, the CI job, against a real hub and simulated fleets over real mosquitto.

Success: the first run becomes the champion; the fleet's inputs then drift, the drift alert's webhook
reaches examples/ci/retrain_receiver.py, which runs the same pipeline: the retrained version is
evaluated, rolled out and promoted. Rollback: a version whose health check fails on the devices is
rolled back by the canary's gate; the job exits non-zero and the champion stays.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hub.testing import wait_until
from tests.clirun import ROOT, as_json, cli
from tests.rollout_support import all_running

PIPELINE = ROOT / "examples" / "ci" / "pipeline.sh"
RECEIVER = ROOT / "examples" / "ci" / "retrain_receiver.py"
SECRET = "retrain-secret-shared-with-the-hub"


@pytest.fixture
def hub_options() -> dict:
    return {"rollout_tick_s": 0.2, "alert_eval_s": 1.0, "webhook_backoff_s": 0.2, "blob_gather_s": 0.2}


def job_env(server, tmp_path: Path, seed: int, trainer: str = "sklearn") -> dict[str, str]:
    """What the workflow gives the job (examples/ci/workflow.yml), with short bakes for a test."""
    return os.environ | {
        "EDGEFLEET_HUB": server.url, "EDGEFLEET_TOKEN": server.admin_token, "PYTHON": sys.executable,
        "EDGEFLEET": str(Path(sys.executable).parent / "edgefleet"), "TRAINER": trainer, "SEED": str(seed),
        "BAKE": "1s", "ROLLOUT_TIMEOUT": "60", "COLLECT_PPM": "1000000", "WORK": str(tmp_path / f"run{seed}"),
    }


def run_pipeline(server, tmp_path: Path, seed: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(PIPELINE)], env=job_env(server, tmp_path, seed), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def sim(server, tmp_path: Path, prefix: str, n: int, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "edgefleet", "--hub", server.url, "--token", server.admin_token,
                             "sim", "run", "--devices", str(n), "--data", str(tmp_path / prefix), "--prefix", prefix,
                             "--telemetry-interval", "1", *extra], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def online(admin, n: int) -> list[str]:
    return wait_until(lambda: [d["id"] for d in admin.get("/api/v1/devices").json() if d["online"]]
                      if sum(d["online"] for d in admin.get("/api/v1/devices").json()) >= n else None,
                      60, 0.2, f"{n} simulated devices online")


def stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def test_the_workflow_runs_this_pipeline():
    flow = yaml.safe_load((ROOT / "examples" / "ci" / "workflow.yml").read_text())
    runs = [s.get("run", "").strip() for job in flow["jobs"].values() for s in job["steps"]]
    assert "examples/ci/pipeline.sh" in runs
    assert set(flow[True]) >= {"push", "workflow_dispatch", "repository_dispatch"}  # YAML reads `on:` as True


def test_pipeline_promotes_then_a_drift_alert_retrains_through_the_webhook(server, admin, tmp_path):
    fleet = sim(server, tmp_path, "cia", 3, "--rate", "5")  # prefixes differ per test: one broker for the session
    receiver = drifted = None
    try:
        devices = online(admin, 3)
        first = run_pipeline(server, tmp_path, seed=1)
        assert first.returncode == 0, first.stdout + first.stderr
        assert "trained with sklearn" in first.stdout and "is not set: nothing to compare with" in first.stderr
        assert "rollout 1 of churn-edge succeeded (exit 0)" in first.stdout
        assert cli(server, "model", "alias", "get", "churn", "champion").stdout.strip() == "1"
        all_running(admin, devices, "churn", 1)
        assert admin.get("/api/v1/models/churn/versions/1/metrics").json()[0]["metrics"]["accuracy"] > 0.9

        # retraining on drift: the receiver runs the same job when the hub's signed webhook says so
        receiver = subprocess.Popen([sys.executable, str(RECEIVER), "--port", "0", "--once", "--deployment",
                                     "churn-edge", "--", "bash", str(PIPELINE)], cwd=ROOT, text=True,
                                    env=job_env(server, tmp_path, seed=2, trainer="numpy")  # the other trainer
                                    | {"EDGEFLEET_WEBHOOK_SECRET": SECRET},
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        url = receiver.stdout.readline().split()[-1]  # "listening on http://127.0.0.1:PORT/"
        cli(server, "webhook", "add", url, "--event", "alert.fired", "--secret", SECRET)
        cli(server, "alert", "add", "churn-drift", "--kind", "drift", "--deployment", "churn-edge", "--threshold", "0.2",
            "--window", "10s")
        drifted = sim(server, tmp_path, "cid", 2, "--rate", "25", "--shift", "3")  # the world changes
        out, _ = receiver.communicate(timeout=150)
        assert receiver.returncode == 0, out
        assert "retraining: input drift on x[0] in deployment churn-edge" in out
        assert "trained with numpy" in out and "registered churn:2" in out
        assert "compared with churn@champion = churn:1 (recorded on the same data)" in out
        assert "retraining finished: exit 0" in out
        assert cli(server, "model", "alias", "get", "churn", "champion").stdout.strip() == "2"
        fired = as_json(cli(server, "webhook", "deliveries", "--event", "alert.fired", "--json"))
        assert fired and fired[-1]["state"] == "delivered" and fired[-1]["last_status"] == 202
        all_running(admin, devices, "churn", 2)
    finally:
        stop(*[p for p in (fleet, drifted, receiver) if p is not None])


def test_a_version_failing_on_the_devices_rolls_back_and_fails_the_job(server, admin, tmp_path):
    # the simulated hardware fails the health check of churn:2 (the second build) on every device
    fleet = sim(server, tmp_path, "cir", 3, "--rate", "5", "--fail-share", "1", "--fail-module", "churn:2")
    try:
        devices = online(admin, 3)
        first = run_pipeline(server, tmp_path, seed=1)
        assert first.returncode == 0, first.stdout + first.stderr
        second = run_pipeline(server, tmp_path, seed=2)
        assert second.returncode == 3, second.stdout + second.stderr
        assert "PASSED" in second.stdout  # it passed its evaluation; the fleet's gate stopped it
        assert "rolled back: wave 1 gate failed: max_install_failure_rate" in second.stdout
        assert "the champion stays 1" in second.stdout and "==> promote" not in second.stdout
        assert cli(server, "model", "alias", "get", "churn", "champion").stdout.strip() == "1"
        st = admin.get("/api/v1/rollouts/churn-edge").json()
        assert st["phase"] == "rolled_back" and st["module"] == "churn:2" and st["counts"].get("rolled_back") == 1
        assert admin.get("/api/v1/deployments/churn-edge").json()["stable_revision"] == 1
        all_running(admin, devices, "churn", 1)
    finally:
        stop(fleet)
