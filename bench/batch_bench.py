"""Batch scoring throughput and memory against bare onnxruntime, same file, same run.

    python bench/batch_bench.py [--rows 2000000] [--rounds 3] [--json]

Writes a Parquet file of ``--rows`` rows of the example model's features (modules.examples, row groups
of 131072 rows) and a signed bundle of that model, then, alternating each round:

* **bare**: one process reads the file in batches of 262144 rows, runs onnxruntime (its default
  threads) and writes the probabilities to a Parquet file with pyarrow's defaults: the plain script;
* **bare, plain encoding**: the same script writing the way edgefleet score does (no dictionary for the
  float column, which pyarrow otherwise builds and abandons at a cost larger than the scoring): the
  fastest plain script, so the second ratio is edgefleet's own overhead;
* **edgefleet score** (local engine, one worker per core) from the start of the command to its exit
  (bundle verification, worker start-up and the job record included), writing a directory of part files;
* the same job on **Dask distributed** with 1 and 2 worker processes (a scheduler and workers on loopback).

Each command runs from compiled bytecode, as installed (``as_installed``), after one untimed run.
Prints the median rows/s of each and the ratios, and the peak memory (RSS summed over the scoring
process and its workers, sampled every 20 ms) for half the rows and all of them: it must not grow
with the file. Both are also run on a file of 1,000 rows: its time is the fixed cost of each (start-up,
imports, workers), and ``(rows - 1000) / (t_rows - t_1000)`` the marginal rate once running, the
figure that matters for files much larger than this one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from endpoint_bench import make_bundle  # noqa: E402  (the same signed example bundle)

TINY = 1000
BARE = '''
import sys
import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq

session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
writer = None
for batch in pq.ParquetFile(sys.argv[2]).iter_batches(batch_size=262144):
    x = np.column_stack([c.to_numpy() for c in batch.columns]).astype(np.float32, copy=False)
    p = session.run(None, {"x": x})[0].reshape(-1)
    out = pa.record_batch([pa.array(p)], names=["probability"])
    # argv[4] "plain": no dictionary for the float column, as edgefleet score writes it (modules/batch/io.py)
    writer = writer or pq.ParquetWriter(sys.argv[3], out.schema, use_dictionary=sys.argv[4] != "plain")
    writer.write_batch(out)
writer.close()
'''


def write_rows(path: Path, rows: int, seed: int = 0) -> Path:
    """Feature rows in row groups of 131072, written a group at a time (the bench itself stays small)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from modules.examples import N_FEATURES, synthetic_inputs

    rng = np.random.default_rng(seed)
    group = 131072
    schema = pa.schema([(f"f{i}", pa.float32()) for i in range(N_FEATURES)])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, group):
            x = synthetic_inputs(rng, min(group, rows - start))
            writer.write_batch(pa.record_batch([pa.array(x[:, i]) for i in range(N_FEATURES)], schema=schema))
    return path


ENV = dict(os.environ)


def as_installed(pycache: Path) -> None:
    """Every command runs from compiled bytecode, as after ``pip install`` (which compiles it): a shell with
    PYTHONDONTWRITEBYTECODE would otherwise compile edgefleet's own modules from source on every run. The
    bytecode goes to the bench's directory, written by an untimed first run of each command."""
    ENV.pop("PYTHONDONTWRITEBYTECODE", None)
    ENV["PYTHONPYCACHEPREFIX"] = str(pycache)


def measured(cmd: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS in bytes summed over the process tree) of a command that must succeed."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree))
            except psutil.Error:
                pass
            stop.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    elapsed = time.perf_counter() - started
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed: {err.decode()[-2000:]}")
    return elapsed, peak


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """A Dask scheduler and ``n`` single-threaded worker processes on loopback."""

    def __init__(self, n: int, log: Path) -> None:
        from distributed import Client

        self.address = f"tcp://127.0.0.1:{free_port()}"
        dask = str(Path(sys.executable).parent / "dask")
        self.log = log.open("ab")
        port = self.address.rsplit(":", 1)[1]
        self.procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", port, "--no-dashboard"],
                                       stdout=self.log, stderr=subprocess.STDOUT)]
        self.procs += [subprocess.Popen([dask, "worker", self.address, "--nthreads", "1", "--host", "127.0.0.1",
                                         "--no-dashboard"], stdout=self.log, stderr=subprocess.STDOUT)
                       for _ in range(n)]
        with Client(self.address, timeout=60) as client:
            client.wait_for_workers(n, timeout=120)

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in reversed(self.procs):
            proc.wait(30)
        self.log.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-dask", action="store_true", help="skip the Dask runs (a quicker look at the local engine)")
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="edgefleet-batch-bench-"))
    try:
        bundle, root = make_bundle(work)
        model = bundle / "files" / "model.onnx"
        full = write_rows(work / "full.parquet", args.rows)
        half = write_rows(work / "half.parquet", args.rows // 2)
        tiny = write_rows(work / "tiny.parquet", TINY)
        bare = work / "bare.py"
        bare.write_text(BARE)
        edgefleet = [sys.executable, "-m", "edgefleet", "score", "--bundle", str(bundle), "--root", str(root),
                     "--keep", "none", "--quiet", "--overwrite"]

        def score(table: Path, *extra: str) -> tuple[float, int]:
            return measured([*edgefleet, "-i", str(table), "-o", str(work / "scored"), *extra])

        runs: dict[str, list[tuple[float, int]]] = {"bare": [], "score": [], "score_half": [], "bare_tiny": [],
                                                    "score_tiny": [], "plain": [], "plain_tiny": []}
        as_installed(work / "pycache")
        score(tiny)  # untimed: bytecode written, files cached
        measured([sys.executable, str(bare), str(model), str(tiny), str(work / "b.parquet"), "plain"])
        for _ in range(args.rounds):
            for key, table, enc in (("bare", full, "dict"), ("bare_tiny", tiny, "dict"), ("plain", full, "plain"),
                                    ("plain_tiny", tiny, "plain")):
                runs[key].append(measured([sys.executable, str(bare), str(model), str(table), str(work / "b.parquet"),
                                           enc]))
            runs["score"].append(score(full))
            runs["score_half"].append(score(half))
            runs["score_tiny"].append(score(tiny))
        for n in () if args.no_dask else (1, 2):
            cluster = Cluster(n, work / "dask.log")
            try:
                runs[f"dask{n}"] = [score(full, "--scheduler", cluster.address) for _ in range(args.rounds)]
            finally:
                cluster.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def rate(key: str, rows: int = args.rows) -> float:
        return rows / statistics.median(t for t, _ in runs[key])

    def seconds(key: str) -> float:
        return statistics.median(t for t, _ in runs[key])

    def marginal(key: str) -> float | None:
        """None where the 1,000-row run took as long as all the rows (other work on the machine)."""
        extra = seconds(key) - seconds(f"{key}_tiny")
        return (args.rows - TINY) / extra if extra > 0 else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a and b else None

    def peak(key: str) -> float:
        return statistics.median(m for _, m in runs[key]) / 2**20

    result = {
        "rows": args.rows, "rounds": args.rounds, "cores": os.cpu_count(), "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0],
        "bare_rows_per_s": round(rate("bare")), "plain_rows_per_s": round(rate("plain")),
        "score_rows_per_s": round(rate("score")),
        "ratio_score_vs_bare": round(rate("score") / rate("bare"), 3),
        "ratio_score_vs_plain": round(rate("score") / rate("plain"), 3),
        "fixed_seconds": {"bare": round(seconds("bare_tiny"), 3), "plain": round(seconds("plain_tiny"), 3),
                          "score": round(seconds("score_tiny"), 3)},
        "marginal_rows_per_s": {k: round(m) if (m := marginal(k)) else None for k in ("bare", "plain", "score")},
        "marginal_ratio_score_vs_bare": ratio(marginal("score"), marginal("bare")),
        "marginal_ratio_score_vs_plain": ratio(marginal("score"), marginal("plain")),
        "peak_rss_mb": {"bare": round(peak("bare"), 1), f"score_{args.rows // 2}_rows": round(peak("score_half"), 1),
                        f"score_{args.rows}_rows": round(peak("score"), 1)},
        **({} if args.no_dask else {
            "dask_1_worker_rows_per_s": round(rate("dask1")), "dask_2_workers_rows_per_s": round(rate("dask2")),
            "dask_scaling_2_vs_1": round(rate("dask2") / rate("dask1"), 3)}),
        "seconds_median": {k: round(statistics.median(t for t, _ in v), 3) for k, v in runs.items()},
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.rows} rows, {os.cpu_count()} cores, median of {args.rounds} rounds (load average "
          f"{load_before:.1f} before, {result['load_average_after']:.1f} after: other work slows both sides)")
    print(f"  bare onnxruntime, one process   {result['bare_rows_per_s']:>12,} rows/s")
    print(f"  bare, plain encoding            {result['plain_rows_per_s']:>12,} rows/s")
    print(f"  edgefleet score (local engine)  {result['score_rows_per_s']:>12,} rows/s   "
          f"{result['ratio_score_vs_bare']:.2f}x bare (goal >= 0.8x), {result['ratio_score_vs_plain']:.2f}x plain")
    fixed, marg = result["fixed_seconds"], result["marginal_rows_per_s"]
    print(f"  fixed cost (a {TINY}-row file): bare {fixed['bare']} s, plain {fixed['plain']} s, score {fixed['score']} s")
    print(f"  marginal rows/s: bare {marg['bare']}, plain {marg['plain']}, score {marg['score']}   "
          f"{result['marginal_ratio_score_vs_bare']}x bare, {result['marginal_ratio_score_vs_plain']}x plain "
          "(None: the 1,000-row run took as long as all the rows)")
    if not args.no_dask:
        print(f"  edgefleet score, Dask 1 worker  {result['dask_1_worker_rows_per_s']:>12,} rows/s")
        print(f"  edgefleet score, Dask 2 workers {result['dask_2_workers_rows_per_s']:>12,} rows/s   "
              f"{result['dask_scaling_2_vs_1']:.2f}x one worker")
    mem = result["peak_rss_mb"]
    print(f"  peak RSS (process tree, MiB): bare {mem['bare']}, score {args.rows // 2} rows "
          f"{mem[f'score_{args.rows // 2}_rows']}, score {args.rows} rows {mem[f'score_{args.rows}_rows']}")
    print(f"  median seconds: {result['seconds_median']}")


if __name__ == "__main__":
    main()
