"""Process isolation: modules in supervised worker processes, the local inference API, crash loops, hung checks."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from edgefleet.broker import free_port
from protocol import Channel, decode, device_topic
from tests.hubside import HubSide, new_device, running_agent, until

ROOT = Path(__file__).resolve().parents[1]

HANGING_SCRIPT = "import time\n\ndef run(inputs):\n    time.sleep(3600)\n"


@pytest.fixture
def hub(broker, tmp_path):
    h = HubSide(broker.url, tmp_path / "hub")
    yield h
    h.close()


def workers() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if "agent/worker.py" in " ".join(p.cmdline())]


def test_local_api_serves_a_worker_that_is_restarted_after_kill_9(hub, tmp_data):
    device, port = new_device(), free_port()
    v1 = hub.build("classifier", 1)

    async def main() -> None:
        async with running_agent(hub, device, tmp_data, isolation="process", api_port=port) as agent, \
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as api:
            hub.publish_desired(device, 1, [v1.desired()])
            await until(lambda: hub.module_state(device, "classifier") == "running", 30, "v1 running")
            worker = agent.active["classifier"].runner
            assert worker.pid is not None and worker.pid != os.getpid()  # served from another process

            r = await api.post("/v1/modules/classifier/predict", json={"inputs": {"x": [[0.1, 0.2, 0.3, 0.4]]}})
            assert r.status_code == 200 and r.json()["version"] == 1
            assert len(r.json()["outputs"]["probability"]) == 1
            r = await api.post("/v1/modules/classifier/predict", json={"inputs": {"x": [[1, 2]]}})
            assert r.status_code == 422 and "expected x: float32" in r.json()["detail"]
            r = await api.post("/v1/modules/nope/predict", json={"inputs": {}})
            assert r.status_code == 404
            assert (await api.get("/healthz")).status_code == 200
            metrics = (await api.get("/metrics")).text
            for line in ('edgefleet_agent_inferences_total{module="classifier"} 1',  # the 422 never reached the model
                         'edgefleet_agent_inference_errors_total{module="classifier"} 0',
                         "edgefleet_agent_outbox_rows ", "edgefleet_agent_rss_bytes ",
                         'edgefleet_agent_worker{metric="rss_mb",module="classifier"}'):
                assert line in metrics, line

            os.kill(worker.pid, signal.SIGKILL)
            await until(lambda: worker.restarts == 1 and worker.state == "serving", 30, "worker restarted")
            r = await api.post("/v1/modules/classifier/predict", json={"inputs": {"x": [[0.1, 0.2, 0.3, 0.4]]}})
            assert r.status_code == 200

            def stats():
                return next((b.agent for b in reversed(hub.telemetry(device))
                             if b.agent.get("worker.classifier.restarts") == 1.0 and "worker.classifier.rss_mb" in b.agent),
                            None)
            agent_stats = await until(stats, 10, "worker stats in telemetry")
            assert agent_stats["worker.classifier.rss_mb"] > 0 and agent_stats["healthy"] == 1.0
        assert not workers()  # a stopped agent leaves no worker behind

    asyncio.run(main())


def test_crash_loop_rolls_back_to_the_previous_version_with_the_reason(hub, tmp_data):
    device = new_device()
    v1, v2 = hub.build("classifier", 1), hub.build("classifier", 2)

    async def main() -> None:
        async with running_agent(hub, device, tmp_data, isolation="process") as agent:
            hub.publish_desired(device, 1, [v1.desired()])
            await until(lambda: hub.module_state(device, "classifier") == "running", 30, "v1 running")
            hub.publish_desired(device, 2, [v2.desired()])
            await until(lambda: (a := agent.active.get("classifier")) and a.version == 2
                        and hub.module_state(device, "classifier") == "running", 30, "v2 running")
            worker = agent.active["classifier"].runner
            for i in range(3):  # each kill waits for the restart, so these are three distinct crashes
                await until(lambda: worker.pid is not None, 30, f"worker up before kill {i + 1}")
                os.kill(worker.pid, signal.SIGKILL)
                await until(lambda n=i: len(worker.crashes) == n + 1, 10, f"crash {i + 1} seen")
            await until(lambda: hub.module_state(device, "classifier") == "rolled_back"
                        and agent.active["classifier"].version == 1, 30, "rolled back to v1")
            mod = hub.reported(device).modules[0]
            assert mod.bundle == v2.digest and "crash loop" in mod.error
            assert agent.installer.current("classifier") == v1.digest
            r = await agent.infer(agent.active["classifier"], {"x": __import__("numpy").zeros((1, 4), "float32")})
            assert r["probability"].shape == (1, 1)

    asyncio.run(main())


def test_hung_health_check_is_killed_and_the_update_rolled_back(hub, tmp_data):
    device = new_device()
    v1, v2 = hub.build("classifier", 1), hub.build("classifier", 2, script=HANGING_SCRIPT)

    async def main() -> None:
        async with running_agent(hub, device, tmp_data, isolation="process", health_timeout=3) as agent:
            hub.publish_desired(device, 1, [v1.desired()])
            await until(lambda: hub.module_state(device, "classifier") == "running", 30, "v1 running")
            hub.publish_desired(device, 2, [v2.desired()])
            await until(lambda: hub.module_state(device, "classifier") == "rolled_back", 30, "v2 rolled back")
            assert "timed out" in hub.reported(device).modules[0].error
            assert agent.active["classifier"].version == 1
            alive = workers()
            assert [p.pid for p in alive] == [agent.active["classifier"].runner.pid]  # the hung one was killed

    asyncio.run(main())


def maps_numpy(pid: int) -> bool:
    return "/numpy/" in Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/<pid>/maps (Linux)")
def test_the_daemon_serves_json_requests_without_loading_numpy(hub, tmp_path):
    """A real ``python -m agent``: predictions over the local API and MQTT, every one sampled, and NumPy
    mapped only in the module's worker process (issue #4: the daemon's idle memory)."""
    device = new_device()
    v1 = hub.build("classifier", 1)
    hub.identity(device, tmp_path / "device")
    proc = subprocess.Popen([sys.executable, "-m", "agent", "--data", str(tmp_path / "device"),
                             "--telemetry-interval", "0.3", "--log-level", "WARNING"], cwd=ROOT)
    try:
        hub.publish_desired(device, 1, [v1.desired(collect_rate_ppm=1_000_000)])
        asyncio.run(until(lambda: hub.module_state(device, "classifier") == "running", 60, "module running"))
        # the daemon's default local API: the Unix socket DATA/run/api.sock
        api = httpx.Client(transport=httpx.HTTPTransport(uds=str(tmp_path / "device" / "run" / "api.sock")),
                           base_url="http://device", timeout=10)
        url = "/v1/modules/classifier/predict"
        r = api.post(url, json={"inputs": {"x": [[0.1, 0.2, 0.3, 0.4]]}})
        assert r.status_code == 200 and r.json()["module"] == "classifier" and len(r.json()["outputs"]["probability"]) == 1
        r = api.post(url, content=b"{not json")
        assert r.status_code == 400 and r.json()["detail"].startswith("body is not JSON")
        r = api.post(url, json={"inputs": {"y": [[1.0]]}})
        assert r.status_code == 422 and "missing input(s) ['x']" in r.json()["detail"]
        hub.publish_raw(device_topic(device, Channel.CMD), b'{"v":1,"id":"c1","name":"infer","args":'
                        b'{"module":"classifier","inputs":{"x":[[1,2,3,4]]}}}')
        reply = asyncio.run(until(lambda: next((m for m in hub.messages(device, Channel.CMD_RES)), None), 20, "reply"))
        assert b'"ok":true' in reply and b'"probability"' in reply

        def sampled() -> list:
            return [r for p in hub.messages(device, Channel.DATA) for r in decode(Channel.DATA, p).records]  # type: ignore[attr-defined]
        records = asyncio.run(until(lambda: len(sampled()) >= 2 and sampled(), 20, "sampled data"))
        assert {str(r.input) for r in records} == {"{'x': [[0.1, 0.2, 0.3, 0.4]]}", "{'x': [[1, 2, 3, 4]]}"}
        # the worker (inside bubblewrap where it runs: a grandchild) has it: the check can see NumPy where it is
        assert sum(maps_numpy(p.pid) for p in psutil.Process(proc.pid).children(recursive=True)) == 1
        assert not maps_numpy(proc.pid)
    finally:
        proc.terminate()
        proc.wait(15)


def test_local_api_answers_pipelined_requests_in_order_and_refuses_bad_http(hub, tmp_data):
    """Raw HTTP/1.1 over one socket: pipelined requests answered in order; garbage and chunked bodies refused."""
    bundle = hub.build("classifier", 1)
    device, port = new_device(), free_port()
    body = b'{"inputs": {"x": [[0.1, 0.2, 0.3, 0.4]]}}'
    predict = b"POST /v1/modules/classifier/predict HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    bad_shape = b'{"inputs": {"x": [[1, 2]]}}'

    async def exchange(data: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(data)
        out = await asyncio.wait_for(reader.read(), 10)  # until the server closes
        writer.close()
        return out

    async def run() -> None:
        async with running_agent(hub, device, tmp_data, isolation="process", api_port=port) as agent:
            hub.publish_desired(device, 1, [bundle.desired()])
            await until(lambda: hub.module_state(device, "classifier") == "running", 60, "module running")
            out = await exchange(predict + b"GET /healthz HTTP/1.1\r\n\r\n"
                                 + b"POST /v1/modules/classifier/predict HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s"
                                 % (len(bad_shape), bad_shape) + predict.replace(b"HTTP/1.1\r\n",
                                                                                 b"HTTP/1.1\r\nConnection: close\r\n"))
            statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", out)
            assert statuses == [b"200", b"200", b"422", b"200"]
            assert out.count(b'"outputs"') == 2 and b"expected x: float32" in out

            out = await exchange(b"POST /v1/modules/classifier/predict HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
            assert out.startswith(b"HTTP/1.1 411 ") and b"Content-Length" in out
            out = await exchange(b"HELLO\r\n\r\n")
            assert out.startswith(b"HTTP/1.1 400 ") and b"not an HTTP/1.x request line" in out
            assert agent.rejected["local_api"] == 2
            assert agent.active["classifier"].stats.total == 2  # the 422 never reached the model

    asyncio.run(run())
