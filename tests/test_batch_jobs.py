"""Batch scoring on the hub (``/api/v1/batch-jobs``, ``edgefleet batch``) and batch samples feeding drift reports:
a real hub, the job in a sandboxed subprocess, real onnxruntime, Parquet files on disk."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hub.testing import wait_until
from modules.examples import N_FEATURES, synthetic_inputs, write_logreg_onnx
from tests.batch_support import score_cli
from tests.clirun import as_json, cli

COLS = [f"f{i}" for i in range(N_FEATURES)]


def register(admin: httpx.Client, tmp_path: Path, name: str) -> Path:
    """Model + module ``name`` (version 1) with a baseline of unshifted rows; returns the ONNX file."""
    model = write_logreg_onnx(tmp_path / f"{name}.onnx", seed=3)
    baseline = synthetic_inputs(np.random.default_rng(1), 2000).round(4).tolist()
    files = [("files", ("model.onnx", model.read_bytes())),
             ("baseline_file", ("baseline.json", json.dumps({"inputs": {"x": baseline}}).encode()))]
    admin.post("/api/v1/models", data={"name": f"{name}-model"}, files=files).raise_for_status()
    admin.post("/api/v1/modules", json={"name": name, "models": [f"{name}-model:1"]}).raise_for_status()
    return model


def table(path: Path, x: np.ndarray, row_group_size: int) -> Path:
    cols = {"id": pa.array(np.arange(len(x), dtype=np.int64))} | {c: pa.array(x[:, i]) for i, c in enumerate(COLS)}
    pq.write_table(pa.table(cols), path, row_group_size=row_group_size)
    return path


def test_a_hub_batch_job_scores_in_a_subprocess_reports_progress_and_feeds_drift(server, admin, tmp_path):
    model = register(admin, tmp_path, "bj")
    x = synthetic_inputs(np.random.default_rng(7), 3000, shift=3.0)  # feature 0 drifted
    src = table(tmp_path / "rows.parquet", x, 500)
    out = tmp_path / "scored.parquet"
    job = as_json(cli(server, "batch", "submit", "bj:1", "--input", str(src), "--output", str(out),
                      "--columns", "x=" + ",".join(COLS), "--keep", "id", "--monitor", "--wait", "--json"))
    assert job["state"] == "succeeded", job
    assert (job["rows_done"], job["rows_total"], job["progress"]) == (3000, 3000, 1.0)
    assert job["output"] == str(out) and job["summary"]["parts"] == 1 and job["summary"]["rows"] == 3000
    scored = pq.read_table(out)
    assert scored["id"].to_pylist() == list(range(3000))
    bare = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.array_equal(scored["probability"].to_numpy(), bare.reshape(-1))

    listed = as_json(cli(server, "batch", "list", "--json"))
    assert [j["id"] for j in listed] == [job["id"]]
    sample = job["summary"]["monitor"]
    assert sample["name"] == f"job-{job['id']}" and 2500 <= sample["rows"] <= 3000
    report = as_json(cli(server, "batch", "drift", sample["name"], "--json"))
    assert report["module"] == "bj:1" and report["rows"] == sample["rows"]
    assert report["drifted"] == ["x[0]"], report["features"]  # the shifted feature, and only it

    # the same from the command line on another machine: `edgefleet score --monitor` sends its sample to the hub
    proc = score_cli("bj:1", "--input", str(src), "--output", str(tmp_path / "cli.parquet"), "--columns",
                     "x=" + ",".join(COLS), "--monitor", "--monitor-name", "nightly", "--monitor-rows", "1000",
                     "--workers", "1", "--json", hub=server)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["monitor"] == {"rows": 1000, "records": 1, "name": "nightly"}
    report = admin.get("/api/v1/batch-data/nightly/drift").json()
    assert report["rows"] == 1000 and report["drifted"] == ["x[0]"]
    assert admin.get("/api/v1/batch-data/nope/drift").status_code == 404


# A python module that answers its first batch and then hangs: a job that runs until it is cancelled.
HANGING = """\
import threading

import numpy as np

calls = 0


def init():
    pass


def run(inputs):
    global calls
    calls += 1
    if calls > 1:
        threading.Event().wait()
    return {"y": np.zeros(len(inputs["x"]))}
"""


@pytest.mark.hubstore  # run again on PostgreSQL by scripts/test.sh
def test_batch_jobs_refuse_bad_requests_and_cancel_a_running_job(server, admin, tmp_path):
    register(admin, tmp_path, "bc")
    x = synthetic_inputs(np.random.default_rng(2), 2000)
    src = table(tmp_path / "rows.parquet", x, 1000)
    body = {"module": "bc:1", "input": str(src), "output": str(tmp_path / "o.parquet"),
            "columns": ["x=" + ",".join(COLS)]}

    def refused(status: int, change: dict) -> str:
        r = admin.post("/api/v1/batch-jobs", json=body | change)
        assert r.status_code == status, r.text
        return r.json()["detail"]

    assert "does not exist on the hub's machine" in refused(422, {"input": str(tmp_path / "missing.parquet")})
    assert "absolute paths" in refused(422, {"output": "o.parquet"})
    assert "module bc:7 does not exist" in refused(404, {"module": "bc:7"})
    (tmp_path / "taken.parquet").write_bytes(b"x")
    assert "exists" in refused(409, {"output": str(tmp_path / "taken.parquet")})
    data_dir = str(server.hub.config.data_dir / "stolen.parquet")
    assert "outside the hub's data directory" in refused(422, {"output": data_dir})
    bad = admin.post("/api/v1/batch-jobs", json=body | {"columns": ["x=f0,nope,f2,f3"]}).json()
    failed = wait_until(lambda: (j := admin.get(f"/api/v1/batch-jobs/{bad['id']}").json())["state"] != "running"
                        and j, 60, 0.2, "the job with a wrong column ending")
    assert failed["state"] == "failed" and "column 'nope'" in failed["error"], failed

    admin.post("/api/v1/models", data={"name": "hang-model"},
               files=[("files", ("weights.bin", b"\0" * 16))]).raise_for_status()
    admin.post("/api/v1/modules", json={"name": "hang", "models": ["hang-model:1"], "runtime": "python",
                                        "entry": HANGING, "entry_name": "score.py"}).raise_for_status()
    job = admin.post("/api/v1/batch-jobs", json=body | {"module": "hang:1", "batch_rows": 100}).json()
    wait_until(lambda: admin.get(f"/api/v1/batch-jobs/{job['id']}").json()["rows_done"] == 100, 60, 0.2,
               "the first batch scored")
    pid = server.hub.db.scalar("SELECT pid FROM batch_jobs WHERE id = ?", (job["id"],))
    cancelled = as_json(cli(server, "batch", "cancel", str(job["id"]), "--json"))
    assert (cancelled["state"], cancelled["rows_done"], cancelled["rows_total"]) == ("cancelled", 100, 2000)
    assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    assert not (tmp_path / "o.parquet").exists()
    again = admin.post(f"/api/v1/batch-jobs/{job['id']}/cancel")
    assert again.status_code == 409 and "has ended (cancelled)" in again.json()["detail"]


def test_only_score_takes_the_short_path_through_the_cli():
    from edgefleet.entry import first_command

    assert first_command(["--hub", "http://h", "--token", "t", "-v", "score", "m:1"]) == "score"
    assert first_command(["--hub=http://h", "score"]) == "score"
    assert first_command(["--hub", "score", "batch", "list"]) == "batch"  # "score" there is --hub's value
    assert first_command(["--version"]) is None and first_command([]) is None
