"""The hub depends on protocol and modules only, never on the agent, simulator or CLI; and it survives broker restarts."""

from __future__ import annotations

import ast
import json
import secrets
from pathlib import Path

import httpx
import pytest

from edgefleet.broker import LocalBroker
from hub import HubConfig, HubServer
from hub.testing import MqttProbe, wait_until
from protocol.signing import load_trusted_root
from protocol.topics import Channel, device_topic
from protocol.verify import accept_desired
from tests.pg import hub_db

HUB = Path(__file__).resolve().parents[1] / "hub"
FORBIDDEN = {"agent", "simulator", "edgefleet"}


def test_hub_imports_no_agent_simulator_or_cli():
    offenders = []
    for path in HUB.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            offenders += [f"{path.relative_to(HUB)}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert offenders == []

pytestmark = pytest.mark.hubstore  # run again on PostgreSQL by scripts/test.sh


def test_hub_reconnects_and_republishes_desired_state_after_broker_restart(tmp_data, monkeypatch):
    monkeypatch.delenv("EDGEFLEET_ADMIN_TOKEN", raising=False)
    broker = LocalBroker(kind="mosquitto").start()  # its own broker: this test stops it
    try:
        with HubServer(HubConfig(tmp_data, broker.url, mqtt_client_id=f"hub-{secrets.token_hex(4)}",
                                 **hub_db(tmp_data))) as server:
            assert server.wait_mqtt(10)
            headers = {"Authorization": f"Bearer {server.admin_token}"}
            token = httpx.post(server.url + "/api/v1/enrollment-tokens", headers=headers, json={}).json()["tokens"][0]
            enrolled = httpx.post(server.url + "/api/v1/enroll", json={"token": token}).json()
            device = enrolled["device_id"]

            broker.stop()  # no persistence: the retained desired state is gone with it
            wait_until(lambda: not httpx.get(server.url + "/healthz").json()["mqtt_connected"], what="disconnect seen")
            broker = LocalBroker(kind="mosquitto", port=broker.port).start()
            probe = MqttProbe(broker.url)
            try:
                assert server.wait_mqtt(20), "the bridge did not reconnect"
                probe.subscribe(device_topic(device, Channel.DESIRED))
                got = probe.wait_for(lambda m: len(m) >= 1, timeout=10)
                # the retained copy, and perhaps the live republish too if it lands after our SUBACK: same bytes
                assert {m.payload for m in got} == {got[0].payload}
                state = accept_desired(json.loads(got[0].payload), load_trusted_root(enrolled["root"]), device, 0)
                assert state.revision == 1
            finally:
                probe.close()
    finally:
        broker.stop()
