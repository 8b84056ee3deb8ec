"""Batch scoring (``edgefleet score``): planning and resuming (pure), CSV and Parquet equal to the bare runtime,
a kill -9 mid-job resumed with every row exactly once, bad input named by column, and Dask equal to local.

Real parts: the CLI in a subprocess, its worker processes, onnxruntime, pyarrow, and a real Dask scheduler
with two worker processes on loopback.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import psutil
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from edgefleet.broker import free_port
from modules.batch.plan import Part, Source, csv_boundaries, job_record, pending, plan_parts, resume_refusal
from modules.examples import N_FEATURES, write_logreg_onnx
from tests.batch_support import onnx_bundle, score_cli, sign_bundle, write_table

XCOLS = ",".join(f"f{i}" for i in range(N_FEATURES))


def ok(proc: subprocess.CompletedProcess[str]) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def said(proc: subprocess.CompletedProcess[str]) -> str:
    return " ".join(proc.stderr.split())


def await_path(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until ``path`` exists; fail at once if ``proc`` ended first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the job ended ({proc.returncode}) before {path.name} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout}s"
        time.sleep(0.02)  # a file written by another process: nothing to subscribe to


def bare_onnx(model: Path, x: np.ndarray) -> np.ndarray:
    """The baseline: onnxruntime on all rows at once."""
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x.astype(np.float32)})[0].reshape(-1)


# --- planning (pure) ------------------------------------------------------------------------------------


@pytest.mark.parametrize("newline,trailing", [(b"\n", True), (b"\n", False), (b"\r\n", True)])
def test_csv_boundaries_cut_whole_lines_whatever_the_blocks(newline, trailing):
    rng = np.random.default_rng(1)
    lines = [b"id,a,b"] + [b"%d,%s,%d" % (i, b"x" * int(rng.integers(0, 40)), i * 7) for i in range(1003)]
    data = newline.join(lines) + (newline if trailing else b"")
    for sizes in ([1], [7, 13], [len(data)], [4096]):
        blocks, pos, k = [], 0, 0
        while pos < len(data):
            n = sizes[k % len(sizes)]
            blocks.append(data[pos:pos + n])
            pos, k = pos + n, k + 1
        header_end, offsets, units = csv_boundaries(blocks, 100)
        assert data[:header_end] == lines[0] + newline
        assert units == [100] * 10 + [3] and offsets[-1] == len(data) and offsets[0] == header_end
        for u, rows in enumerate(units):
            chunk = data[offsets[u]:offsets[u + 1]]
            assert chunk.rstrip(b"\r\n").split(newline) == lines[1 + 100 * u:1 + 100 * u + rows]
    assert csv_boundaries([b"id,a\n"], 10) == (5, [5], [])
    assert csv_boundaries([b"id,a"], 10) == (4, [4], [])


def test_parts_group_units_and_a_resumed_job_skips_exactly_the_written_parts():
    a = Source("/in/a.parquet", 10, 1, "parquet", (40, 40, 40, 5))
    b = Source("/in/b.parquet", 10, 1, "parquet", (200,))
    parts = plan_parts([a, b], 80)
    assert [(p.source, p.first, p.count, p.row_start, p.rows) for p in parts] == [
        (0, 0, 2, 0, 80), (0, 2, 2, 80, 45), (1, 0, 1, 125, 200)]
    assert [p.name for p in pending(parts, ["part-00001.parquet", "other.parquet"])] == [
        "part-00000.parquet", "part-00002.parquet"]
    assert pending(parts, [p.name for p in parts]) == []

    record = job_record([a, b], parts, "d" * 64, {"keep": ["id"], "part_rows": 80})
    assert resume_refusal(json.loads(json.dumps(record)), record) is None
    moved = job_record([a, Source("/in/b.parquet", 11, 1, "parquet", (200,))], parts, "d" * 64,
                       {"keep": ["id"], "part_rows": 80})
    assert "b.parquet changed" in resume_refusal(record, moved)
    other = job_record([a, b], parts, "e" * 64, {"keep": ["id"], "part_rows": 80})
    assert "bundle" in resume_refusal(record, other)
    opts = job_record([a, b], parts, "d" * 64, {"keep": [], "part_rows": 80})
    assert "options differ (keep)" in resume_refusal(record, opts)
    assert Part(3, 0, 0, 1, 0, 1).name == "part-00003.parquet"


# --- scoring through the CLI ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def logreg(tmp_path_factory) -> tuple[Path, Path]:
    """(the signed bundle of the example ONNX model, the model file for the bare baseline)."""
    d = tmp_path_factory.mktemp("logreg")
    return onnx_bundle(d / "bundle"), write_logreg_onnx(d / "bare.onnx")


def test_parquet_and_csv_round_trips_equal_bare_onnxruntime(logreg, tmp_path):
    bundle, model = logreg
    x = np.random.default_rng(2).normal(size=(2300, N_FEATURES)).astype(np.float32)
    want = bare_onnx(model, x)

    # a Parquet file of features only: the model's one input reads all its columns, in order
    features = write_table(tmp_path / "features.parquet", x, ids=False, row_group_size=500)
    summary = ok(score_cli("--bundle", str(bundle), "-i", str(features), "-o", str(tmp_path / "scored"),
                           "--part-rows", "1000", "--workers", "2", "--json"))
    assert (summary["rows"], summary["parts"], summary["engine"]) == (2300, 3, "local")
    parts = sorted(p.name for p in (tmp_path / "scored").iterdir() if not p.name.startswith("_"))
    assert parts == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    scored = pq.read_table(tmp_path / "scored")  # a Parquet dataset: the job's own files are hidden from readers
    assert scored.column_names == [f"f{i}" for i in range(N_FEATURES)] + ["probability"]
    assert np.array_equal(scored["probability"].to_numpy(), want)
    assert np.array_equal(scored["f0"].to_numpy(), x[:, 0])

    # CSV in (ids beside the features, chosen with --columns), CSV out
    rows = write_table(tmp_path / "rows.csv", x.astype(np.float64), ids=True)
    summary = ok(score_cli("--bundle", str(bundle), "-i", str(rows), "-o", str(tmp_path / "scored.csv"),
                           "--columns", f"x={XCOLS}", "--keep", "id", "--part-rows", "700", "--json"))
    assert (summary["rows"], summary["parts"]) == (2300, 4)
    assert not (tmp_path / "scored.csv.parts").exists()
    back = pacsv.read_csv(tmp_path / "scored.csv")
    assert back.column_names == ["id", "probability"]
    assert back["id"].to_pylist() == list(range(2300))
    assert np.array_equal(back["probability"].to_numpy().astype(np.float32), bare_onnx(model, x.astype(np.float64)))

    # a directory of Parquet files in, one Parquet file out
    (tmp_path / "many").mkdir()
    write_table(tmp_path / "many" / "a.parquet", x[:1000], ids=False)
    write_table(tmp_path / "many" / "b.parquet", x[1000:], ids=False)
    ok(score_cli("--bundle", str(bundle), "-i", str(tmp_path / "many"), "-o", str(tmp_path / "one.parquet"),
                 "--keep", "none", "--json"))
    assert pq.read_table(tmp_path / "one.parquet").column_names == ["probability"]
    assert np.array_equal(pq.read_table(tmp_path / "one.parquet")["probability"].to_numpy(), want)

    # --overwrite starts a job afresh, but never empties a directory that is not a job's output
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    for extra in ([], ["--overwrite"]):
        refused = score_cli("--bundle", str(bundle), "-i", str(features), "-o", str(tmp_path / "mine"), *extra)
        assert refused.returncode == 1 and "edgefleet job" in said(refused)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    again = ok(score_cli("--bundle", str(bundle), "-i", str(features), "-o", str(tmp_path / "scored"), "--overwrite",
                         "--part-rows", "1000", "--json"))
    assert (again["parts"], again["parts_resumed"]) == (3, 0)


GATED = '''\
import os
import time

import numpy as np

def init():
    with open({pid!r}, "a") as f:
        f.write(f"{{os.getpid()}}\\n")


def run(inputs):
    while inputs["id"][0] >= 100 and os.path.exists({gate!r}):  # the test holds every part after the first
        time.sleep(0.01)
    x = np.column_stack([inputs["a"], inputs["b"]])
    return {{"y": x[:, 0] * 10 + x[:, 1]}}
'''


@pytest.mark.parametrize("workers", ["1", "2"])  # in the job's own process; in worker processes
def test_a_job_killed_mid_way_resumes_with_every_row_exactly_once(tmp_path, workers):
    gate, pid_file = tmp_path / "gate", tmp_path / "worker.pid"
    gate.touch()
    (tmp_path / "gated.py").write_text(GATED.format(gate=str(gate), pid=str(pid_file)))
    bundle = sign_bundle(tmp_path / "bundle", "gated", {"gated.py": tmp_path / "gated.py"}, runtime="python",
                         model="gated.py")
    n = 1000
    table = pa.table({"id": np.arange(n), "a": np.arange(n) % 7, "b": np.arange(n) * 0.5})
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=100)
    out = tmp_path / "out.parquet"
    args = ["--bundle", str(bundle), "-i", str(tmp_path / "in.parquet"), "-o", str(out), "--part-rows", "100",
            "--batch-rows", "100", "--workers", workers, "--json"]
    job = subprocess.Popen([sys.executable, "-m", "edgefleet", "score", *args], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, cwd=Path(__file__).resolve().parents[1])
    try:
        await_path(tmp_path / "out.parquet.parts" / "part-00000.parquet", job)
        pids = [int(p) for p in pid_file.read_text().split()]
        assert all(psutil.pid_exists(p) for p in pids)
        assert (pids == [job.pid]) if workers == "1" else (job.pid not in pids)
        job.send_signal(signal.SIGKILL)
        job.wait(30)
    finally:
        if job.poll() is None:
            job.kill()
        job.communicate()
    for worker in pids:  # a worker process exits with the job (engine.py: _exit_with)
        psutil.wait_procs([psutil.Process(worker)] if psutil.pid_exists(worker) else [], timeout=30)
        assert not psutil.pid_exists(worker) or psutil.Process(worker).status() == psutil.STATUS_ZOMBIE
    assert not out.exists()
    assert sorted(p.name for p in (tmp_path / "out.parquet.parts").glob("part-*")) == ["part-00000.parquet"]

    gate.unlink()
    summary = ok(score_cli(*args))
    assert (summary["parts"], summary["parts_resumed"], summary["rows"], summary["rows_scored_now"]) == (10, 1, n, 900)
    scored = pq.read_table(out)
    assert scored["id"].to_pylist() == list(range(n))  # every row once, in order
    assert np.array_equal(scored["y"].to_numpy(), (np.arange(n) % 7) * 10 + np.arange(n) * 0.5)
    assert not (tmp_path / "out.parquet.parts").exists()

    again = score_cli(*args)  # the finished output is not written over by accident
    assert again.returncode == 1 and "already exists" in said(again) and "--overwrite" in said(again)


def test_bad_input_is_refused_with_the_column_named(logreg, tmp_path):
    bundle, _ = logreg
    x = np.random.default_rng(3).normal(size=(2000, N_FEATURES))

    def score(path: Path, *extra: str) -> str:
        proc = score_cli("--bundle", str(bundle), "-i", str(path), "-o", str(tmp_path / f"out-{path.stem}"),
                         "--part-rows", "500", *extra)
        assert proc.returncode == 1, proc.stderr
        return said(proc)

    cols = {f"f{i}": pa.array(x[:, i]) for i in range(N_FEATURES)}
    pq.write_table(pa.table({k: v for k, v in cols.items() if k != "f2"}), tmp_path / "missing.parquet")
    assert "column 'f2' (for model input 'x') is not in the input" in score(tmp_path / "missing.parquet",
                                                                           "--columns", f"x={XCOLS}")
    pq.write_table(pa.table(cols | {"f1": pa.array([str(v) for v in x[:, 1]])}), tmp_path / "text.parquet")
    assert "column 'f1' is string; model input 'x' takes float32" in score(tmp_path / "text.parquet")
    holes = x[:, 3].copy()
    pq.write_table(pa.table(cols | {"f3": pa.array(holes, mask=np.arange(2000) == 1234)}), tmp_path / "holes.parquet",
                   row_group_size=500)
    assert "column 'f3' has 1 empty value(s)" in score(tmp_path / "holes.parquet") and "row 1234" in \
        score(tmp_path / "holes.parquet", "--workers", "1", "--overwrite")
    # in order, in one process: the parts before the bad one are done, nothing half-written is left
    assert sorted(p.name for p in (tmp_path / "out-holes").iterdir() if not p.name.startswith("_")) == \
        ["part-00000.parquet", "part-00001.parquet"]
    pq.write_table(pa.table(cols | {"id": pa.array(np.arange(2000))}), tmp_path / "wide.parquet")
    assert "takes 4 features; 5 columns would feed it" in score(tmp_path / "wide.parquet")

    lines = ["f0,f1,f2,f3"] + [",".join(str(v) for v in row) for row in x]
    lines[1 + 1700] = lines[1 + 1700].replace(lines[1 + 1700].split(",")[2], "abc", 1)
    (tmp_path / "typo.csv").write_text("\n".join(lines) + "\n")
    said_ = score(tmp_path / "typo.csv")
    assert "column 'f2'" in said_ and "invalid value 'abc'" in said_ and "row 1700, line 1702 of typo.csv" in said_


@pytest.fixture
def dask_cluster(tmp_path):
    """A real Dask scheduler and two worker processes on loopback."""
    from distributed import Client

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    dask = str(Path(sys.executable).parent / "dask")
    logs = open(tmp_path / "dask.log", "wb")  # noqa: SIM115 - closed below
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                              stdout=logs, stderr=subprocess.STDOUT)]
    try:
        procs += [subprocess.Popen([dask, "worker", address, "--nthreads", "1", "--host", "127.0.0.1",
                                    "--no-dashboard", "--name", f"w{i}"], stdout=logs, stderr=subprocess.STDOUT,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"}) for i in range(2)]
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
        yield address
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in reversed(procs):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        logs.close()


def test_the_dask_engine_scores_the_same_rows_as_the_local_one(logreg, tmp_path, dask_cluster):
    bundle, model = logreg
    x = np.random.default_rng(4).normal(size=(3000, N_FEATURES))
    table = write_table(tmp_path / "rows.parquet", x, ids=True, row_group_size=250)
    common = ["--bundle", str(bundle), "-i", str(table), "--columns", f"x={XCOLS}", "--part-rows", "500", "--json"]
    assert ok(score_cli(*common, "-o", str(tmp_path / "local.parquet")))["engine"] == "local"
    remote = ok(score_cli(*common, "-o", str(tmp_path / "dask.parquet"), "--scheduler", dask_cluster))
    assert (remote["engine"], remote["workers"], remote["parts"], remote["rows"]) == ("dask", 2, 6, 3000)
    assert pq.read_table(tmp_path / "dask.parquet").equals(pq.read_table(tmp_path / "local.parquet"))
    assert np.array_equal(pq.read_table(tmp_path / "dask.parquet")["probability"].to_numpy(), bare_onnx(model, x))
