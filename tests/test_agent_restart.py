"""Restarts: nothing is downloaded twice, updates move only new chunks, and the daemon runs as a process."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from protocol.messages import decode
from protocol.topics import Channel
from tests.hubside import HubSide, new_device, running_agent, until

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def hub(broker, tmp_path):
    h = HubSide(broker.url, tmp_path / "hub")
    yield h
    h.close()


def test_restart_with_chunk_store_downloads_nothing_and_updates_move_only_new_chunks(hub, tmp_data):
    device = new_device()
    pad = 700_000  # three chunks shared by both versions
    v1 = hub.build("classifier", 1, pad_bytes=pad, pad_seed=7)
    v2 = hub.build("classifier", 2, pad_bytes=pad, pad_seed=7)
    shared = set(v1.chunks) & set(v2.chunks)
    assert len(shared) >= 3

    async def main() -> None:
        async with running_agent(hub, device, tmp_data):
            hub.publish_desired(device, 1, [v1.desired()])
            await until(lambda: hub.module_state(device, "classifier") == "running", 20, "v1 running")
        before = len(hub.requests)

        async with running_agent(hub, device, tmp_data) as agent:  # plain restart: runs from disk
            await until(lambda: "classifier" in agent.active, 10, "v1 active after restart")
            await asyncio.sleep(0.5)
            assert len(hub.requests) == before

        # Lose the unpacked modules and the journal, as if the disk were restored from the chunk store alone.
        shutil.rmtree(tmp_data / "modules")
        (tmp_data / "journal.json").unlink()
        async with running_agent(hub, device, tmp_data) as agent:
            await until(lambda: agent.installer.current("classifier") == v1.digest and "classifier" in agent.active,
                        20, "v1 re-installed from the chunk store")
            assert len(hub.requests) == before  # manifest cached, every chunk present: no request at all

            hub.publish_desired(device, 2, [v2.desired()])
            await until(lambda: hub.reported(device).revision == 2
                        and hub.module_state(device, "classifier") == "running", 20, "v2 running")
            asked = set(hub.chunk_requests(v2.digest))
            assert asked and not asked & shared  # a delta update
            assert asked == set(v2.chunks) - shared

    asyncio.run(main())


def test_python_m_agent_runs_as_a_process_and_stops_on_sigterm(hub, tmp_data):
    device = new_device()
    bundle = hub.build("classifier", 1)
    hub.identity(device, tmp_data)
    hub.publish_desired(device, 1, [bundle.desired()])
    proc = subprocess.Popen([sys.executable, "-m", "agent", "--data", str(tmp_data), "--rate", "20",
                             "--telemetry-interval", "0.3"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while hub.module_state(device, "classifier") != "running" or not any(
                p.inferences for b in hub.telemetry(device) for p in b.points):
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "agent process did not install and run the module"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert decode(Channel.STATUS, hub.messages(device, Channel.STATUS)[-1]).online is False
