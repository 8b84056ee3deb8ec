"""The registry over HTTP: metadata, search and pagination, delete with usage checks and GC, child-process load check.

A real uvicorn hub, real SQLite, real onnxruntime (in the load-check child), the session's mosquitto.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest

from modules.errors import ModelError
from modules.examples import write_logreg_onnx
from modules.loadcheck import inspect_model

pytestmark = pytest.mark.hubstore  # run again on PostgreSQL by scripts/test.sh


@pytest.fixture
def hub_options() -> dict:
    return {"load_check_timeout_s": 20}


@pytest.fixture
def onnx_file(tmp_path) -> Path:
    return write_logreg_onnx(tmp_path / "model.onnx")


def register(client: httpx.Client, name: str, path: Path, **form) -> httpx.Response:
    return client.post("/api/v1/models", data={"name": name, **form},
                       files=[("files", (path.name, path.read_bytes(), "application/octet-stream"))])


def blobs(data_dir: Path) -> set[str]:
    return {p.name for p in (data_dir / "blobs").rglob("*") if p.is_file() and not p.name.startswith(".")}


def test_metadata_lineage_properties_and_baseline_are_stored_and_editable(admin, onnx_file):
    register(admin, "churn", onnx_file).raise_for_status()
    r = register(admin, "churn", onnx_file, tag=["stage=dev", "team=growth"], description="retrained",
                 properties=json.dumps({"auc": "0.91", "epochs": 12}), parent="1", dataset="s3://bucket/churn-2024-06",
                 training_run="mlflow:run/abc123", baseline=json.dumps({"x": {"mean": [0, 0, 0, 0]}}))
    assert r.status_code == 200, r.text
    v2 = r.json()
    assert v2["version"] == 2 and v2["created_by"] == "admin" and v2["created_at"] > 0
    assert v2["lineage"] == {"parent": "churn:1", "dataset": "s3://bucket/churn-2024-06", "training_run": "mlflow:run/abc123"}
    assert v2["properties"] == {"auc": "0.91", "epochs": 12}
    assert admin.get("/api/v1/models/churn/versions/2/baseline").json() == {"x": {"mean": [0, 0, 0, 0]}}
    assert admin.get("/api/v1/models/churn/versions/1/baseline").status_code == 404

    patched = admin.patch("/api/v1/models/churn/versions/2", json={
        "tags": {"stage": "prod", "owner": "ana"}, "remove_tags": ["team"], "description": "promoted",
        "properties": {"epochs": None, "approved": True}}).json()
    assert patched["tags"] == {"stage": "prod", "owner": "ana"}
    assert patched["description"] == "promoted" and patched["properties"] == {"auc": "0.91", "approved": True}
    assert admin.get("/api/v1/models/churn/versions/2").json()["tags"] == {"stage": "prod", "owner": "ana"}

    bad_parent = register(admin, "churn", onnx_file, parent="churn:9")
    assert bad_parent.status_code == 404 and "churn:9 does not exist" in bad_parent.json()["detail"]
    assert register(admin, "churn", onnx_file, properties="[1]").status_code == 422


def test_tag_search_finds_exactly_the_tagged_ones_paginated_newest_first(admin, onnx_file, tmp_path):
    script = tmp_path / "rules.py"
    script.write_text("def init():\n    pass\n\ndef run(inputs):\n    return inputs\n")
    plan = [("a", ["stage=prod", "team=x"]), ("a", ["stage=prod"]), ("b", ["stage=prod", "team=x"]),
            ("b", ["stage=dev", "team=x"]), ("c", [])]
    for name, tags in plan:
        register(admin, name, onnx_file, tag=tags).raise_for_status()
    register(admin, "rules", script, tag=["stage=prod", "team=x"]).raise_for_status()

    def search(**params) -> tuple[list[tuple[str, int]], int]:
        r = admin.get("/api/v1/models", params=params)
        r.raise_for_status()
        return [(m["name"], m["version"]) for m in r.json()], int(r.headers["x-total-count"])

    assert search(tag=["stage=prod", "team=x"]) == ([("rules", 1), ("b", 1), ("a", 1)], 3)
    assert search(tag="team=x", framework="onnx") == ([("b", 2), ("b", 1), ("a", 1)], 3)
    assert search(tag="stage=prod", name="a") == ([("a", 2), ("a", 1)], 2)
    assert search(tag="stage=staging") == ([], 0)
    assert search(framework="python") == ([("rules", 1)], 1)
    everything, total = search()
    assert total == 6 and everything[0] == ("rules", 1)
    assert search(limit=2, offset=0) == (everything[:2], 6)
    assert search(limit=2, offset=4) == (everything[4:], 6)
    assert admin.get("/api/v1/models", params={"limit": 0}).status_code == 422


def deploy(client: httpx.Client, deployment: str, module: str) -> None:
    client.post("/api/v1/deployments", json={"name": deployment, "module": module, "target": "*"}).raise_for_status()


def test_delete_refused_while_deployed_names_the_deployment_then_collects_blobs(admin, server, onnx_file, tmp_path):
    data_dir = server.config.data_dir
    register(admin, "scorer-model", onnx_file).raise_for_status()  # v1
    (tmp_path / "v2").mkdir()
    other = write_logreg_onnx(tmp_path / "v2" / "model.onnx", seed=5)
    register(admin, "scorer-model", other).raise_for_status()  # v2, different bytes
    register(admin, "scorer-model", onnx_file).raise_for_status()  # v3, same bytes as v1
    v2_blob = admin.get("/api/v1/models/scorer-model/versions/2").json()["files"][0]["sha256"]
    v1_blob = admin.get("/api/v1/models/scorer-model/versions/1").json()["files"][0]["sha256"]
    admin.post("/api/v1/modules", json={"name": "scorer", "models": ["scorer-model:2"]}).raise_for_status()
    deploy(admin, "berlin-canary", "scorer:1")

    r = admin.delete("/api/v1/models/scorer-model/versions/2")
    assert r.status_code == 409
    assert "edge deployment 'berlin-canary' (module scorer:1)" in r.json()["detail"]
    assert admin.get("/api/v1/models/scorer-model/versions/2").status_code == 200

    admin.delete("/api/v1/deployments/berlin-canary").raise_for_status()
    r = admin.delete("/api/v1/models/scorer-model/versions/2")
    assert r.status_code == 200 and r.json()["deleted"] is True
    assert r.json()["blobs_removed"] == []  # module scorer:1 still holds the file
    assert v2_blob in blobs(data_dir)
    assert admin.get("/api/v1/models/scorer-model/versions/2").status_code == 404

    r = admin.delete("/api/v1/models/scorer-model/versions/1")
    assert r.json()["blobs_removed"] == []  # v3 has the same bytes
    r = admin.delete("/api/v1/models/scorer-model/versions/3")
    assert r.json()["blobs_removed"] == [v1_blob]
    assert v1_blob not in blobs(data_dir)
    assert admin.delete("/api/v1/models/scorer-model/versions/3").status_code == 404
    # deleted versions are never handed out again
    assert register(admin, "scorer-model", onnx_file).json()["version"] == 4


def test_load_check_runs_in_a_child_process_crash_and_hang_are_refused(admin, server, tmp_path):
    """ONNX and TFLite models are loaded in a short-lived child; the child's crash or hang is a refusal.

    Python models are not loaded by the hub at all (modules.pymodel): the same scripts register without
    running, so the child is driven directly here with the python runtime.
    """
    crash = tmp_path / "crash.py"
    crash.write_text("import os\n\ndef init():\n    os._exit(7)\n\ndef run(inputs):\n    return inputs\n")
    with pytest.raises(ModelError, match=r"crashed the checking process \(exit status 7\)"):
        inspect_model(crash, "python", timeout_s=20)
    hang = tmp_path / "hang.py"
    hang.write_text("def init():\n    while True:\n        pass\n\ndef run(inputs):\n    return inputs\n")
    with pytest.raises(ModelError, match="took longer than 3s"):
        inspect_model(hang, "python", timeout_s=3)

    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07" + os.urandom(200))
    r = register(admin, "broken", broken)
    assert r.status_code == 422 and "onnxruntime could not load broken.onnx" in r.json()["detail"]

    pid_file = tmp_path / "pid"
    probe = tmp_path / "probe.py"
    probe.write_text(f"import os\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\n\ndef init():\n    pass\n\n"
                     "def run(inputs):\n    return inputs\n")
    register(admin, "probe", probe).raise_for_status()
    register(admin, "crash", crash).raise_for_status()  # recorded, never run
    assert not pid_file.exists()  # neither the hub nor a child of it ran the script
    assert admin.get("/api/v1/models", params={"name": "broken"}).json() == []
    assert blobs(server.config.data_dir) == {admin.get(f"/api/v1/models/{m}/versions/1").json()["files"][0]["sha256"]
                                             for m in ("probe", "crash")}
