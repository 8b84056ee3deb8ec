"""Ground truth (issue 18): labels sent for sampled predictions give accuracy per version that matches an
offline computation on the same rows, through the API, /metrics and the min_accuracy gate; a device sends
labels on its data channel for predictions whose request carried an id."""

from __future__ import annotations

import json
import time

import httpx
import numpy as np
import pytest

from hub.monitoring.labels import Labels, score
from hub.testing import MqttProbe, wait_until
from protocol.messages import DataBatch, DataRecord, Label
from protocol.topics import Channel, device_topic
from simulator.fleet import Fleet
from tests.pg import hub_store
from tests.rollout_support import build_versions, cli, wait_rollout

TRUE_W = np.array([1.5, -2.0, 0.5, 1.0])  # modules/examples.py's data: the label is the side of this plane


@pytest.fixture
def hub_options() -> dict:
    return {"rollout_tick_s": 0.2}


def _export(admin: httpx.Client, version: int) -> list[dict]:
    r = admin.get("/api/v1/data/export", params={"module": "scorer", "version": version})
    return [json.loads(line) for line in r.text.splitlines() if line]


@pytest.mark.hubstore  # run again on PostgreSQL by scripts/test.sh
def test_accuracy_per_version_matches_an_offline_computation(server, admin, broker, tmp_path):
    build_versions(admin, tmp_path, n=1)
    fleet = Fleet(server.url, server.admin_token, 3, tmp_path / "sim", rate=20, telemetry_interval=0.5, prefix="lb")
    fleet.start()
    try:
        admin.post("/api/v1/deployments", json={"name": "lb", "module": "scorer:1", "target": "sim=true",
                                                "collect_rate_ppm": 1_000_000}).raise_for_status()
        wait_rollout(admin, "lb", "succeeded")
        rows = wait_until(lambda: (r := _export(admin, 1)) and len(r) >= 60 and r, 60, 0.5, "60 sampled records")
    finally:
        fleet.stop()
    # offline: the truth of each sampled row, and whether the served prediction got it
    labels, right = [], 0
    for r in rows:
        x = np.asarray(r["input"]["x"], dtype=float)
        truth = [int(v) for v in (x @ TRUE_W > 0)]
        pred = [int(p[0] >= 0.5) for p in r["output"]["probability"]]
        right += sum(int(a == b) for a, b in zip(pred, truth))
        labels.append({"sample": f"{r['device']}/{r['seq']}/{r['idx']}", "label": truth})
    n = sum(len(lb["label"]) for lb in labels)
    res = admin.post("/api/v1/labels", json={"labels": labels})
    assert res.status_code == 200, res.text
    assert res.json() == {"stored": len(labels), "matched": len(labels)}

    # a device's own channel: records whose requests carried an id, and later their labels, in data batches
    probe = MqttProbe(broker.url)
    try:
        dev = "lb-0000"
        recs = [DataRecord(ts=time.time(), module="scorer", version=2, input={"x": [[0.0] * 4]},
                           output={"probability": [[p]]}, id=f"req-{i}") for i, p in enumerate([0.9, 0.8, 0.2, 0.1])]
        probe.publish(device_topic(dev, Channel.DATA), DataBatch(device=dev, seq=10_000, ts=time.time(),
                                                                 records=recs).encode())
        later = [Label(id=f"req-{i}", label=t) for i, t in enumerate([1, 0, 0, 0])]  # 3 of 4 right
        probe.publish(device_topic(dev, Channel.DATA), DataBatch(device=dev, seq=10_001, ts=time.time(), records=[],
                                                                 labels=later).encode())
    finally:
        probe.close()

    def series() -> dict[int, dict]:
        got = admin.get("/api/v1/accuracy", params={"module": "scorer", "step": 86_400,
                                                    "since": time.time() - 3600}).json()
        return {p["version"]: p for p in got}
    per_version = wait_until(lambda: (s := series()) and 2 in s and s[2]["labelled"] == 4 and s, 10, 0.2, "labels")
    assert per_version[1]["labelled"] == n and per_version[1]["correct"] == right
    assert per_version[1]["accuracy"] == pytest.approx(right / n)
    assert per_version[2]["accuracy"] == pytest.approx(0.75)
    shown = cli(server.url, server.admin_token, "quality", "accuracy", "--module", "scorer", "--since", "1h", "--json")
    assert {(p["version"], p["labelled"], p["correct"]) for p in shown} == {(1, n, right), (2, 4, 3)}
    ab = admin.get("/api/v1/ab", params={"a": "lb", "b": "lb", "metric": "accuracy"}).json()
    assert ab["arms"][0]["trials"] == n and ab["arms"][0]["successes"] == right and not ab["decided"]
    text = httpx.get(server.url + "/metrics").text
    assert f'edgefleet_hub_model_accuracy{{module="scorer",version="1"}} {right / n:g}' in text
    assert 'edgefleet_hub_model_accuracy{module="scorer",version="2"} 0.75' in text


def test_scoring_rules_and_refused_labels(tmp_data):
    assert score({"p": [[0.2, 0.7, 0.1]]}, 1)[:2] == (1, 1)  # argmax
    assert score({"p": [[0.7], [0.3]]}, [1, 1])[:2] == (2, 1)  # one score per row, a label per row
    # a class id per row (skl2onnx's output_label first, its ZipMap probabilities after): classes, not values
    assert score({"output_label": [2, 0], "output_probability": [{"0": 0.1, "2": 0.8}, {"0": 0.9, "2": 0.1}]},
                 [2, 1])[:2] == (2, 1)
    n, right, err, reg = score({"y": [[12.0], [3.0]]}, [10.0, 4.0])  # regression: absolute error
    assert (n, reg, err) == (0, 2, 3.0)
    from hub.errors import Invalid

    labels = Labels(hub_store(tmp_data))
    with pytest.raises(Invalid, match="sample"):
        labels.add([{"sample": "no-slash", "label": 1}], "t")
    with pytest.raises(Invalid, match="no label"):
        labels.add([{"sample": "d1/r1"}], "t")
