"""kill -9 of the agent process in every install state: afterwards a working module, and a truthful report.

The installer's test hook ``EDGEFLEET_AGENT_CRASH_AT=<state>`` makes the agent SIGKILL itself right
after persisting that state. Each trial pre-installs v1, publishes a desired state naming v2 with a 1 s
bake (so ``baking`` is a state to die in: the restarted agent bakes again, then commits), lets
the agent die at the chosen state, checks the disk holds a complete, verifiable active version (old
or new, never neither), restarts the agent, and checks that what it reports on MQTT is what answers
inference and what ``current`` points at.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from msgspec.structs import replace

from agent.install import CRASH_ENV, Installer
from modules.store import ContentStore
from protocol.messages import BakePolicy, Command, CommandReply, decode
from protocol.topics import Channel, device_topic
from tests.hubside import Bundle, HubSide, new_device

ROOT = Path(__file__).resolve().parents[1]
GOOD_STATES = ["downloading", "verifying", "staged", "activating", "health_check", "baking", "committed"]
BAD_STATES = ["activating", "health_check", "rolling_back", "rolled_back"]  # v2 fails its health check
# Two rounds of every case: 2 * (7 + 4) = 22 kills.
CASES = [(state, False) for state in GOOD_STATES] * 2 + [(state, True) for state in BAD_STATES] * 2


@pytest.fixture
def hub(broker, tmp_path):
    h = HubSide(broker.url, tmp_path / "hub")
    h.coalesce = 0.0  # trials run in parallel and each must be served its chunks
    yield h
    h.close()


def wait(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"agent exited ({proc.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)  # polling another process through the broker: no event to await here


def start_agent(data: Path, crash_at: str | None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    if crash_at:
        env[CRASH_ENV] = crash_at
    return subprocess.Popen([sys.executable, "-m", "agent", "--data", str(data), "--telemetry-interval", "0.5",
                             "--api-port", "0", "--log-level", "WARNING"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def preinstall(hub: HubSide, data: Path, bundle: Bundle) -> None:
    chunks = ContentStore(data / "chunks")
    for blob in bundle.chunks.values():
        chunks.put(blob)

    async def fetch():
        return bundle.envelope
    entry = asyncio.run(Installer(data, hub.trusted_root(), chunks).install(bundle.desired(), fetch))
    assert entry.state == "committed"


def infer(hub: HubSide, device: str) -> CommandReply:
    cmd = Command(id=uuid.uuid4().hex, name="infer", args={"module": "classifier", "inputs": {"x": [[0.1, 0.2, 0.3, 0.4]]}})
    hub.publish_raw(device_topic(device, Channel.CMD), cmd.encode())

    def reply():
        for raw in hub.messages(device, Channel.CMD_RES):
            r = decode(Channel.CMD_RES, raw)
            if r.id == cmd.id:
                return r
        return None
    return wait(reply, 20, "infer reply")


def trial(hub: HubSide, base: Path, v1: Bundle, v2: Bundle, crash_at: str, v2_failing: bool) -> None:
    device = new_device()
    data = base / device
    hub.identity(device, data)
    preinstall(hub, data, v1)
    hub.publish_desired(device, 2, [replace(v2.desired(), bake=BakePolicy(seconds=1))])

    proc = start_agent(data, crash_at)
    try:
        assert proc.wait(60) == -signal.SIGKILL, f"agent did not stop at {crash_at}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # The power-cut view: some complete, signed, hash-checked version is active on disk.
    on_disk = Installer(data, hub.trusted_root(), ContentStore(data / "chunks")).load_installed("classifier")
    assert on_disk.bundle in (v1.digest, v2.digest)
    assert not (v2_failing and crash_at == "rolled_back" and on_disk.bundle != v1.digest)

    proc = start_agent(data, None)
    try:
        want = "rolled_back" if v2_failing else "running"
        wait(lambda: (r := hub.reported(device)) is not None and r.revision == 2
             and any(m.name == "classifier" and m.state == want for m in r.modules), 60, f"report {want}", proc)
        reply = infer(hub, device)
        assert reply.ok, reply.error
        current = os.readlink(data / "modules" / "classifier" / "current")
        serving = v1 if v2_failing else v2
        assert current == serving.digest
        assert reply.result["version"] == serving.manifest.version  # what answers is what is reported
        mod = hub.reported(device).modules[0]
        assert mod.bundle == v2.digest and (mod.state == "running") == (not v2_failing)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_kill_9_in_every_install_state_leaves_a_working_module_and_a_true_report(hub, tmp_path):
    v1 = hub.build("classifier", 1)
    v2_good = hub.build("classifier", 2)
    v2_bad = hub.build("classifier", 2, failing=True)
    with ThreadPoolExecutor(4) as pool:
        futures = {pool.submit(trial, hub, tmp_path / "devices", v1, v2_bad if bad else v2_good, state, bad):
                   (state, bad) for state, bad in CASES}
        failures = []
        for fut, (state, bad) in futures.items():
            try:
                fut.result()
            except Exception as exc:
                failures.append(f"crash at {state} (v2 {'failing' if bad else 'good'}): {exc!r}")
    assert not failures, "\n".join(failures)
