"""Acceptance (issue 18): shadow evaluation on 20 simulated devices over a real broker and hub.

A candidate that inverts every prediction runs fine (it passes every health gate) and answers
wrongly: deployed with a shadow and ``max_disagreement=0.1`` it is judged on the live inputs beside
the live version, never serves a request on any device, is removed everywhere, and the reason is
shown by the CLI and the API. A candidate retrained on the same data passes the same shadow and
reaches every device.
"""

from __future__ import annotations

import json

import pytest

from hub.testing import wait_until
from modules.examples import write_logreg_onnx
from simulator.fleet import Fleet
from tests.rollout_support import DesiredRecorder, all_running, cli, wait_rollout

N = 20
NAME = "shadow-fleet"


@pytest.fixture
def hub_options() -> dict:
    return {"rollout_tick_s": 0.2, "blob_gather_s": 0.2}


def _module(admin, tmp_path, k: int, seed: int, invert: bool = False) -> None:
    d = tmp_path / f"m{k}"
    d.mkdir()
    path = write_logreg_onnx(d / "model.onnx", seed=seed, invert=invert)
    admin.post("/api/v1/models", data={"name": "scorer-model"},
               files=[("files", ("model.onnx", path.read_bytes()))]).raise_for_status()
    admin.post("/api/v1/modules", json={"name": "scorer", "models": [f"scorer-model:{k}"]}).raise_for_status()


def _no_shadow_reported(admin, ids: list[str]) -> bool:
    devices = {d["id"]: d for d in admin.get("/api/v1/devices").json()}
    return all(not m.get("shadow") for i in ids for m in devices[i]["modules"])


def test_inverted_candidate_never_serves_and_a_retrained_one_promotes(server, admin, broker, tmp_path):
    _module(admin, tmp_path, 1, seed=1)  # the good classifier, live
    _module(admin, tmp_path, 2, seed=1, invert=True)  # runs fine, every prediction flipped
    _module(admin, tmp_path, 3, seed=2)  # retrained on the same kind of data: the same behaviour
    fleet = Fleet(server.url, server.admin_token, N, tmp_path / "sim", rate=10, telemetry_interval=0.5, prefix="sh")
    ids = fleet.device_ids()
    recorder = DesiredRecorder(broker.url, ids)
    fleet.start()
    try:
        admin.post("/api/v1/deployments", json={"name": NAME, "module": "scorer:1", "target": "sim=true"}
                   ).raise_for_status()
        wait_rollout(admin, NAME, "succeeded")
        all_running(admin, ids, "scorer", 1)

        out = cli(server.url, server.admin_token, "deployment", "update", NAME, "--module", "scorer:2",
                  "--shadow", "2s", "--shadow-sample", "0.5", "--gate", "max_disagreement=0.1", "--json")
        assert out["plan"]["shadow_s"] == 2 and out["rollout"]
        seen = wait_rollout(admin, NAME, "shadowing", timeout=60)
        assert seen["shadow_sample_ppm"] == 500_000  # half the live inputs mirrored: the candidate's CPU bounded
        assert set(seen["counts"]) <= {"shadow_pending", "shadow_downloading", "shadow_installing", "shadow_running"}
        st = wait_rollout(admin, NAME, "rolled_back", timeout=60)
        assert st["reason"].startswith("shadow gate failed: max_disagreement"), st["reason"]
        figures = st["last_gate"]["shadow"]
        assert figures["devices_reporting"] == N and figures["compared"] > 0
        assert figures["disagreement"] > 0.9  # every prediction flipped (a score of exactly 0.5 would agree)
        assert figures["errors"] == 0  # it ran fine: no health gate would have caught it

        text = cli(server.url, server.admin_token, "rollout", "status", NAME)
        assert "shadow gate failed: max_disagreement" in text and "disagreement" in text
        assert admin.get(f"/api/v1/deployments/{NAME}").json()["rollout"]["reason"] == st["reason"]

        # the candidate is removed everywhere; the live version never stopped
        wait_until(lambda: _no_shadow_reported(admin, ids), 30, 0.2, "every shadow removed")
        all_running(admin, ids, "scorer", 1)
        served = admin.get("/api/v1/metrics/series", params={"module": "scorer", "version": 2, "step": 3600}).json()
        assert sum(p.get("inferences") or 0 for p in served) == 0

        # a retrained candidate with the same flags passes the shadow and reaches every device
        # (the API this time: the CLI's body is the same, as the first update showed)
        r = admin.patch(f"/api/v1/deployments/{NAME}", json={"module": "scorer:3", "shadow_s": 2,
                                                             "gates": {"max_disagreement": 0.1}})
        assert r.status_code == 200, r.text
        done = wait_rollout(admin, NAME, "succeeded", timeout=120)
        assert done["counts"] == {"running": N}
        all_running(admin, ids, "scorer", 3)
        passed = [e for e in admin.get("/api/v1/audit", params={"subject": NAME}).json()
                  if e["action"] == "rollout.shadow_passed" and e["detail"]["rollout"] == done["id"]]
        assert passed and passed[0]["detail"]["disagreement"] <= 0.1
        wait_until(lambda: _no_shadow_reported(admin, ids), 30, 0.2, "shadows gone after the promotion")
    finally:
        fleet.stop()
        recorder.close()
    # no device was ever told to serve the inverted candidate: it only ever came as a shadow
    for dev, states in recorder.per_device().items():
        assert not any(("scorer", 2) in mods for _, mods in states), dev
    shadows = [m["shadow"] for msg in recorder.probe.messages  # this fleet's: the broker holds other tests' states
               if msg.payload and msg.topic.split("/")[3] in recorder.devices
               for m in json.loads(msg.payload)["signed"]["modules"] if "shadow" in m]
    assert {(s["version"], s["sample_ppm"]) for s in shadows} == {(2, 500_000), (3, 1_000_000)}
