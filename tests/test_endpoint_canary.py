"""Endpoint canaries that move their own weight (issue 18): a real hub, gateway and worker processes.

A candidate that fails on the traffic it gets is taken to weight 0 by its gate with the reason; a good one
climbs its steps to all of the traffic; a label sent for a web answer's request id counts for its version."""

from __future__ import annotations

import secrets
import threading
import time
from typing import Any

import httpx
import pytest

from hub import HubConfig, HubServer
from hub.endpoints.autocanary import decide
from hub.rollout.gates import Check, GateResult
from modules.examples import write_logreg_onnx
from tests.pg import hub_db

BODY = {"inputs": {"x": [[666.0, 1.0, 0.5, 2.0]]}}  # the broken candidate fails on 666; the others answer
BROKEN = """
import numpy as np

def init():
    pass

def run(inputs):
    x = np.asarray(inputs["x"], dtype=np.float32)
    if (x == 666).any():
        raise ValueError("this input breaks the model")
    return {"probability": 1.0 / (1.0 + np.exp(-x[:, :1]))}
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
def admin(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.admin_token}"},
                      timeout=120) as c:
        yield c


def _modules(admin: httpx.Client, tmp_path: Any) -> None:
    sample = {"inputs": {"x": [[0.5, -1.0, 0.25, 2.0]]}}
    for seed in (1, 2):
        f = write_logreg_onnx(tmp_path / f"m{seed}.onnx", seed=seed)
        admin.post("/api/v1/models", data={"name": "clr"}, files=[("files", ("model.onnx", f.read_bytes()))]
                   ).raise_for_status()
        admin.post("/api/v1/modules", json={"name": "clrmod", "models": [f"clr:{seed}"], "sample": sample,
                                            "collect_rate_ppm": 1_000_000 * (seed == 2)}).raise_for_status()
    (tmp_path / "broken.py").write_text(BROKEN)
    admin.post("/api/v1/models", data={"name": "cbroken"},
               files=[("files", ("broken.py", BROKEN.encode()))]).raise_for_status()
    admin.post("/api/v1/modules", json={"name": "cbrokenmod", "models": ["cbroken:1"], "runtime": "python",
                                        "sample": sample}).raise_for_status()


class Load:
    def __init__(self, url: str, key: str) -> None:
        self.url, self.key, self.stop = url, key, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(headers={"api-key": self.key}, timeout=30) as c:
            while not self.stop.is_set():
                try:
                    c.post(self.url, json=BODY)
                except httpx.HTTPError:
                    time.sleep(0.05)

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)


def _wait(cond: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := cond():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_decide_waits_for_evidence_then_steps_or_fails():
    bad = GateResult([Check("max_error_rate", 0.5, 0.05, False)])
    good = GateResult([Check("max_error_rate", 0.0, 0.05, True)])
    assert decide(10, 5, 3, 20, bad) == "wait"  # not enough answers to judge
    assert decide(1, 5, 30, 20, bad) == "fail"  # enough: fail at once, without waiting for the interval
    assert decide(1, 5, 30, 20, good) == "wait" and decide(6, 5, 30, 20, good) == "step"


def test_a_failing_canary_goes_to_zero_and_a_good_one_takes_all_traffic(server, admin, tmp_path):
    _modules(admin, tmp_path)
    ep = admin.post("/api/v1/endpoints", json={"name": "cx", "module": "clrmod:1"})
    assert ep.status_code == 200, ep.text
    key, url = ep.json()["keys"]["primary"], ep.json()["url"]
    with Load(url, key):
        r = admin.post("/api/v1/endpoints/cx/canary", json={"module": "cbrokenmod:1", "steps": [50, 100],
                                                            "interval_s": 2, "gates": {"max_error_rate": 0.05},
                                                            "min_inferences": 10})
        assert r.status_code == 200, r.text
        assert r.json()["weight"] == 50 and r.json()["state"] == "running"
        st = _wait(lambda: (c := admin.get("/api/v1/endpoints/cx/canary").json())["state"] != "running" and c, 90,
                   "the broken canary judged")
        assert st["state"] == "failed" and "max_error_rate" in st["reason"], st
        versions = {v["module"] for v in admin.get("/api/v1/endpoints/cx").json()["versions"]}
        assert versions == {"clrmod:1"}  # the candidate no longer takes traffic

        r = admin.post("/api/v1/endpoints/cx/canary", json={"module": "clrmod:2", "steps": [50], "interval_s": 1,
                                                            "gates": {"max_error_rate": 0.05}, "min_inferences": 10})
        assert r.status_code == 200, r.text
        st = _wait(lambda: (c := admin.get("/api/v1/endpoints/cx/canary").json())["state"] != "running" and c, 90,
                   "the good canary promoted")
    assert st["state"] == "succeeded", st
    assert [(v["module"], v["weight"]) for v in admin.get("/api/v1/endpoints/cx").json()["versions"]] == [
        ("clrmod:2", 100.0)]

    # ground truth for a web answer, by the request id it carried
    r = httpx.post(url, json=BODY, headers={"api-key": key})
    rid, pred = r.headers["x-request-id"], int(r.json()["outputs"]["probability"][0][0] >= 0.5)
    label = {"labels": [{"sample": f"endpoint:cx/{rid}", "label": pred}]}
    _wait(lambda: admin.post("/api/v1/labels", json=label).json()["matched"] == 1, 30, "the sample stored")
    acc = admin.get("/api/v1/accuracy", params={"module": "clrmod", "step": 86_400, "since": time.time() - 3600})
    assert [(p["version"], p["labelled"], p["correct"]) for p in acc.json()] == [(2, 1, 1)]
    admin.delete("/api/v1/endpoints/cx")
