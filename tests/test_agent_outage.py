"""Store-and-forward: the broker is down for 60 s while the agent keeps inferring; afterwards the real hub
holds every telemetry batch exactly once (seq 1..N, no gap, no duplicate, every inference counted once)."""

from __future__ import annotations

import asyncio

import pytest

from agent.core import Agent
from agent.workload import Workload
from edgefleet.broker import LocalBroker
from tests.hubside import RealHub, until

OUTAGE_S = 60.0


@pytest.fixture
def own_broker(broker):  # `broker` only for its mosquitto check; this test stops and restarts its own
    b = LocalBroker(kind=broker.kind).start()
    yield b
    b.stop()


def test_broker_down_60s_every_telemetry_batch_reaches_the_hub_exactly_once(own_broker, tmp_path):
    hub = RealHub(own_broker.url, tmp_path)
    try:
        ident = hub.enroll(tmp_path / "agent")
        hub.deploy(ident.device_id)

        def rows() -> list[dict]:
            return hub.api.get("/api/v1/telemetry", device=ident.device_id, limit=10_000)

        async def main() -> tuple[int, int]:
            agent = Agent(ident, tmp_path / "agent", workload=Workload(rate=50), telemetry_interval=1.0, blob_retry=0.5)
            task = asyncio.create_task(agent.run())
            try:
                await until(lambda: "classifier" in agent.active and agent.inferences > 0, 60, "module running")
                await until(lambda: rows(), 30, "telemetry at the hub before the outage")

                own_broker.stop()
                await until(lambda: not agent.client.connected.is_set(), 30, "agent sees the broker gone")
                before = agent.inferences
                await asyncio.sleep(OUTAGE_S)  # the outage itself is what is under test
                assert agent.inferences > before, "inference stopped while the broker was down"
                assert len(agent.outbox) >= OUTAGE_S / 2, "telemetry was not kept while offline"
                own_broker.start()

                await until(lambda: agent.client.connected.is_set(), 60, "agent reconnected")
                await until(lambda: len(agent.outbox) == 0, 60, "outbox drained")
                # One synchronous cut on the loop: batches 1..last and the inferences they cover.
                agent.flush_telemetry()
                last_row = max((r[0] for r in agent.outbox.peek(10_000)), default=0)
                stats = agent.active["classifier"].stats
                last, counted = agent.outbox.last_seq("telemetry"), stats.total - stats.inferences
                await until(lambda: agent.outbox.peek(1) and agent.outbox.peek(1)[0][0] > last_row or not agent.outbox,
                            30, "the cut sent")
                return last, counted
            finally:
                await agent.stop()
                await asyncio.wait_for(task, 15)

        last, counted = asyncio.run(main())
        stored = until_sync(lambda: (r := rows()) and max(x["seq"] for x in r) >= last and r, 60, "every batch stored")
        seqs = sorted(r["seq"] for r in stored if r["seq"] <= last)
        # Batches sent before the module ran carry no points (no rows); from its first batch on, one row each.
        assert seqs == list(range(seqs[0], last + 1)), "a gap or a duplicate in the hub's telemetry"
        assert last - seqs[0] > OUTAGE_S
        assert sum(r["inferences"] for r in stored if r["seq"] <= last) == counted
    finally:
        hub.close()


def until_sync(predicate, timeout: float, what: str):
    return asyncio.run(until(predicate, timeout, what))
