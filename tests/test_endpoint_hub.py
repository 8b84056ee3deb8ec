"""Web endpoints over real HTTP: a real hub, real gateway and worker processes, real onnxruntime.

One hub for the module (starting processes is the slow part); each test deploys its own endpoint.
"""

from __future__ import annotations

import io
import os
import secrets
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from hub import HubConfig, HubServer
from modules.examples import write_logreg_onnx
from tests.pg import hub_db

SAMPLE = {"inputs": {"x": [[0.5, -1.0, 0.25, 2.0]]}}
BROKEN_SCRIPT = """
import numpy as np

def init():
    pass

def run(inputs):
    x = np.asarray(inputs["x"], dtype=np.float32)
    if (x == 666).any():
        raise ValueError("this input breaks the model")
    return {"y": x * 2}
"""


@pytest.fixture(scope="module")
def server(broker, tmp_path_factory):
    data = tmp_path_factory.mktemp("hub")
    s = HubServer(HubConfig(data, broker.url, admin_token=secrets.token_urlsafe(32),
                            mqtt_client_id=f"hub-{secrets.token_hex(4)}", load_check_timeout_s=30,
                            endpoint_telemetry_s=0.5, **hub_db(data))).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def admin(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.admin_token}"},
                      timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def modules(admin, tmp_path_factory) -> dict[str, str]:
    """Two versions of a logistic regression (different weights) and a python model that fails on 666."""
    d = tmp_path_factory.mktemp("models")
    refs = {}
    for seed in (1, 2):
        f = write_logreg_onnx(d / f"model{seed}.onnx", seed=seed)
        admin.post("/api/v1/models", data={"name": "lr"},
                   files=[("files", ("model.onnx", f.read_bytes()))]).raise_for_status()
    for v in (1, 2):
        m = admin.post("/api/v1/modules", json={"name": "lrmod", "models": [f"lr:{v}"], "sample": SAMPLE,
                                                 "collect_rate_ppm": 1_000_000 if v == 2 else 0}).json()
        refs[f"v{v}"] = f"lrmod:{m['version']}"
    (d / "broken.py").write_text(BROKEN_SCRIPT)
    admin.post("/api/v1/models", data={"name": "broken"},
               files=[("files", ("broken.py", (d / "broken.py").read_bytes()))]).raise_for_status()
    m = admin.post("/api/v1/modules", json={"name": "brokenmod", "models": ["broken:1"], "runtime": "python",
                                            "sample": {"inputs": {"x": [[1.0, 2.0]]}}}).json()
    refs["broken"] = f"brokenmod:{m['version']}"
    refs["dir"] = str(d)
    return refs


def deploy(admin: httpx.Client, name: str, module: str, **kw: Any) -> dict[str, Any]:
    r = admin.post("/api/v1/endpoints", json={"name": name, "module": module, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def status(admin: httpx.Client, name: str) -> dict[str, Any]:
    return admin.get(f"/api/v1/endpoints/{name}").json()["status"]


def wait_for(cond: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class Load:
    """Clients posting as fast as they can until stopped; every answer's status and version recorded.

    `sent` holds, row for row, when each request was sent and when its answer came back (monotonic).
    """

    def __init__(self, url: str, key: str, clients: int = 4) -> None:
        self.url, self.key = url, key
        self.results: list[tuple[int, str, str]] = []
        self.sent: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        with httpx.Client(headers={"api-key": self.key}, timeout=60) as c:
            while not self._stop.is_set():
                t0 = time.monotonic()
                try:
                    r = c.post(self.url, json=SAMPLE)
                    row = (r.status_code, r.headers.get("x-edgefleet-version", ""), r.headers.get("retry-after", ""))
                except httpx.HTTPError as exc:
                    row = (0, type(exc).__name__, "")
                with self._lock:
                    self.results.append(row)
                    self.sent.append((t0, time.monotonic()))

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def snapshot(self) -> list[tuple[int, str, str]]:
        with self._lock:
            return list(self.results)


def expected(model_dir: str, seed: int, x: list[list[float]]) -> np.ndarray:
    sess = ort.InferenceSession(str(Path(model_dir) / f"model{seed}.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": np.asarray(x, dtype=np.float32)})[0]


def test_score_keys_shapes_binary_and_delete_refusal(admin, modules):
    ep = deploy(admin, "score", modules["v1"])
    url, keys = ep["url"], ep["keys"]
    x = [[0.1, 0.2, 0.3, 0.4], [1.0, -1.0, 2.0, -2.0]]
    r = httpx.post(url, json={"inputs": {"x": x}}, headers={"Authorization": f"Bearer {keys['primary']}"})
    assert r.status_code == 200, r.text
    body = r.json()
    # the same answer as a device's local API: the module's name, its version as an integer
    assert (body["module"], body["version"]) == ("lrmod", int(modules["v1"].split(":")[1]))
    assert r.headers["x-edgefleet-version"] == modules["v1"] and r.headers["x-request-id"] == body["request_id"]
    np.testing.assert_allclose(body["outputs"]["probability"], expected(modules["dir"], 1, x), rtol=1e-6)

    assert httpx.post(url, json={"inputs": {"x": x}}).status_code == 401
    assert httpx.post(url, json={"inputs": {"x": x}}, headers={"api-key": "wrong"}).status_code == 401
    assert httpx.post(url, json={"inputs": {"x": x}}, headers={"api-key": keys["secondary"]}).status_code == 200

    bad = httpx.post(url, json={"inputs": {"x": [[1.0, 2.0, 3.0]]}}, headers={"api-key": keys["primary"]})
    assert bad.status_code == 422 and "expected x: float32['N', 4]" in bad.json()["detail"]
    assert httpx.post(url, json={"inputs": {"x": [["a", 1, 2, 3]]}},
                      headers={"api-key": keys["primary"]}).status_code == 422
    assert httpx.post(url, content=b"{not json", headers={"api-key": keys["primary"]}).status_code == 400

    # the binary form: a .npy body in, a .npy answer out
    arr = np.asarray(x, dtype=np.float32)
    buf = io.BytesIO()
    np.save(buf, arr)
    r = httpx.post(url, content=buf.getvalue(), headers={"api-key": keys["primary"], "content-type": "application/x-npy",
                                                         "accept": "application/x-npy"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-npy"
    np.testing.assert_allclose(np.load(io.BytesIO(r.content)), expected(modules["dir"], 1, x), rtol=1e-6)

    info = httpx.get(ep["info_url"], headers={"api-key": keys["primary"]}).json()
    assert info["status"] == "ready" and info["inputs"] == [{"name": "x", "dtype": "float32", "shape": [None, 4]}]
    assert info["sample_request"] == SAMPLE and info["batchable"] is True
    sample = httpx.post(url, json=info["sample_request"], headers={"api-key": keys["primary"]})
    assert sample.status_code == 200

    refused = admin.delete(f"/api/v1/models/lr/versions/{modules['v1'].split(':')[1]}")
    assert refused.status_code == 409 and "web endpoint 'score'" in refused.json()["detail"]
    assert admin.delete("/api/v1/endpoints/score").status_code == 200
    assert admin.get("/api/v1/endpoints/score").status_code == 404
    with pytest.raises(httpx.HTTPError):
        httpx.post(url, json=SAMPLE, headers={"api-key": keys["primary"]}, timeout=5)


def test_keys_rotate_one_at_a_time_without_downtime(admin, modules):
    ep = deploy(admin, "keys", modules["v1"])
    old = ep["keys"]
    with Load(ep["url"], old["secondary"], clients=2) as load:  # clients on the secondary while primary rotates
        new = admin.post("/api/v1/endpoints/keys/keys", json={"regenerate": "primary"}).json()
        wait_for(lambda: len(load.snapshot()) > 20, what="requests during rotation")
    assert new["secondary"] == old["secondary"] and new["primary"] != old["primary"]
    assert {s for s, _, _ in load.snapshot()} == {200}
    assert httpx.post(ep["url"], json=SAMPLE, headers={"api-key": old["primary"]}).status_code == 401
    assert httpx.post(ep["url"], json=SAMPLE, headers={"api-key": new["primary"]}).status_code == 200
    admin.delete("/api/v1/endpoints/keys")


def test_concurrent_requests_are_batched_and_answered_correctly(admin, modules):
    ep = deploy(admin, "batch", modules["v1"], max_batch=16, max_wait_ms=5)
    rng = np.random.default_rng(3)
    xs = [rng.normal(size=(1 + i % 3, 4)).round(3).tolist() for i in range(64)]
    results: dict[int, Any] = {}

    def one(i: int) -> None:
        r = httpx.post(ep["url"], json={"inputs": {"x": xs[i]}}, headers={"api-key": ep["keys"]["primary"]}, timeout=30)
        results[i] = r.json()["outputs"]["probability"]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, x in enumerate(xs):  # each request gets exactly its own rows back, whatever batch it rode in
        np.testing.assert_allclose(results[i], expected(modules["dir"], 1, x), rtol=1e-5)
    st = status(admin, "batch")["versions"][0]
    assert st["batches"] <= 64
    admin.delete("/api/v1/endpoints/batch")


def test_traffic_split_is_within_tolerance_and_changes_live_with_mirroring(admin, modules):
    deploy(admin, "split", modules["v1"])
    ep = deploy(admin, "split", modules["v2"], traffic=10)
    key = ep["keys"]["primary"]
    with httpx.Client(headers={"api-key": key}) as c:
        seen = Counter(c.post(ep["url"], json=SAMPLE).headers["x-edgefleet-version"] for _ in range(1000))
    assert abs(seen[modules["v1"]] - 900) <= 30 and abs(seen[modules["v2"]] - 100) <= 30, seen

    admin.post("/api/v1/endpoints/split/traffic", json={"weights": {modules["v1"]: 50, modules["v2"]: 50}}).raise_for_status()
    with httpx.Client(headers={"api-key": key}) as c:
        seen = Counter(c.post(ep["url"], json=SAMPLE).headers["x-edgefleet-version"] for _ in range(1000))
    assert abs(seen[modules["v1"]] - 500) <= 30, seen

    # all answers from v1; a fifth of the traffic mirrored to v2, whose answers nobody sees
    r = admin.post("/api/v1/endpoints/split/traffic", json={"weights": {modules["v1"]: 100, modules["v2"]: 0},
                                                             "mirror": {modules["v2"]: 0.2}})
    assert r.status_code == 200, r.text
    before = {v["label"]: v["batches"] for v in status(admin, "split")["versions"]}
    mirrored_before = status(admin, "split")["mirrored"]
    with httpx.Client(headers={"api-key": key}) as c:
        seen = Counter(c.post(ep["url"], json=SAMPLE).headers["x-edgefleet-version"] for _ in range(500))
    assert seen == Counter({modules["v1"]: 500})
    st = status(admin, "split")
    assert abs(st["mirrored"] - mirrored_before - 100) <= 5
    v2 = next(v for v in st["versions"] if v["label"] == modules["v2"])
    assert v2["batches"] > before[modules["v2"]]
    admin.delete("/api/v1/endpoints/split")


def test_update_under_constant_load_has_zero_failed_requests(admin, modules):
    ep = deploy(admin, "update", modules["v1"], replicas=2)
    old_pids = [w["pid"] for w in status(admin, "update")["versions"][0]["workers"]]
    with Load(ep["url"], ep["keys"]["primary"], clients=4) as load:
        wait_for(lambda: len(load.snapshot()) > 50, what="load before the update")
        updated = deploy(admin, "update", modules["v2"])
        assert updated["versions"] == [{"module": modules["v2"], "weight": 100.0, "mirror": 0.0}]
        mark = len(load.snapshot())
        wait_for(lambda: len(load.snapshot()) > mark + 50, what="load after the update")
    results = load.snapshot()
    assert Counter(s for s, _, _ in results) == Counter({200: len(results)})
    versions = [v for _, v, _ in results]
    assert versions[0] == modules["v1"] and versions[-1] == modules["v2"]
    # traffic moved once: every request sent after the first new answer came back went to the new version
    # (answers are recorded in the order they complete, so older in-flight ones may still land after it)
    switched = min(done for (_, done), v in zip(load.sent, versions) if v == modules["v2"])
    late = [v for (sent, _), v in zip(load.sent, versions) if sent > switched]
    assert late and set(late) == {modules["v2"]}
    for pid in old_pids:  # the old workers drained and stopped
        wait_for(lambda pid=pid: not _alive(pid), what=f"old worker {pid} to exit")
    admin.delete("/api/v1/endpoints/update")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_worker_killed_with_kill_9_is_restarted_and_in_flight_requests_get_503(admin, modules):
    ep = deploy(admin, "crash", modules["v1"])
    pid = status(admin, "crash")["versions"][0]["workers"][0]["pid"]
    with Load(ep["url"], ep["keys"]["primary"], clients=8) as load:
        wait_for(lambda: len(load.snapshot()) > 50, what="load before the kill")
        os.kill(pid, signal.SIGKILL)
        worker = wait_for(lambda: _ready_worker(admin, "crash", other_than=pid), what="the restarted worker")
        mark = len(load.snapshot())
        wait_for(lambda: len(load.snapshot()) > mark + 50, what="load after the restart")
    results = load.snapshot()
    assert {s for s, _, _ in results} <= {200, 503}
    assert all(retry == "1" for s, _, retry in results if s == 503)
    assert {s for s, _, _ in results[-20:]} == {200}
    assert worker["restarts"] == 1
    admin.delete("/api/v1/endpoints/crash")


def _ready_worker(admin: httpx.Client, name: str, other_than: int) -> dict[str, Any] | None:
    w = status(admin, name)["versions"][0]["workers"][0]
    return w if w["state"] == "ready" and w["pid"] != other_than else None


def test_model_exception_is_a_500_with_request_id_and_the_worker_keeps_serving(admin, modules):
    ep = deploy(admin, "broken", modules["broken"])
    key = ep["keys"]["primary"]
    pid = status(admin, "broken")["versions"][0]["workers"][0]["pid"]
    bad = httpx.post(ep["url"], json={"inputs": {"x": [[666.0, 1.0]]}}, headers={"api-key": key})
    assert bad.status_code == 500
    assert bad.json()["request_id"] == bad.headers["x-request-id"] and bad.json()["request_id"] in bad.json()["detail"]
    good = httpx.post(ep["url"], json={"inputs": {"x": [[1.0, 1.0]]}}, headers={"api-key": key})
    assert good.status_code == 200 and good.json()["outputs"]["y"] == [[2.0, 2.0]]
    assert status(admin, "broken")["versions"][0]["workers"][0]["pid"] == pid

    # the hub's /metrics carries the gateway's counters: one 500, one 200 with its latency in the histogram
    text = httpx.get(admin.base_url.join("/metrics")).text
    label = status(admin, "broken")["versions"][0]["label"]
    assert 'edgefleet_hub_endpoint_up{endpoint="broken"} 1' in text
    assert 'edgefleet_hub_endpoint_responses_total{endpoint="broken",code="500"} 1' in text
    assert 'edgefleet_hub_endpoint_responses_total{endpoint="broken",code="200"} 1' in text
    series = f'endpoint="broken",version="{label}"'
    assert f'edgefleet_hub_endpoint_latency_ms_count{{{series}}} 1' in text
    assert f'edgefleet_hub_endpoint_latency_ms_bucket{{{series},le="+Inf"}} 1' in text

    # and the time series: two inferences (the 500 is an error), as the endpoint's pseudo-device and per version
    def totals(**params: Any) -> tuple[int, int]:
        rows = admin.get("/api/v1/metrics/series", params={"step": 3600, "since": time.time() - 3600, **params}).json()
        return sum(r["inferences"] for r in rows), sum(r["errors"] for r in rows)

    wait_for(lambda: totals(endpoint="broken") == (2, 1), what="endpoint telemetry in the series")
    name, version = label.split(":")
    assert totals(module=name, version=int(version)) == (2, 1)
    assert admin.get("/api/v1/metrics/series", params={"endpoint": "broken", "device": "x"}).status_code == 422
    admin.delete("/api/v1/endpoints/broken")


@pytest.mark.hubstore
def test_sampled_requests_land_in_data_records_tagged_with_endpoint_and_version(admin, modules, server):
    ep = deploy(admin, "collect", modules["v2"])  # v2 collects every request (collect_rate_ppm = 1e6)
    for i in range(5):
        httpx.post(ep["url"], json={"inputs": {"x": [[float(i), 0, 0, 0]]}}, headers={"api-key": ep["keys"]["primary"]})
    name, version = modules["v2"].split(":")
    rows = wait_for(lambda: server.hub.db.query("SELECT * FROM data_records WHERE endpoint = 'collect'")
                    if len(server.hub.db.query("SELECT 1 FROM data_records WHERE endpoint = 'collect'")) >= 5 else None,
                    what="collected rows")
    assert {(r["source"], r["module"], r["version"], r["device"]) for r in rows} == {
        ("endpoint", name, int(version), "endpoint:collect")}
    assert sorted(r["input"] for r in rows)[0].startswith('{"x":[[0.0')
    admin.delete("/api/v1/endpoints/collect")


def test_a_module_that_fails_its_health_check_is_refused_and_the_old_version_keeps_serving(admin, modules):
    bad = admin.post("/api/v1/modules", json={"name": "lrmod-bad", "models": ["lr:1"],
                                              "sample": {"inputs": {"x": [[1.0, 2.0]]}}}).json()
    r = admin.post("/api/v1/endpoints", json={"name": "guard", "module": f"lrmod-bad:{bad['version']}"})
    assert r.status_code == 422 and "shape" in r.json()["detail"]
    assert admin.get("/api/v1/endpoints/guard").status_code == 404
    ep = deploy(admin, "guard", modules["v1"])
    r = admin.post("/api/v1/endpoints", json={"name": "guard", "module": f"lrmod-bad:{bad['version']}"})
    assert r.status_code == 422
    ok = httpx.post(ep["url"], json=SAMPLE, headers={"api-key": ep["keys"]["primary"]})
    assert ok.status_code == 200 and ok.headers["x-edgefleet-version"] == modules["v1"]
    admin.delete("/api/v1/endpoints/guard")
