"""An application holds updates while busy (issue 14): the agent's bound on it (pure, agent/deferral.py), the pure
core skipping installs while held, and a real agent over a real broker honouring POST /v1/defer."""

from __future__ import annotations

import asyncio
import json

import httpx

from agent.deferral import Hold, release, request
from agent.reconcile import Facts, Install, ModuleFacts, step
from edgefleet.broker import free_port
from protocol.messages import DesiredModule, DesiredState
from tests.hubside import HubSide, new_device, running_agent, until

MAX = 100.0


def test_a_hold_never_outlasts_the_maximum_however_often_it_is_renewed():
    held, why = request(Hold(), 1000.0, 30, MAX, "mid-procedure")
    assert why is None and (held.since, held.until, held.reason) == (1000.0, 1030.0, "mid-procedure")
    for now in range(1010, 1100, 10):  # renewed every 10 s for 60 s more each time
        held, why = request(held, float(now), 60, MAX)
        assert why is None and held.since == 1000.0 and held.until == min(now + 60, 1100.0)
    assert held.until == 1100.0 and held.blocked_until == 1200.0  # it ran to the maximum
    for now in (1100.0, 1150.0, 1199.9):  # then the held updates go first
        again, why = request(held, now, 10, MAX)
        assert again is held and "ran to its maximum of 100s" in why
    fresh, why = request(held, 1200.0, 10, MAX)
    assert why is None and (fresh.since, fresh.until, fresh.blocked_until) == (1200.0, 1210.0, 0.0)


def test_a_released_hold_blocks_nothing_and_bad_requests_are_refused():
    held, _ = request(Hold(), 0.0, 500, MAX)  # capped at the maximum at once
    assert held.until == MAX and held.blocked_until == 2 * MAX
    assert release(held, 50.0) == Hold()  # released early: no block
    assert request(Hold(), 0.0, 10, 0)[1].startswith("this device does not let applications hold updates")
    for bad in (0, -5, float("nan")):
        assert request(Hold(), 0.0, bad, MAX)[1] == "seconds must be a positive number"
    expired, _ = request(Hold(), 0.0, 10, MAX)
    assert release(expired, 20.0) is expired  # nothing to release


def test_the_pure_core_installs_nothing_while_held_and_the_rest_goes_ahead():
    mod = DesiredModule(name="m", version=2, bundle="b" * 64, size=1)
    desired = DesiredState(device="d", revision=3, expires=10**10, modules=[mod])
    installed = {"old": ModuleFacts(current="c" * 64, active="c" * 64)}
    held = step(10.0, desired, installed, Facts(hold_until=20.0))
    assert not any(isinstance(a, Install) for a in held) and [type(a).__name__ for a in held] == ["Remove", "Report"]
    free = step(20.0, desired, installed, Facts(hold_until=20.0))
    assert [type(a).__name__ for a in free] == ["Remove", "Install", "Report"]


def test_a_real_agent_holds_an_update_until_the_app_releases_it(broker, tmp_path, tmp_data):
    hub = HubSide(broker.url, tmp_path / "hub")
    device, port = new_device(), free_port()
    v1, v2 = hub.build("classifier", 1), hub.build("classifier", 2)

    async def main() -> None:
        async with running_agent(hub, device, tmp_data, api_port=port, max_defer_s=600) as agent, \
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as api:
            hub.publish_desired(device, 1, [v1.desired()])
            await until(lambda: hub.module_state(device, "classifier") == "running", 30, "v1 running")
            r = await api.post("/v1/defer", json={"seconds": 3600, "reason": "checkout in progress"})
            assert r.status_code == 200 and r.json()["held"] and r.json()["reason"] == "checkout in progress"
            assert r.json()["until"] == r.json()["max_until"]  # 3600 asked, the agent's 600 s maximum granted
            hub.publish_desired(device, 2, [v2.desired()])
            # the agent has the new state (it reports revision 2) and still serves v1: the install waits
            await until(lambda: (rep := hub.reported(device)) is not None and rep.revision == 2, 30, "revision 2 seen")
            assert agent.active["classifier"].bundle == v1.digest
            assert (await api.post("/v1/modules/classifier/predict", json={"inputs": {"x": [[1, 2, 3, 4]]}})
                    ).json()["version"] == 1
            bad = await api.post("/v1/defer", content=b'{"seconds": "soon"}')
            assert bad.status_code == 400 and agent.rejected["local_api"] == 1
            released = await api.delete("/v1/defer")
            assert released.status_code == 200 and released.json()["held"] is False
            await until(lambda: hub.module_state(device, "classifier") == "running"
                        and agent.active["classifier"].bundle == v2.digest, 30, "v2 running once released")
            assert json.loads((tmp_data / "journal.json").read_text())["modules"]["classifier"]["version"] == 2

    try:
        asyncio.run(main())
    finally:
        hub.close()
