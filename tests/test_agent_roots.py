"""Root rotation reaches devices: the real hub rotates its director key, a running agent applies the new root
(persisted in identity.json), accepts a desired state signed by the new key, and refuses a forged root."""

from __future__ import annotations

import asyncio
import json
import time

import numpy
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.core import Agent
from protocol.encoding import canonical_json
from protocol.signing import make_root
from protocol.topics import root_topic
from tests.hubside import HubSide, RealHub, agent_running, new_device, running_agent, until


def test_rotated_director_key_is_learnt_and_a_state_signed_by_it_accepted(broker, tmp_path):
    hub = RealHub(broker.url, tmp_path)
    try:
        data = tmp_path / "agent"
        ident = hub.enroll(data)
        assert ident.trusted_root().version == 1

        async def main() -> None:
            agent = Agent(ident, data, telemetry_interval=0.5, blob_retry=0.5)
            task = asyncio.create_task(agent.run())
            try:
                # The hub's HTTP calls run in a thread: the agent under test shares this loop.
                first = await asyncio.to_thread(hub.deploy, ident.device_id)
                await until(lambda: (a := agent.active.get("classifier")) and a.version == first["version"], 60,
                            "first version running")
                revision = agent.revision

                await asyncio.to_thread(hub.api.post, "/api/v1/keys/rotate", {"role": "director"})
                await until(lambda: agent.root.version == 2, 20, "agent trusts root v2")
                pinned = json.loads((data / "identity.json").read_text())["root"]
                assert pinned["signed"]["version"] == 2  # persisted, so a restart keeps the new keys

                second = await asyncio.to_thread(hub.deploy, ident.device_id)  # signed with the new director key only
                await until(lambda: (a := agent.active.get("classifier")) and a.version == second["version"], 60,
                            "desired state signed by the new key applied")
                assert agent.revision > revision and not agent.desired_error

                # A "root v3" signed only by a stranger's key: refused and counted, trust unchanged.
                stranger = Ed25519PrivateKey.generate()
                forged = make_root({r: [stranger] for r in ("root", "release", "director")}, [stranger], version=3)
                hub.server.hub.bridge.publish(root_topic(3), canonical_json(forged), qos=1, retain=False)
                await until(lambda: agent.rejected["root"] >= 1, 20, "forged root refused")
                assert agent.root.version == 2
            finally:
                await agent.stop()
                await asyncio.wait_for(task, 15)

        asyncio.run(main())
    finally:
        hub.close()


def test_a_state_that_arrives_before_its_root_is_applied_when_the_root_comes(broker, tmp_path):
    """The retained state signed by a rotated director key may reach a device before the new root (issue 12):
    refused and held, then applied on the root update, without a restart or a new message."""
    hub = HubSide(broker.url, tmp_path / "hub")
    try:
        device = new_device()
        v1 = hub.build("classifier", 1)

        async def main() -> None:
            async with running_agent(hub, device, tmp_path / "agent") as agent:
                new_director = Ed25519PrivateKey.generate()
                root_v2 = make_root({"root": [hub.root_key], "release": [hub.release_key], "director": [new_director]},
                                    [hub.root_key], version=2)
                hub.publish_desired(device, 1, [v1.desired()], key=new_director)
                await until(lambda: agent.rejected["desired"] == 1, 20, "the state refused under root 1")
                assert agent.revision == 0 and "signature" in agent.desired_error
                hub.publish_raw(root_topic(2), canonical_json(root_v2))  # not retained: the session broker is shared
                await until(lambda: "classifier" in agent.active, 30, "the held state applied after the root")
                assert agent.root.version == 2 and agent.revision == 1 and not agent.desired_error
                assert agent.rejected["desired"] == 1  # the re-check is not a second refusal

        asyncio.run(main())
    finally:
        hub.close()


def test_an_expired_pinned_root_keeps_the_module_serving_and_root_n_plus_1_unblocks_the_next_state(broker, tmp_path):
    """§7a/§7b: a device whose pinned root expired (here: its clock moved past it while it was off) keeps
    serving what it has, refuses new states saying why in its report, and applies the held state as soon
    as root N+1 arrives, without a restart."""
    hub = HubSide(broker.url, tmp_path / "hub")
    try:
        keys = {"root": [hub.root_key], "release": [hub.release_key], "director": [hub.director_key]}
        start = int(time.time())
        hub.root = make_root(keys, [hub.root_key], version=1, expires=start + 86_400)
        device, data = new_device(), tmp_path / "agent"
        v1 = hub.build("classifier", 1)
        v2 = hub.build("classifier", 2, release_expires=start + 3 * 86_400)  # signed for the device's later clock
        offset = [0.0]  # the device clock, ahead of the real one by this much

        async def main() -> None:
            async with running_agent(hub, device, data, clock=lambda: time.time() + offset[0]) as agent:
                hub.publish_desired(device, 1, [v1.desired()])
                await until(lambda: hub.module_state(device, "classifier") == "running", 60, "v1 running")
            offset[0] = 2 * 86_400  # two days later: root v1 expired
            later = start + int(offset[0])
            async with agent_running(hub.identity(device, data), data,
                                     clock=lambda: time.time() + offset[0]) as agent:
                await until(lambda: "classifier" in agent.active, 30, "v1 serving again after the restart")
                r = await agent.infer(agent.active["classifier"], {"x": numpy.zeros((1, 4), "float32")})
                assert r["probability"].shape == (1, 1)  # local inference goes on under an expired root
                hub.publish_desired(device, 2, [v2.desired()], expires=later + 3600)
                await until(lambda: agent.rejected["desired"] == 1, 20, "the new state refused")
                await until(lambda: (rep := hub.reported(device)) is not None and "root expired" in rep.error, 20,
                            "the report says why")
                assert agent.revision == 1 and agent.active["classifier"].version == 1

                hub.publish_raw(root_topic(2), canonical_json(make_root(keys, [hub.root_key], version=2,
                                                                        expires=later + 86_400)))
                await until(lambda: (a := agent.active.get("classifier")) and a.version == 2, 60,
                            "the held state applied after root v2")
                assert agent.root.version == 2 and agent.revision == 2 and not agent.desired_error
                await until(lambda: hub.reported(device).revision == 2 and not hub.reported(device).error, 20,
                            "the report is clean again")

        asyncio.run(main())
    finally:
        hub.close()
