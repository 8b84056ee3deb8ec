"""Remote diagnostics as signed commands (issue 14): a real hub signs, a real agent over a real broker checks the
signature, answers on its own topic, and the hub keeps the result the CLI shows."""

from __future__ import annotations

import json
import logging
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hub.testing import MqttProbe, wait_until
from protocol.encoding import canonical_json
from protocol.signing import sign
from protocol.topics import Channel, device_topic
from simulator.fleet import Fleet
from tests.clirun import as_json, cli
from tests.rollout_support import all_running, build_versions


@pytest.fixture
def hub_options() -> dict:
    return {"rollout_tick_s": 0.2}


def test_logs_support_bundle_and_restart_reach_the_device_signed_and_come_back(server, admin, broker, tmp_path,
                                                                             caplog):
    caplog.set_level(logging.INFO, logger="edgefleet")  # as the daemon runs (edgefleet agent run logs at INFO)
    build_versions(admin, tmp_path, n=1)
    fleet = Fleet(server.url, server.admin_token, 1, tmp_path / "sim", rate=1, telemetry_interval=0.5, prefix="dg")
    [device] = fleet.device_ids()
    fleet.start()
    try:
        admin.post("/api/v1/deployments", json={"name": "dg", "module": "scorer:1"}).raise_for_status()
        all_running(admin, [device], "scorer", 1)
        agent = fleet.agents[0]

        logs = cli(server, "device", "logs", device, "--module", "scorer").stdout
        assert "module scorer" in logs and ": committed" in logs  # the agent's own lines about installing it
        bundle = json.loads(cli(server, "device", "support-bundle", device).stdout)
        assert bundle["device"] == device and bundle["journal"]["modules"]["scorer"]["state"] == "committed"
        assert bundle["reported"]["modules"][0]["state"] == "running"
        before = agent.active["scorer"]
        restarted = as_json(cli(server, "device", "restart-module", device, "scorer", "--json"))
        assert restarted["state"] == "done" and restarted["result"] == {"module": "scorer", "restarted": True,
                                                                        "running": True}
        assert agent.active["scorer"] is not before  # loaded and activated afresh
        missing = cli(server, "device", "restart-module", device, "nope", ok=False)
        assert missing.returncode == 1 and "module 'nope' is not running here" in missing.stderr
        listed = as_json(cli(server, "device", "commands", device, "--json"))
        assert [c["name"] for c in listed] == ["restart_module", "restart_module", "support_bundle", "logs"]

        # the device refuses what the director did not sign, and answers a signed command once
        rejected = agent.rejected["cmd"]
        probe = MqttProbe(broker.url)
        try:
            doc = {"type": "command", "v": 1, "id": "forged-1", "device": device, "name": "logs", "args": {},
                   "expires": int(time.time()) + 60}
            probe.publish(device_topic(device, Channel.CMD), canonical_json(sign(doc, [Ed25519PrivateKey.generate()])))
            wait_until(lambda: agent.rejected["cmd"] == rejected + 1, 20, 0.05, "the forged command refused")
            sent = server.hub.commands.send(device, "logs", {}, "test")
            row = server.hub.db.one("SELECT * FROM device_commands WHERE id = ?", (sent["id"],))
            assert row is not None
            envelope = sign({"type": "command", "v": 1, "id": sent["id"], "device": device, "name": "logs",
                             "args": {}, "expires": row["expires"]}, [server.hub.keys.key("director")])
            wait_until(lambda: server.hub.commands.get(sent["id"])["state"] == "done", 20, 0.05, "the answer")
            probe.publish(device_topic(device, Channel.CMD), canonical_json(envelope))  # the same command again
            wait_until(lambda: agent.rejected["cmd"] == rejected + 2, 20, 0.05, "the replay refused")
            other = dict(doc, id="for-another", device="dg-9999")
            probe.publish(device_topic(device, Channel.CMD),
                          canonical_json(sign(other, [server.hub.keys.key("director")])))
            wait_until(lambda: agent.rejected["cmd"] == rejected + 3, 20, 0.05, "another device's command refused")
        finally:
            probe.close()
    finally:
        fleet.stop()


def test_a_command_to_an_offline_device_waits_at_the_hub(server, admin):
    from tests.cli_setup import enrol

    enrol(server, admin, "asleep", {})
    out = cli(server, "device", "logs", "asleep", "--wait", "0.5", ok=False)
    assert out.returncode == 5 and "no answer from asleep" in out.stderr and "edgefleet device commands asleep" in (
        " ".join(out.stderr.split()))
    [waiting] = as_json(cli(server, "device", "commands", "asleep", "--json"))
    assert waiting["state"] == "sent" and waiting["name"] == "logs"
    assert admin.post("/api/v1/devices/asleep/commands", json={"name": "format_disk"}).status_code == 422
    for _ in range(2):
        admin.post("/api/v1/devices/asleep/commands", json={"name": "logs"}).raise_for_status()
    newest = admin.get("/api/v1/devices/asleep/commands", params={"limit": 2}).json()
    assert len(newest) == 2 and waiting["id"] not in [c["id"] for c in newest]  # the newest N, the oldest left out
    assert admin.get("/api/v1/devices/asleep/commands", params={"limit": 0}).status_code == 422
