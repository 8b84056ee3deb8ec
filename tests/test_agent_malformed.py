"""Malformed payloads on every inbound topic are counted and ignored; the agent keeps serving."""

from __future__ import annotations

import asyncio
import os

import pytest

from protocol.encoding import canonical_json
from protocol.messages import decode
from protocol.signing import sign
from protocol.topics import Channel, blob_topic, device_topic
from tests.hubside import HubSide, new_device, running_agent, until


@pytest.fixture
def hub(broker, tmp_path):
    h = HubSide(broker.url, tmp_path / "hub")
    yield h
    h.close()


def test_malformed_payloads_are_counted_and_a_later_valid_state_installs(hub, tmp_data, caplog):
    device = new_device()
    bundle = hub.build("classifier", 1)
    desired, cmd = device_topic(device, Channel.DESIRED), device_topic(device, Channel.CMD)
    garbage_mb = os.urandom(1 << 20)
    unsigned_fields = sign({"type": "desired", "v": 1, "device": device}, [hub.director_key])  # no revision/expiry

    caplog.set_level("WARNING", logger="edgefleet.agent")

    async def main() -> None:
        async with running_agent(hub, device, tmp_data) as agent:
            for payload in (b"not json", b'{"v": 2, "signed": {}}', b"[1, 2, 3]", b'{"signed": {"v": 1},'
                            b' "signatures": [{"keyid": [1], "sig": "zz"}]}', canonical_json(unsigned_fields),
                            garbage_mb, b"\xff\xfe"):
                hub.publish_raw(desired, payload)
            await until(lambda: agent.rejected["desired"] == 7, 10, "7 desired refusals")
            for payload in (b"{}", b'{"v": 2, "id": "a", "name": "ping"}', b'{"v": 1, "name": "ping"}', garbage_mb):
                hub.publish_raw(cmd, payload)
            await until(lambda: agent.rejected["cmd"] == 4, 10, "4 cmd refusals")

            # Blob topics: garbage while the agent waits for a manifest the hub holds back.
            hub.serve_manifest = False
            hub.publish_desired(device, 1, [bundle.desired()])
            await until(lambda: hub.requests, 10, "manifest request")
            hub.publish_raw(blob_topic(bundle.digest, "manifest"), b"garbage")
            hub.publish_raw(blob_topic(bundle.digest, "manifest"), canonical_json(
                sign(bundle.envelope["signed"], [hub.director_key])))  # signed by the wrong role
            hub.publish_raw(blob_topic(bundle.digest, "a" * 64), garbage_mb)
            await until(lambda: agent.rejected["manifest"] == 2 and agent.rejected["blob"] == 1, 10, "blob refusals")
            hub.serve_manifest = True
            await until(lambda: hub.module_state(device, "classifier") == "running", 20, "module running")

            hub.publish_raw(cmd, b'{"v": 1, "id": "p1", "name": "ping"}')
            replies = await until(lambda: hub.messages(device, Channel.CMD_RES), 10, "ping reply")
            assert decode(Channel.CMD_RES, replies[-1]).ok
            assert agent.snapshot()["rejected"] == {"desired": 7, "cmd": 4, "manifest": 2, "blob": 1}
            assert hub.reported(device).error == ""  # the valid state cleared the last refusal
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert any(desired in w and "not JSON" in w for w in warnings)
        assert any(cmd in w and "unsupported schema version 2" in w for w in warnings)

    asyncio.run(main())
