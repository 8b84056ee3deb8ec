"""A deployment's numbers are its own devices': series, error-rate alerts, drift and export; baselines; last_seen."""

from __future__ import annotations

import json
import time

import httpx
import numpy as np
import pytest

from hub.ingest import telemetry
from hub.ingest.writer import DATA_COLUMNS
from hub.store import dumps
from hub.testing import MqttProbe, wait_until
from modules.examples import write_logreg_onnx
from protocol.messages import LatencyMs, TelemetryBatch, TelemetryPoint
from protocol.topics import Channel, device_topic
from tests.rollout_support import build_versions

ENDPOINT = "endpoint:web"  # how a web endpoint's telemetry and samples are stored (hub/endpoints/telemetry.py)


def register(admin: httpx.Client, tmp_path, name: str, baseline: list | None) -> dict:
    """Model ``name`` version N+1 (with a baseline if given) and module ``name`` built from it."""
    seed = time.monotonic_ns() % 10_000  # each version its own weights (identical content would be the same module)
    path = write_logreg_onnx(tmp_path / f"{name}-{seed}.onnx", seed=seed)
    files = [("files", ("model.onnx", path.read_bytes()))]
    if baseline is not None:
        files.append(("baseline_file", ("baseline.json", json.dumps({"inputs": {"x": baseline}}).encode())))
    model = admin.post("/api/v1/models", data={"name": f"{name}-model"}, files=files)
    model.raise_for_status()
    module = admin.post("/api/v1/modules", json={"name": name, "models": [f"{name}-model:{model.json()['version']}"]})
    module.raise_for_status()
    return module.json()


def enrol(server, admin, ids: list[str], labels: dict[str, str]) -> None:
    tokens = admin.post("/api/v1/enrollment-tokens", json={"count": len(ids), "labels": labels}).json()["tokens"]
    for t, d in zip(tokens, ids, strict=True):
        httpx.post(server.url + "/api/v1/enroll", json={"token": t, "device_id": d}).raise_for_status()


def test_series_alerts_drift_and_export_of_a_deployment_count_its_own_devices_only(server, admin, tmp_path):
    db, rng = server.hub.db, np.random.default_rng(3)
    register(admin, tmp_path, "m", rng.normal(size=(400, 4)).round(4).tolist())  # m:1 has a baseline
    register(admin, tmp_path, "m", None)  # m:2 was registered without one
    enrol(server, admin, ["edge-a", "edge-b"], {"ring": "edge"})
    enrol(server, admin, ["other-c"], {"ring": "other"})
    for name, ring in (("edge", "edge"), ("other", "other")):  # two deployments of the same module version
        r = admin.post("/api/v1/deployments", json={"name": name, "module": "m:2", "target": f"ring={ring}"})
        assert r.status_code == 200, r.text
    now = time.time()

    def batch(device: str, inferences: int, errors: int) -> telemetry.Packed:
        return telemetry.pack(TelemetryBatch(device=device, seq=1, ts=now - 30, points=[TelemetryPoint(
            ts=now - 30, module="m", version=2, inferences=inferences, errors=errors,
            latency_ms=LatencyMs(p50=1.0, p95=2.0, p99=3.0))]))

    with db.transaction() as tx:
        telemetry.store(tx, [batch("edge-a", 100, 1), batch("edge-b", 100, 1), batch("other-c", 1000, 900),
                             batch(ENDPOINT, 1000, 900)])
        rows = [(dev, 1, i, now - 30, "m", 2, dumps({"x": [x]}), dumps({"y": [0]}))
                for dev, shift in (("edge-a", 0.0), (ENDPOINT, 5.0))
                for i, x in enumerate((rng.normal(size=(300, 4)) + shift).round(4).tolist())]
        tx.insert_many("data_records", DATA_COLUMNS, rows)

    series = admin.get("/api/v1/metrics/series", params={"deployment": "edge", "step": 3600, "since": now - 3600,
                                                           "until": now + 1}).json()
    assert sum(r["inferences"] for r in series) == 200 and sum(r["errors"] for r in series) == 2
    assert max(r["devices"] for r in series) == 2  # not 4: the other deployment and the endpoint are not in it

    admin.post("/api/v1/alerts/rules", json={"name": "edge-errors", "kind": "error_rate", "deployment": "edge",
                                             "threshold": 0.5, "window_s": 600}).raise_for_status()
    assert admin.post("/api/v1/alerts/evaluate").json() == []  # 1% on its devices; the 90% is someone else's

    report = admin.get("/api/v1/drift/edge", params={"window": 600, "until": now + 1}).json()
    assert report["rows"] == 300 and report["devices"] == 2  # the endpoint's shifted samples are not mixed in
    assert report["drifted"] == [], report["features"]
    assert report["baseline"] == {"module": "m:1", "inherited": True} and "compared against m:1's" in report["note"]

    exported = admin.get("/api/v1/data/export", params={"deployment": "edge"})
    assert exported.headers["X-Total-Count"] == "300" and len(exported.text.splitlines()) == 300
    assert {json.loads(line)["device"] for line in exported.text.splitlines()} == {"edge-a"}


def test_a_deployment_without_any_baseline_says_so_in_its_drift_report_and_alert_rule(server, admin, tmp_path):
    register(admin, tmp_path, "nb", None)
    admin.post("/api/v1/deployments", json={"name": "nb", "module": "nb:1"}).raise_for_status()
    r = admin.get("/api/v1/drift/nb")
    assert r.status_code == 404 and r.json()["detail"].startswith("no baseline: module nb:1")
    admin.post("/api/v1/alerts/rules", json={"name": "nb-drift", "kind": "drift", "deployment": "nb"}
               ).raise_for_status()
    [rule] = [x for x in admin.get("/api/v1/alerts/rules").json() if x["name"] == "nb-drift"]
    assert rule["status"].startswith("no baseline: module nb:1") and "drift is not checked" in rule["status"]


@pytest.mark.parametrize("channel", [Channel.TELEMETRY, Channel.DATA])
def test_last_seen_follows_telemetry_and_data(server, admin, broker, tmp_path, channel):
    from protocol.messages import DataBatch, DataRecord

    build_versions(admin, tmp_path, n=1)
    enrol(server, admin, ["seen-1"], {})
    assert admin.get("/api/v1/devices/seen-1").json()["last_seen"] is None
    before = time.time()
    if channel is Channel.TELEMETRY:
        msg = TelemetryBatch(device="seen-1", seq=1, ts=before, points=[
            TelemetryPoint(ts=before, module="scorer", version=1, inferences=5, errors=0)])
    else:
        msg = DataBatch(device="seen-1", seq=1, ts=before, records=[
            DataRecord(ts=before, module="scorer", version=1, input={"x": [[1.0]]}, output={"y": [0]})])
    probe = MqttProbe(broker.url)
    try:
        probe.publish(device_topic("seen-1", channel), msg.encode())
        seen = wait_until(lambda: admin.get("/api/v1/devices/seen-1").json()["last_seen"], 10, 0.05,
                          "last_seen set by the device's telemetry")
        assert seen >= before
    finally:
        probe.close()
