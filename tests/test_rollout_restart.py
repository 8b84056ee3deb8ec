"""Durability: the hub process is killed (SIGKILL) mid-rollout and restarted; the rollout finishes where it was."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import psutil

from edgefleet.broker import free_port
from hub.testing import wait_until
from simulator.fleet import Fleet
from tests.pg import hub_env
from tests.rollout_support import DesiredRecorder, all_running, build_versions, rollout, wait_rollout
from tests.servicehub import TOKEN as SERVED_TOKEN
from tests.servicehub import ServedHub, alive

TOKEN = "restart-admin-token-0123456789abcdefgh"
NAME = "durable"


def start_hub(data, port: int, broker_url: str, log) -> subprocess.Popen:
    env = {**os.environ, "EDGEFLEET_ADMIN_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1", **hub_env(data)}
    proc = subprocess.Popen([sys.executable, "-m", "edgefleet", "hub", "serve", "--data", str(data), "--port", str(port),
                             "--mqtt", broker_url], env=env, stdout=log, stderr=subprocess.STDOUT)

    def up() -> bool:
        assert proc.poll() is None, "hub exited during start-up"
        try:
            return bool(httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).json().get("mqtt_connected"))
        except httpx.HTTPError:
            return False
    wait_until(up, 60, 0.1, "hub up and connected")
    return proc


def test_hub_killed_mid_rollout_resumes_without_stale_or_duplicated_revisions(broker, tmp_path):
    port, n = free_port(), 20
    log = open(tmp_path / "hub.log", "wb")
    hub = start_hub(tmp_path / "hub", port, broker.url, log)
    url = f"http://127.0.0.1:{port}"
    fleet = Fleet(url, TOKEN, n, tmp_path / "sim", rate=2, telemetry_interval=0.5, prefix="rs")
    recorder = DesiredRecorder(broker.url, fleet.device_ids())
    admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    try:
        build_versions(admin, tmp_path, n=2)
        fleet.start()
        admin.post("/api/v1/deployments", json={"name": NAME, "module": "scorer:1"}).raise_for_status()
        wait_rollout(admin, NAME, "succeeded")
        all_running(admin, fleet.device_ids(), "scorer", 1)

        admin.patch(f"/api/v1/deployments/{NAME}", json={"module": "scorer:2", "strategy": "waves:25,50,100",
                                                         "bake_s": 2}).raise_for_status()
        wait_until(lambda: rollout(admin, NAME)["wave"] >= 2, 120, 0.1, "the rollout in its second wave")
        before = rollout(admin, NAME)
        hub.send_signal(signal.SIGKILL)  # no clean shutdown: whatever is in SQLite is all there is
        hub.wait(10)
        hub = start_hub(tmp_path / "hub", port, broker.url, log)
        after = rollout(admin, NAME)
        assert after["id"] == before["id"] and after["wave"] >= before["wave"]  # picked up where it was
        done = wait_rollout(admin, NAME, "succeeded")
        assert done["id"] == before["id"] and done["counts"] == {"running": n}
        all_running(admin, fleet.device_ids(), "scorer", 2)
    finally:
        fleet.stop()
        recorder.close()
        admin.close()
        hub.send_signal(signal.SIGINT)
        hub.wait(20)
        log.close()
    per_device = recorder.per_device()
    assert set(per_device) == set(fleet.device_ids())
    for dev, states in per_device.items():
        revisions = [rev for rev, _ in states]
        assert revisions == sorted(set(revisions)), (dev, states)  # never a revision twice, never an older one
        versions = [dict(mods).get("scorer", 0) for _, mods in states]
        assert versions == sorted(versions) and versions[-1] == 2, (dev, states)  # never back to a stale version
        assert all(a[1] != b[1] for a, b in zip(states, states[1:])), (dev, states)  # each revision a real change


def test_hub_served_with_its_own_broker_killed_mid_rollout_on_200_devices_strands_nobody(tmp_path):
    """The documented way: ``hub serve --isolate`` (its own broker), SIGKILL mid-rollout, the same command again.

    The broker goes down with the hub and comes back on the address the devices were given, so the fleet
    reconnects and the rollout finishes. Five devices are lost while the hub is down: they are shown offline,
    hold their wave no longer than its timeout, and the result names them.
    """
    hub = ServedHub(tmp_path / "hub", "--isolate").start()
    fleet = Fleet(hub.url, SERVED_TOKEN, 195, tmp_path / "sim", rate=1, telemetry_interval=2, prefix="acc")
    lost = Fleet(hub.url, SERVED_TOKEN, 5, tmp_path / "lost", rate=1, telemetry_interval=2, prefix="lost")
    admin = hub.admin()
    try:
        build_versions(admin, tmp_path, n=2)
        fleet.start()
        lost.start()
        ids = fleet.device_ids() + lost.device_ids()
        admin.post("/api/v1/deployments", json={"name": NAME, "module": "scorer:1"}).raise_for_status()
        wait_rollout(admin, NAME, "succeeded", timeout=300)
        all_running(admin, ids, "scorer", 1, timeout=300)

        admin.patch(f"/api/v1/deployments/{NAME}", json={"module": "scorer:2", "strategy": "waves:10,50,100",
                                                         "wave_timeout_s": 60}).raise_for_status()
        wait_until(lambda: rollout(admin, NAME)["wave"] >= 2, 300, 0.2, "the rollout in its second wave")
        before, port, broker = rollout(admin, NAME), hub.broker_port, psutil.Process(hub.broker_pid)
        hub.signal(signal.SIGKILL)
        assert alive([broker], 10) == []  # the hub's broker went with it
        lost.stop()  # these devices are gone for good while the hub is down
        hub.start()  # the documented restart: the same command
        assert hub.broker_port == port

        def devices() -> dict[str, dict]:
            return {d["id"]: d for d in admin.get("/api/v1/devices").json()}
        shown = devices()
        assert not any(shown[d]["online"] for d in lost.device_ids())  # stranded: not shown online
        done = wait_rollout(admin, NAME, "succeeded", timeout=600)
        assert done["id"] == before["id"]
        all_running(admin, fleet.device_ids(), "scorer", 2, timeout=300)  # nobody who could reconnect is stranded
        shown = devices()
        assert all(shown[d]["online"] for d in fleet.device_ids())
        assert not any(shown[d]["online"] for d in lost.device_ids())
        left = {d["id"] for d in done["not_updated"]}
        assert left <= set(lost.device_ids())  # only the lost devices can be left out, and the result says so
        if left:
            assert done["outcome"].startswith(f"succeeded with {len(left)} not updated ({len(left)} offline)")
    finally:
        fleet.stop()
        lost.stop()
        admin.close()
        hub.close()
