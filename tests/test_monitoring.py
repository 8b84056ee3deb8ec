"""Monitoring over real parts: a hub, a simulated fleet over a real broker, drift alerts to a real webhook."""

from __future__ import annotations

import json
import queue
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from edgefleet.client import HubClient
from hub.config import HubConfig
from hub.ingest import telemetry
from hub.monitoring.drift import chi2_sf, compare, flatten_rows, ks_2samp, psi
from hub.server import HubServer
from modules.examples import synthetic_inputs, write_logreg_onnx, write_sample
from protocol.messages import LatencyMs, TelemetryBatch, TelemetryPoint
from simulator.fleet import Fleet
from tests.clirun import as_json, cli
from tests.pg import hub_db


class Webhook:
    """A real HTTP receiver; ``fail_first`` answers 500 that many times before accepting."""

    def __init__(self, fail_first: int = 0) -> None:
        self.received: queue.Queue[dict] = queue.Queue()
        self.attempts = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.attempts += 1
                if outer.attempts <= fail_first:
                    self.send_response(500)
                    self.end_headers()
                    return
                outer.received.put(body)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub(broker, tmp_path):
    server = HubServer(HubConfig(data_dir=tmp_path / "hub", mqtt_url=broker.url, alert_eval_s=1.0,
                                 **hub_db(tmp_path / "hub")),
                       host="127.0.0.1", port=0).start()
    yield server
    server.stop()


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)  # polling the hub's HTTP API from outside: no event to await
    raise AssertionError(f"timed out waiting for {what}")


# --- statistics, against values computed with SciPy -----------------------------------------------


def test_ks_and_chi_square_match_reference_values():
    rng = np.random.default_rng(0)
    d, p = ks_2samp(rng.normal(size=500), rng.normal(0.3, 1, size=400))
    assert d == pytest.approx(0.1575) and p == pytest.approx(2.84e-5, rel=0.1)  # scipy: 2.840e-05 (exact method)
    assert chi2_sf(3.0, 2) == pytest.approx(0.22313016014842982, rel=1e-9)
    assert chi2_sf(10.0, 4) == pytest.approx(0.04042768199451279, rel=1e-9)
    assert chi2_sf(30.0, 10) == pytest.approx(0.000856641210775301, rel=1e-9)


def test_psi_sees_a_shift_in_one_feature_only():
    rng = np.random.default_rng(1)
    ref = flatten_rows([{"x": synthetic_inputs(rng, 2000).tolist()}])
    cur = flatten_rows([{"x": synthetic_inputs(rng, 800, shift=1.5).tolist()}])
    drift = {f.feature: f for f in compare(ref, cur)}
    assert set(drift) == {"x[0]", "x[1]", "x[2]", "x[3]"}
    assert drift["x[0]"].psi > 0.5 and drift["x[0]"].p_value < 1e-6
    assert all(drift[f"x[{i}]"].psi < 0.1 for i in (1, 2, 3))
    assert psi(np.array([10.0, 10.0]), np.array([10.0, 10.0])) == pytest.approx(0.0)


def test_a_map_per_row_output_drifts_per_key():
    rng = np.random.default_rng(2)
    rows = lambda n, p: [{"0": float(v), "1": float(1 - v)} for v in rng.beta(p, 2, n)]  # noqa: E731  ZipMap rows
    ref = flatten_rows([{"label": [0] * 500, "probability": rows(500, 2)}])
    cur = flatten_rows([{"label": [0] * 300, "probability": rows(300, 8)}])
    assert sorted(ref) == ["label", "probability[0]", "probability[1]"] and len(ref["probability[1]"]) == 500
    drift = {f.feature: f for f in compare(ref, cur)}
    assert drift["probability[0]"].kind == "numeric" and drift["probability[0]"].p_value < 1e-6


def test_categorical_features_use_chi_square():
    (f,) = compare({"c": ["a"] * 50 + ["b"] * 50}, {"c": ["a"] * 80 + ["b"] * 20})
    assert f.kind == "categorical" and f.statistic == pytest.approx(36.0) and f.p_value < 1e-8


# --- the acceptance scenario -------------------------------------------------------------------------


@pytest.mark.hubstore
def test_drift_in_one_feature_raises_one_alert_to_the_webhook(hub, tmp_path):
    webhook = Webhook()
    fleet = None
    try:
        with HubClient(hub.url, hub.admin_token) as c:
            rng = np.random.default_rng(7)
            baseline = tmp_path / "baseline.json"
            baseline.write_text(json.dumps({"inputs": {"x": synthetic_inputs(rng, 3000).round(4).tolist()}}))
            model_path = write_logreg_onnx(tmp_path / "logreg.onnx")
            c.request("POST", "/api/v1/models", data={"name": "drifty"},
                      files=[("files", ("logreg.onnx", model_path.read_bytes())),
                             ("baseline_file", ("baseline.json", baseline.read_bytes()))])
            sample = json.loads(write_sample(tmp_path / "sample.json").read_text())
            module = c.post("/api/v1/modules", {"name": "drifty", "models": ["drifty:1"], "sample": sample,
                                                "collect_rate_ppm": 1_000_000})
            c.post("/api/v1/deployments", {"name": "drift-demo", "module": f"drifty:{module['version']}",
                                           "target": "*"})
            c.post("/api/v1/alerts/rules", {"name": "psi", "kind": "drift", "deployment": "drift-demo",
                                            "threshold": 0.2, "window_s": 6, "webhook": webhook.url})
            fleet = Fleet(hub_url=hub.url, api_token=hub.admin_token, n=4, data_root=tmp_path / "devices",
                          mqtt_url=hub.hub.config.mqtt_url, rate=25.0, telemetry_interval=1.0, prefix="drift")
            fleet.start()

            def collected(n):
                return lambda: c.get("/api/v1/drift/drift-demo", window=6)["rows"] >= n

            wait_for(collected(300), 90, "collected data from the fleet")
            report = c.get("/api/v1/drift/drift-demo", window=6)
            assert report["drifted"] == [], report
            assert c.post("/api/v1/alerts/evaluate") == []
            assert webhook.received.empty()

            # halfway: feature 0 of every device's inputs shifts
            for agent in fleet.agents:
                agent.workload = replace(agent.workload, shift=2.0)
            body = webhook.received.get(timeout=90)
            assert body["event"] == "alert.fired"
            event = body["data"]
            assert event["rule"] == "psi" and event["state"] == "firing"
            assert event["key"] == "x[0]", event
            assert event["value"] > 0.2
            report = c.get("/api/v1/drift/drift-demo", window=6)
            assert report["drifted"] == ["x[0]"], report
            firing = c.get("/api/v1/alerts/firing")
            assert [f["key"] for f in firing] == ["x[0]"]
            events = c.get("/api/v1/alerts/events", rule="psi")
            assert {e["key"] for e in events} == {"x[0]"}
            assert any(e["delivered"] for e in events)
            series = c.get("/api/v1/drift/drift-demo/series", window=3, points=4)
            assert set(series["psi"]) == {"x[0]", "x[1]", "x[2]", "x[3]"} and len(series["t"]) == 4
    finally:
        if fleet is not None:
            fleet.stop()
        webhook.close()


@pytest.mark.hubstore
def test_webhook_retries_with_backoff_until_delivered(hub):
    webhook = Webhook(fail_first=2)
    try:
        hub.hub.webhooks.backoff_s = 0.05
        db = hub.hub.db
        with db.transaction() as tx:
            tx.execute("INSERT INTO devices (id, labels, facts, online, last_seen, revision, created_at) "
                       "VALUES ('gone-1', '{}', '{}', 0, ?, 0, ?)", (time.time() - 600, time.time() - 900))
        with HubClient(hub.url, hub.admin_token) as c:
            c.post("/api/v1/alerts/rules", {"name": "offline", "kind": "offline", "for_s": 300,
                                            "webhook": webhook.url})
            raised = c.post("/api/v1/alerts/evaluate")
            assert [(e["key"], e["state"]) for e in raised] == [("gone-1", "firing")]
            body = webhook.received.get(timeout=30)
            assert body["event"] == "alert.fired"
            assert body["data"]["key"] == "gone-1" and body["data"]["state"] == "firing"
            event = wait_for(lambda: [e for e in c.get("/api/v1/alerts/events") if e["delivered"]], 10, "delivery")[0]
            assert event["attempts"] == 3  # two refusals, then delivered
            # the device comes back: the alert resolves, once
            with db.transaction() as tx:
                tx.execute("UPDATE devices SET online = 1, last_seen = ? WHERE id = 'gone-1'", (time.time(),))
            assert [e["state"] for e in c.post("/api/v1/alerts/evaluate")] == ["resolved"]
            assert c.post("/api/v1/alerts/evaluate") == []
    finally:
        webhook.close()


@pytest.mark.hubstore
def test_error_rate_rule_and_time_series_and_retention(hub):
    db = hub.hub.db
    now = time.time()
    with db.transaction() as tx:
        tx.execute("INSERT INTO deployments (name, module_name, module_version, digest, target, priority, created_at) "
                   "VALUES ('d', 'm', 1, ?, '*', 0, ?)", ("0" * 64, now))
        # "dev" runs m:1 for deployment d (a deployment's numbers are its devices' only)
        tx.execute("INSERT INTO devices (id, labels, facts, created_at, desired) VALUES ('dev', '{}', '{}', ?, ?)",
                   (now, json.dumps([{"name": "m", "version": 1, "deployment": "d"}], separators=(",", ":"))))
        # 20 one-second intervals: 100 inferences, 10 errors each
        telemetry.store(tx, [telemetry.pack(TelemetryBatch(device="dev", seq=i, ts=now - 20 + i, points=[
            TelemetryPoint(ts=now - 20 + i, module="m", version=1, inferences=100, errors=10,
                           latency_ms=LatencyMs(p50=1.0, p95=2.0, p99=3.0))])) for i in range(20)])
    with HubClient(hub.url, hub.admin_token) as c:
        c.post("/api/v1/alerts/rules", {"name": "errors", "kind": "error_rate", "deployment": "d",
                                        "threshold": 0.05, "window_s": 60})
        (event,) = c.post("/api/v1/alerts/evaluate")
        assert event["key"] == "error_rate" and event["value"] == pytest.approx(0.1)
        rows = c.get("/api/v1/metrics/series", deployment="d", step=3600, since=now - 3600, until=now + 1)
        assert sum(r["inferences"] for r in rows) == 2000 and sum(r["errors"] for r in rows) == 200
        assert rows[-1]["p95"] == pytest.approx(2.0)
    # the CLI shows the same series
    shown = as_json(cli(hub, "metrics", "series", "--deployment", "d", "--step", "1h", "--since", str(now - 3600),
                        "--until", str(now + 1), "--json"))
    assert shown == rows
    # retention folds old raw rows into rollups; totals survive
    folded = hub.hub.monitor.series.downsample(retention_s=0, now=now + 120)
    assert folded == 20
    assert db.scalar("SELECT COUNT(*) FROM telemetry_batches") == 0
    with HubClient(hub.url, hub.admin_token) as c:
        rows = c.get("/api/v1/metrics/series", device="dev", step=3600, since=now - 3600, until=now + 1)
        assert sum(r["inferences"] for r in rows) == 2000


# --- export ------------------------------------------------------------------------------------------


def _peak_rss(proc, stop: threading.Event, out: list[int]) -> None:
    import psutil

    p = psutil.Process(proc.pid)
    peak = 0
    while not stop.is_set():
        try:
            peak = max(peak, p.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        stop.wait(0.02)
    out.append(peak)


def _export(hub, out, fmt, extra=()):
    import os
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "edgefleet", "--hub", hub.url, "--token", hub.admin_token,
                             "data", "export", "--format", fmt, "--out", str(out), "--json", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    stop, peak = threading.Event(), []
    watcher = threading.Thread(target=_peak_rss, args=(proc, stop, peak))
    watcher.start()
    stdout, stderr = proc.communicate(timeout=600)
    stop.set()
    watcher.join()
    assert proc.returncode == 0, stderr[-3000:]
    return json.loads(stdout), peak[0]


def test_export_one_million_rows_to_parquet_in_constant_memory(hub, tmp_path):
    import psutil
    import pyarrow.parquet as pq

    n = 1_000_000
    db = hub.hub.db
    payload_in, payload_out = json.dumps({"x": [[0.1, -1.2, 0.3, 2.5]]}), json.dumps({"probability": [[0.42]]})
    t0 = int(time.time()) - 3600  # recent: older rows would be pruned by the hub's data retention
    with db.transaction() as tx:
        tx.insert_many("data_records", ("device", "seq", "idx", "ts", "module", "version", "input", "output"),
                       ((f"dev-{i % 100}", i // 100, 0, t0 + i * 0.001, "m", 1, payload_in, payload_out)
                        for i in range(n)))
    hub_rss_before = psutil.Process().memory_info().rss
    small, small_peak = _export(hub, tmp_path / "small.parquet", "parquet", ["--until", str(t0 + 1)])
    assert small["rows"] == 1000
    big, big_peak = _export(hub, tmp_path / "big.parquet", "parquet")
    assert big["rows"] == n
    table = pq.read_table(tmp_path / "big.parquet", columns=["device", "version", "input"])
    assert table.num_rows == n
    assert json.loads(table.column("input")[123].as_py()) == {"x": [[0.1, -1.2, 0.3, 2.5]]}
    # constant memory: the exporter's peak for 1M rows is within 200 MB of its peak for 1k rows, and the
    # hub (this process) grew by less than 200 MB while streaming them
    assert big_peak - small_peak < 200 * 1024 * 1024, (big_peak, small_peak)
    assert psutil.Process().memory_info().rss - hub_rss_before < 200 * 1024 * 1024
    csv_out, _ = _export(hub, tmp_path / "some.csv", "csv", ["--until", str(t0 + 2)])
    assert csv_out["rows"] == 2000
    lines = (tmp_path / "some.csv").read_text().splitlines()
    assert lines[0] == "device,seq,idx,ts,module,version,input,output" and len(lines) == 2001
    jsonl_out, _ = _export(hub, tmp_path / "some.jsonl", "jsonl", ["--until", str(t0 + 1)])
    records = [json.loads(line) for line in (tmp_path / "some.jsonl").read_text().splitlines()]
    assert jsonl_out["rows"] == len(records) == 1000
    assert records[0]["input"] == {"x": [[0.1, -1.2, 0.3, 2.5]]} and records[0]["version"] == 1


def test_latency_histogram_exposition_is_cumulative_with_le_boundaries_inclusive():
    from hub.monitoring.prom import Exposition, LatencyHistogram

    h = LatencyHistogram(buckets=(1.0, 10.0))
    for v in (0.5, 1.0, 3.0, 50.0):
        h.observe(v)
    out = Exposition()
    out.histogram("lat_ms", "test", [({"endpoint": "e"}, h.as_dict())])
    lines = out.render().splitlines()
    assert lines[2:] == ['lat_ms_bucket{endpoint="e",le="1"} 2', 'lat_ms_bucket{endpoint="e",le="10"} 3',
                         'lat_ms_bucket{endpoint="e",le="+Inf"} 4', 'lat_ms_sum{endpoint="e"} 54.5',
                         'lat_ms_count{endpoint="e"} 4']
