"""The local API's awaited path (``LocalApi._predict``): in-process isolation, and a worker restarting.

Both used to answer 500: the route called a method the agent never had (issue 13). The fast path
(a serving worker answering from its socket callback) is covered in tests/test_agent_worker.py.
"""

from __future__ import annotations

import asyncio
import os
import signal

import httpx
import pytest

from edgefleet.broker import free_port
from tests.hubside import HubSide, new_device, running_agent, until

GOOD = {"inputs": {"x": [[0.1, 0.2, 0.3, 0.4]]}}


@pytest.fixture
def hub(broker, tmp_path):
    h = HubSide(broker.url, tmp_path / "hub")
    yield h
    h.close()


def test_in_process_isolation_answers_predictions_over_the_local_api(hub, tmp_data):
    device, port = new_device(), free_port()
    v1 = hub.build("classifier", 1)

    async def main() -> None:
        async with running_agent(hub, device, tmp_data, isolation="inprocess", api_port=port) as agent, \
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as api:
            hub.publish_desired(device, 1, [v1.desired()])
            await until(lambda: "classifier" in agent.active, 30, "v1 running")
            r = await api.post("/v1/modules/classifier/predict", json=GOOD)
            assert r.status_code == 200, r.text
            assert r.json()["module"] == "classifier" and r.json()["version"] == 1
            assert len(r.json()["outputs"]["probability"]) == 1
            r = await api.post("/v1/modules/classifier/predict", json={"inputs": {"x": [[1, 2]]}})
            assert r.status_code == 422 and "expected x: float32" in r.json()["detail"]
            assert agent.inferences == 1  # the 422 never reached the model
            metrics = (await api.get("/metrics")).text
            assert 'edgefleet_agent_inferences_total{module="classifier"} 1' in metrics
            assert "edgefleet_agent_connected 1" in metrics and "edgefleet_agent_outbox_rows " in metrics

    asyncio.run(main())


def test_a_request_during_a_worker_restart_waits_for_the_new_worker(hub, tmp_data):
    device, port = new_device(), free_port()
    v1 = hub.build("classifier", 1)

    async def main() -> None:
        async with running_agent(hub, device, tmp_data, isolation="process", api_port=port) as agent, \
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as api:
            hub.publish_desired(device, 1, [v1.desired()])
            await until(lambda: hub.module_state(device, "classifier") == "running", 30, "v1 running")
            worker = agent.active["classifier"].runner
            worker.backoff_base = 3.0  # a restart window wide enough to ask inside it
            os.kill(worker.pid, signal.SIGKILL)
            await until(lambda: worker.state == "backoff", 10, "worker waiting to restart")
            r = await api.post("/v1/modules/classifier/predict", json=GOOD)
            assert r.status_code == 200, r.text
            assert r.json()["version"] == 1 and worker.restarts == 1  # answered by the restarted worker

    asyncio.run(main())
