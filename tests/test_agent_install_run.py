"""The agent against a real broker and onnxruntime: install, run, report, telemetry, tampered chunks."""

from __future__ import annotations

import asyncio

import pytest

from agent.workload import Workload
from protocol.messages import CommandReply, decode
from protocol.topics import Channel, device_topic
from tests.hubside import HubSide, new_device, running_agent, until


@pytest.fixture
def hub(broker, tmp_path):
    h = HubSide(broker.url, tmp_path / "hub")
    yield h
    h.close()


def test_installs_runs_reports_and_sends_telemetry(hub, tmp_data):
    device = new_device()
    bundle = hub.build("classifier", 1, pad_bytes=600_000, collect_rate_ppm=1_000_000)

    async def main() -> None:
        async with running_agent(hub, device, tmp_data, workload=Workload(rate=50, seed=1)) as agent:
            hub.publish_desired(device, 1, [bundle.desired(collect_rate_ppm=1_000_000)])
            await until(lambda: hub.module_state(device, "classifier") == "running", 20, "module running")
            rep = hub.reported(device)
            assert rep.revision == 1 and rep.error == ""
            assert (tmp_data / "modules" / "classifier" / "current").readlink().name == bundle.digest
            await until(lambda: any(p.inferences for b in hub.telemetry(device) for p in b.points), 10, "inferences")
            await until(lambda: len(hub.telemetry(device)) >= 3, 10, "three telemetry batches")
            seqs = [b.seq for b in hub.telemetry(device)]
            assert seqs == sorted(set(seqs))  # strictly increasing
            assert all(b.agent["rss_mb"] > 0 for b in hub.telemetry(device))
            point = next(p for b in hub.telemetry(device) for p in b.points if p.inferences)
            assert point.module == "classifier" and point.version == 1
            assert point.latency_ms.p99 >= point.latency_ms.p50 > 0
            await until(lambda: hub.messages(device, Channel.DATA), 10, "sampled data")
            snap = agent.snapshot()
            assert snap["modules"][0]["state"] == "running" and snap["inferences"] > 0
            # request/response: ping and infer
            hub.publish_raw(device_topic(device, Channel.CMD), b'{"v":1,"id":"c1","name":"infer","args":'
                            b'{"module":"classifier","inputs":{"x":[[0.1,0.2,0.3,0.4]]}}}')
            replies = await until(lambda: hub.messages(device, Channel.CMD_RES), 10, "command reply")
            reply = decode(Channel.CMD_RES, replies[0])
            assert isinstance(reply, CommandReply) and reply.ok, reply
            assert 0.0 <= reply.result["outputs"]["probability"][0][0] <= 1.0
        status = decode(Channel.STATUS, hub.messages(device, Channel.STATUS)[-1])
        assert status.online is False  # a clean stop says offline

    asyncio.run(main())


def test_tampered_chunk_is_refused_and_requested_again(hub, tmp_data):
    device = new_device()
    bundle = hub.build("classifier", 1, pad_bytes=300_000)
    bad = sorted(bundle.chunks)[0]
    hub.tamper[bad] = 1

    async def main() -> None:
        async with running_agent(hub, device, tmp_data) as agent:
            hub.publish_desired(device, 1, [bundle.desired()])
            await until(lambda: hub.module_state(device, "classifier") == "running", 20, "module running")
            assert agent.rejected["blob"] == 1
            assert hub.chunk_requests(bundle.digest).count(bad) >= 2

    asyncio.run(main())
