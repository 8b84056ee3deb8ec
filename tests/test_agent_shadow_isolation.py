"""A shadow candidate is held to what a live version is: the same download and disk limits, the same sandbox.

Real parts: the session's mosquitto and the test hub side (``tests/hubside.py``), real worker processes,
bubblewrap, a real small filesystem (``tests/test_agent_full_disk.py``'s tmpfs) and the snooping module of
``tests/test_agent_local_access.py``, here as the candidate. Needs root (the mount, bubblewrap's
privileged mode); the CI runs as root.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil

import msgspec
import pytest

from agent.workerproc import worker_sandbox
from protocol.messages import ShadowPoint, ShadowSpec
from tests.hubside import HubSide, new_device, running_agent, until
from tests.test_agent_full_disk import LIMITS, small_fs  # noqa: F401  (small_fs: the fixture)
from tests.test_agent_local_access import GOOD, SNOOP

# The live version of the snooping module: the same answer as a candidate that found nothing.
NOTHING = "def run(inputs):\n    return {'probability': [[0.0]] * len(inputs['x'])}\n"


@pytest.fixture
def hub(broker, tmp_path):
    h = HubSide(broker.url, tmp_path / "hub")
    yield h
    h.close()


def shadow_report(hub: HubSide, device: str) -> tuple[str, str] | None:
    rep = hub.reported(device)
    m = rep.modules[0] if rep and rep.modules else None
    return (m.shadow.state, m.shadow.error) if m and m.shadow else None


def with_shadow(live, cand, **spec) -> object:
    return msgspec.structs.replace(live.desired(), shadow=ShadowSpec(version=cand.manifest.version, bundle=cand.digest,
                                                                      size=cand.manifest.size, **spec))


def test_a_candidate_stopped_by_the_disk_limits_says_why_and_is_tried_again_as_a_live_install(hub, small_fs):  # noqa: F811
    v1, cand = hub.build("m", 1), hub.build("m", 2, pad_bytes=1_500_000)
    device, filler = new_device(), small_fs / "filler"

    async def main() -> None:
        async with running_agent(hub, device, small_fs, limits=LIMITS, isolation="process"):
            hub.publish_desired(device, 1, [v1.desired()])
            await until(lambda: hub.module_state(device, "m") == "running", 30, "v1 running")
            # a neighbour takes the disk but 1 MiB: room for the journal and state, not for the candidate
            filler.write_bytes(b"\0" * (shutil.disk_usage(small_fs).free - 2**20))
            hub.publish_desired(device, 2, [with_shadow(v1, cand)])
            state, error = await until(lambda: (r := shadow_report(hub, device)) and r[0] == "failed" and r, 30,
                                       "the candidate refused for want of space")
            # the agent's limits (0.25 MB kept free, tried again after 0.5 s), not an installer's defaults
            assert "not enough free space" in error and "0.2 MB kept free" in error, error
            assert error.endswith("(trying again in 0.5s)"), error
            assert hub.module_state(device, "m") == "running"  # the live version never noticed
            filler.unlink()  # room again: the candidate installs by itself, as a live version would
            await until(lambda: (shadow_report(hub, device) or ("",))[0] == "running", 30, "the candidate running")
    asyncio.run(main())


@pytest.mark.parametrize("sandboxed", [True, False])
def test_a_shadow_worker_cannot_read_the_device_credentials(hub, tmp_path, monkeypatch, sandboxed):
    """The candidate's answer is what it found (a bit per secret); the live version always answers 0, so every
    disagreement is a secret found. Without the sandbox (the control) the same candidate finds them."""
    if os.geteuid() != 0:
        pytest.fail("this test needs root (bubblewrap's privileged mode); the CI runs as root")
    monkeypatch.setenv("DEVICE_SECRET", "s3cret")
    device, data = new_device(), tmp_path / "device"
    live = hub.build("snoop", 1, script=NOTHING)
    cand = hub.build("snoop", 2, script=SNOOP.format(data=str(data)))

    async def main() -> list[ShadowPoint]:
        box = worker_sandbox("on" if sandboxed else "off", data)
        async with running_agent(hub, device, data, isolation="process", module_sandbox=box) as agent:
            hub.publish_desired(device, 1, [with_shadow(live, cand, compare="tolerance")])
            await until(lambda: (shadow_report(hub, device) or ("",))[0] == "running", 60, "the candidate running")
            body = json.dumps(GOOD).encode()
            for _ in range(5):
                await agent.infer_json(agent.active["snoop"], body)
            await until(lambda: sum(p.compared for p in points(hub, device)) >= 5, 30, "the comparisons reported")
            return points(hub, device)
    got = asyncio.run(main())
    compared, differ = sum(p.compared for p in got), sum(p.disagreements for p in got)
    assert compared >= 5 and sum(p.errors for p in got) == 0
    assert differ == (compared if not sandboxed else 0)  # sandboxed: it found nothing, so it always agreed


def points(hub: HubSide, device: str) -> list[ShadowPoint]:
    return [p for b in hub.telemetry(device) for p in b.shadow]


