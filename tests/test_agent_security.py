"""Refusals: desired states with an unknown key, expired, for another device, or an older revision."""

from __future__ import annotations

import asyncio
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from msgspec.structs import replace

from protocol.encoding import canonical_json
from protocol.topics import Channel, device_topic
from tests.hubside import HubSide, new_device, running_agent, until


@pytest.fixture
def hub(broker, tmp_path):
    h = HubSide(broker.url, tmp_path / "hub")
    yield h
    h.close()


def test_refused_desired_states_report_the_reason_and_activate_nothing(hub, tmp_data):
    device = new_device()
    v1 = hub.build("classifier", 1)
    v2 = hub.build("classifier", 2)
    topic = device_topic(device, Channel.DESIRED)

    async def refused(agent, count: int, needle: str) -> None:
        await until(lambda: agent.rejected["desired"] == count, 10, f"refusal #{count}")
        await until(lambda: hub.reported(device) and needle in hub.reported(device).error, 10, f"reported {needle!r}")

    async def main() -> None:
        async with running_agent(hub, device, tmp_data) as agent:
            hub.publish_desired(device, 1, [v1.desired()], key=Ed25519PrivateKey.generate())
            await refused(agent, 1, "does not trust")
            hub.publish_desired(device, 1, [v1.desired()], expires=int(time.time()) - 5)
            await refused(agent, 2, "expired")
            other = hub.desired_envelope("someone-else", 1, [v1.desired()])
            hub.publish_raw(topic, canonical_json(other), retain=True)
            await refused(agent, 3, "is for device 'someone-else'")
            assert not (tmp_data / "modules" / "classifier").exists()
            assert not hub.requests  # nothing was even downloaded

            hub.publish_desired(device, 5, [v1.desired()])
            await until(lambda: hub.module_state(device, "classifier") == "running", 20, "v1 running")
            assert hub.reported(device).error == ""
            hub.publish_desired(device, 4, [v2.desired()])  # older revision: a replay
            await refused(agent, 4, "not newer than applied 5")
            assert hub.reported(device).revision == 5
            assert (tmp_data / "modules" / "classifier" / "current").readlink().name == v1.digest
            assert agent.active["classifier"].bundle == v1.digest
            assert not [r for r in hub.requests if r.bundle == v2.digest]

    asyncio.run(main())


def test_manifest_that_contradicts_the_desired_state_fails_the_install(hub, tmp_data):
    device = new_device()
    v1 = hub.build("classifier", 1)
    wrong = replace(v1.desired(), size=v1.manifest.size + 1)

    async def main() -> None:
        async with running_agent(hub, device, tmp_data) as agent:
            hub.publish_desired(device, 1, [wrong])
            await until(lambda: hub.module_state(device, "classifier") == "failed", 20, "install failed")
            mod = hub.reported(device).modules[0]
            assert "desired state says" in mod.error
            assert agent.rejected["manifest"] == 1 and "classifier" not in agent.active

    asyncio.run(main())
