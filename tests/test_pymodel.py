"""Any Python model: a real scikit-learn pickle with an init()/run() entry script, registered on the real hub
(which records it without unpickling or running anything), built into one signed bundle, and run on a
real agent (real mosquitto), as a web endpoint of the hub, and in batch: the answers are scikit-learn's own.
"""

from __future__ import annotations

import asyncio
import json
import pickle

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest

from edgefleet.broker import free_port
from tests.batch_support import FEATURES, SKLEARN_ENTRY, feature_rows, score_cli, train_sklearn, write_table
from tests.clirun import as_json, cli
from tests.hubside import RealHub, agent_running, until


@pytest.fixture
def hub(broker, tmp_path):
    h = RealHub(broker.url, tmp_path)
    yield h
    h.close()


def said(proc) -> str:
    """stderr with the console's line wrapping undone."""
    return " ".join(proc.stderr.split())


class Trap:
    """Unpickling this creates a file: proof of who loaded the pickle."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_the_hub_records_a_python_model_without_unpickling_or_running_it(hub, tmp_path):
    unpickled, imported = tmp_path / "unpickled", tmp_path / "imported"
    (tmp_path / "model.pkl").write_bytes(pickle.dumps(Trap(str(unpickled))))
    entry = tmp_path / "score.py"
    entry.write_text(f"import pickle, os\nopen({str(imported)!r}, 'w')\n\ndef init():\n    pass\n\n"
                     "def run(inputs):\n    return inputs\n")
    reg = as_json(cli(hub.server, "model", "register", "trap", str(tmp_path / "model.pkl"), "--entry", str(entry),
                      "--json"))
    assert reg["framework"] == "python" and [f["path"] for f in reg["files"]] == ["score.py", "model.pkl"]
    assert reg["inputs"] == [] and reg["outputs"] == []
    built = as_json(cli(hub.server, "module", "build", "trap", "--model", "trap:1", "--json"))
    assert built["version"] == 1
    assert not unpickled.exists() and not imported.exists()  # parsed, never run, on registration and build

    # a pickle alone is a model too; the python runtime then needs an entry script at build time
    alone = as_json(cli(hub.server, "model", "register", "bare", str(tmp_path / "model.pkl"), "--json"))
    assert alone["framework"] == "python"
    refused = cli(hub.server, "module", "build", "bare", "--model", "bare:1", ok=False)
    assert refused.returncode == 1 and "needs an entry script" in said(refused) and "--entry" in said(refused)

    cases = {"no_run.py": ("def init():\n    pass\n", "defines no run()"),
             "no_init.py": ("def run(inputs):\n    return inputs\n", "defines no init()"),
             "broken.py": ("def init(:\n", "syntax error at line 1")}
    for name, (source, why) in cases.items():
        (tmp_path / name).write_text(source)
        r = cli(hub.server, "model", "register", "bad", str(tmp_path / "model.pkl"), "--entry", str(tmp_path / name),
                ok=False)
        assert r.returncode == 1 and why in said(r), (name, r.stderr)
        r = cli(hub.server, "module", "build", "bad", "--model", "bare:1", "--entry", str(tmp_path / name),
                "--runtime", "python", ok=False)
        assert r.returncode == 1 and why in said(r), (name, r.stderr)
    assert hub.api.get("/api/v1/models", name="bad") == []
    assert not unpickled.exists() and not imported.exists()


def test_a_sklearn_pickle_answers_as_sklearn_on_a_device_a_web_endpoint_and_in_batch(hub, tmp_path):
    clf = train_sklearn(tmp_path / "clf")
    entry = tmp_path / "score.py"
    entry.write_text(SKLEARN_ENTRY)
    sample = tmp_path / "sample.json"
    sample.write_text(json.dumps({"inputs": {"x": feature_rows(2, 5).tolist()}}))
    # the model directory alone, then the entry script at build time (the issue's --runtime python --entry case)
    reg = as_json(cli(hub.server, "model", "register", "churn", str(tmp_path / "clf"), "--json"))
    assert sorted(f["path"] for f in reg["files"]) == ["clf/meta.json", "clf/model.joblib"]
    built = as_json(cli(hub.server, "module", "build", "churn", "--model", "churn:1", "--entry", str(entry),
                        "--runtime", "python", "--sample", str(sample), "--json"))
    manifest = hub.api.get(f"/api/v1/bundles/{built['digest']}/release")["signed"]["manifest"]
    assert (manifest["runtime"], manifest["entry"]) == ("python", "score.py")
    assert sorted(f["path"] for f in manifest["files"]) == ["clf/meta.json", "clf/model.joblib", "sample.json",
                                                            "score.py"]

    x = feature_rows(300, 11)
    want_label, want_proba = clf.predict(x), clf.predict_proba(x)

    def check(outputs: dict) -> None:
        assert np.array_equal(np.asarray(outputs["label"]), want_label)
        assert np.allclose(np.asarray(outputs["proba"]), want_proba, rtol=0, atol=1e-12)

    # 1. on a device: a real agent downloads, verifies and runs it in its module worker
    ident = hub.enroll(tmp_path / "device")
    port = free_port()

    async def on_device() -> dict:
        async with agent_running(ident, tmp_path / "device", api_port=port, blob_retry=0.3, isolation="process"):
            hub.api.post("/api/v1/deployments", {"name": "churn-dev", "module": f"churn:{built['version']}",
                                                 "target": ident.device_id})

            def state() -> str | None:
                mods = hub.api.get(f"/api/v1/devices/{ident.device_id}")["modules"]
                return mods[0]["state"] if mods else None
            await until(lambda: state() == "running", 90, "the python module running on the device")
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
                r = await c.post("/v1/modules/churn/predict", json={"inputs": {"x": x.tolist()}})
            assert r.status_code == 200, r.text
            return r.json()["outputs"]

    check(asyncio.run(on_device()))

    # 2. as a web endpoint served by the hub's endpoint workers
    ep = hub.api.post("/api/v1/endpoints", {"name": "churn-web", "module": f"churn:{built['version']}"})
    r = httpx.post(ep["url"], json={"inputs": {"x": x.tolist()}}, headers={"api-key": ep["keys"]["primary"]},
                   timeout=60)
    assert r.status_code == 200, r.text
    check(r.json()["outputs"])
    hub.api.request("DELETE", "/api/v1/endpoints/churn-web")

    # 3. in batch: the same bundle pulled from the hub and verified, every row scored once
    table = write_table(tmp_path / "rows.parquet", x, row_group_size=100)
    out = tmp_path / "scored.parquet"
    proc = score_cli("churn:1", "--input", str(table), "--output", str(out), "--columns", "x=" + ",".join(FEATURES),
                     "--keep", "id", "--workers", "2", "--part-rows", "100", "--json", hub=hub.server)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert (summary["rows"], summary["parts"], summary["digest"]) == (300, 3, built["digest"])
    scored = pq.read_table(out)
    assert scored["id"].to_pylist() == list(range(300))
    check({"label": scored["label"].to_numpy(),
           "proba": np.column_stack([scored[f"proba_{j}"].to_numpy() for j in range(want_proba.shape[1])])})
