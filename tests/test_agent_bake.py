"""The bake: after its health check a new version serves on probation; its error rate decides commit or rollback.

Against the real hub (the policy set per deployment travels in the signed desired state), the session's
mosquitto and real agents; the restart cases drive the installer's journal directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest
from msgspec.structs import replace

from agent.core import Agent
from agent.install import MAX_BAKE_STARTS, Installer
from modules.store import ContentStore
from protocol.messages import BakePolicy
from tests.clirun import cli
from tests.hubside import HubSide, RealHub, agent_running, until
from tests.test_agent_http import build, hub_view

# Passes the health check (the sample's values are small); fails every request with a value above 100.
PICKY = ("def preprocess(inputs):\n"
         "    if float(inputs['x'].max()) > 100:\n"
         "        raise ValueError('input out of range')\n"
         "    return inputs\n")
GOOD = json.dumps({"inputs": {"x": [[0.1, 0.2, 0.3, 0.4]]}}).encode()
BAD = json.dumps({"inputs": {"x": [[500.0, 0.2, 0.3, 0.4]]}}).encode()


@pytest.fixture
def hub(broker, tmp_path):
    h = RealHub(broker.url, tmp_path)
    yield h
    h.close()


def running(hub: RealHub, data, **kw):
    return agent_running(hub.enroll(data), data, blob_retry=0.3, **kw)


async def requests(agent: Agent, body: bytes, n: int) -> None:
    active = agent.active["classifier"]  # the version on probation, even if a rollback replaces it meanwhile
    for _ in range(n):
        with contextlib.suppress(Exception):  # a failing request is what the bake counts
            await agent.infer_json(active, body)


def deploy(hub: RealHub, device: str, module: dict, **options) -> None:
    hub.api.post("/api/v1/deployments", {"name": "classifier", "target": device,
                                         "module": f"classifier:{module['version']}", **options})


def test_a_version_failing_too_often_during_its_bake_is_rolled_back_with_the_reason(hub, tmp_path):
    v1 = build(hub, "classifier")
    v2 = build(hub, "classifier", entry=PICKY, seed=2)

    async def main() -> None:
        async with running(hub, tmp_path / "dev", isolation="process") as agent:
            device = agent.device_id
            deploy(hub, device, v1)
            await until(lambda: (m := hub_view(hub, device)) and m["state"] == "running", 60, "v1 running")
            # on_failure=halt: the hub leaves the device alone, so what happens is the device's own doing
            deploy(hub, device, v2, device_bake_s=120, device_max_error_rate=0.2, device_min_inferences=10,
                   on_failure="halt")
            await until(lambda: (m := hub_view(hub, device)) and m["version"] == 2 and m["state"] == "baking", 60,
                        "v2 baking, reported")
            await until(lambda: agent.active["classifier"].bake is not None, 30, "v2 serving on probation")
            assert agent.active["classifier"].bundle == v2["digest"]
            await requests(agent, BAD, 9)
            assert agent.installer.journal.get("classifier").state == "baking"  # 9 < min_inferences: undecided
            await requests(agent, BAD, 1)
            view = await until(lambda: (m := hub_view(hub, device)) and m["state"] == "rolled_back" and m, 30,
                               "v2 rolled back at the hub")
            assert "bake failed: error rate 100.0% (10 of 10 inferences) exceeds 20%" in view["error"]
            # v1 serves again (its worker restarts), well before the 120 s bake would have ended
            await until(lambda: (a := agent.active.get("classifier")) and a.bundle == v1["digest"], 30,
                        "v1 serving again")
            assert agent.installer.current("classifier") == v1["digest"]
            assert json.loads(await agent.infer_json(agent.active["classifier"], GOOD))["probability"]

    asyncio.run(main())


def test_a_healthy_version_commits_after_its_bake_and_one_error_does_not_decide(hub, tmp_path):
    v1 = build(hub, "classifier")
    v2 = build(hub, "classifier", entry=PICKY, seed=2)

    async def main() -> None:
        async with running(hub, tmp_path / "dev") as agent:
            device = agent.device_id
            deploy(hub, device, v1)
            await until(lambda: (m := hub_view(hub, device)) and m["state"] == "running", 60, "v1 running")
            # the CLI sets the policy; it reaches the device in the signed desired state
            cli(hub.server, "deploy", "edge", "classifier", "--module", "classifier:2", "--target", device,
                "--device-bake", "4s", "--device-max-error-rate", "0.2", "--device-min-inferences", "10")
            await until(lambda: agent.active.get("classifier") and agent.active["classifier"].bake is not None, 60,
                        "v2 on probation")
            assert agent.desired.modules[0].bake == BakePolicy(seconds=4, max_error_ppm=200_000, min_inferences=10)
            await requests(agent, BAD, 1)
            await requests(agent, GOOD, 9)  # 1 error in 10: 10 %, under the 20 % threshold
            await until(lambda: (m := hub_view(hub, device)) and m["version"] == 2 and m["state"] == "running", 30,
                        "v2 committed and running")
            entry = agent.installer.journal.get("classifier")
            assert entry.state == "committed" and entry.bakes == 1
            assert agent.active["classifier"].bundle == v2["digest"]
    asyncio.run(main())
    revisions = hub.api.get("/api/v1/deployments/classifier/revisions")
    assert revisions[0]["device_bake"] == {"seconds": 4, "max_error_ppm": 200_000, "min_inferences": 10}
    assert revisions[1]["device_bake"] is None


class PowerCut(Exception):
    pass


@pytest.fixture
def stored(broker, tmp_path):
    """v1 and v2 built and already in a device's chunk store: (v1, v2, data dir, root, chunks)."""
    side = HubSide(broker.url, tmp_path / "side")
    try:
        v1, v2 = side.build("classifier", 1), side.build("classifier", 2)
    finally:
        side.close()
    data = tmp_path / "dev"
    chunks = ContentStore(data / "chunks")
    for b in (v1, v2):
        for blob in b.chunks.values():
            chunks.put(blob)
    return v1, v2, data, side.trusted_root(), chunks


def fetcher(bundle):
    async def fetch():
        return bundle.envelope
    return fetch


async def cut(inst, policy) -> str:  # the agent dies during the bake
    raise PowerCut()


def test_a_bake_cut_by_restarts_is_baked_again_and_rolled_back_after_the_limit(stored):
    v1, v2, data, root, chunks = stored

    async def passes(inst, policy) -> str:
        return ""

    async def main() -> None:
        first = Installer(data, root, chunks, bake=cut)
        assert (await first.install(v1.desired(), fetcher(v1))).state == "committed"
        with pytest.raises(PowerCut):
            await first.install(replace(v2.desired(), bake=BakePolicy(seconds=60)), fetcher(v2))
        for starts in range(2, MAX_BAKE_STARTS + 1):  # each restart bakes again from the start, and counts it
            again = Installer(data, root, chunks, bake=cut)
            await again.recover()
            assert again.baking() == ["classifier"] and again.current("classifier") == v2.digest
            with pytest.raises(PowerCut):
                await again.resume_bake("classifier")
            assert again.journal.get("classifier").bakes == starts
        last = Installer(data, root, chunks, bake=passes)
        await last.recover()
        entry = await last.resume_bake("classifier")
        assert entry.state == "rolled_back" and f"interrupted {MAX_BAKE_STARTS} times" in entry.error
        assert last.current("classifier") == v1.digest

    asyncio.run(main())


def test_one_interrupted_bake_is_baked_again_and_commits(stored):
    v1, v2, data, root, chunks = stored
    seen: list[BakePolicy] = []

    async def passes(inst, policy) -> str:
        seen.append(policy)
        return ""

    async def main() -> None:
        first = Installer(data, root, chunks, bake=cut)
        await first.install(v1.desired(), fetcher(v1))
        with pytest.raises(PowerCut):
            await first.install(replace(v2.desired(), bake=BakePolicy(seconds=30, min_inferences=5)), fetcher(v2))
        again = Installer(data, root, chunks, bake=passes)
        await again.recover()
        entry = await again.resume_bake("classifier")
        assert entry.state == "committed" and entry.bakes == 2 and again.current("classifier") == v2.digest
        assert seen == [BakePolicy(seconds=30, min_inferences=5)]  # the policy came back from the journal

    asyncio.run(main())
