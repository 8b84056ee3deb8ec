"""Register and bundle a large model against a hub in a child process: hub memory and hashing speed.

Generates an ONNX model with one big initializer (default 200 MB), starts a
broker and ``edgefleet hub serve`` as a child process, then per round: registers
the model over HTTP (streamed upload, hashed into the blob store, load-checked in
the hub's own child process) and builds a module from it (every chunk hashed).
A sampler thread reads the hub's RSS every 10 ms. The baseline is ``sha256sum``
on the same file in the same run.

Goals: hub peak RSS above idle < 100 MB; hub hashing throughput >= 50% of sha256sum.
Usage: ``python bench/registry_large_model.py [--mb 200] [--rounds 3]``
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402

from edgefleet.broker import LocalBroker, free_port  # noqa: E402
from edgefleet.client import HubClient  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "bench-admin-token-0123456789abcdefgh"


def write_big_onnx(path: Path, mb: int) -> Path:
    """y = x + W with W a float32 initializer of ``mb`` megabytes (random, so nothing compresses or dedups)."""
    from onnx import TensorProto, helper, numpy_helper

    n = mb * 1024 * 1024 // 4
    weights = np.random.default_rng(0).random(n, dtype=np.float32)
    graph = helper.make_graph([helper.make_node("Add", ["x", "W"], ["y"])], "big",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n])],
                              initializer=[numpy_helper.from_array(weights, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


class RssSampler:
    """Peak resident set size of one process, sampled in a thread."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        self.proc, self.interval = psutil.Process(pid), interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def sha256sum_seconds(path: Path) -> float:
    start = time.perf_counter()
    subprocess.run(["sha256sum", str(path)], check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if shutil.which("sha256sum") is None:
        sys.exit("sha256sum (coreutils) is needed for the baseline")
    work = Path(tempfile.mkdtemp(prefix="edgefleet-bench-"))
    hub = None
    try:
        t0 = time.perf_counter()
        model = write_big_onnx(work / "big.onnx", args.mb)
        size = model.stat().st_size
        print(f"model: {size / 1e6:.1f} MB written in {time.perf_counter() - t0:.1f}s")
        with LocalBroker() as broker:
            port = free_port()
            env = dict(os.environ, EDGEFLEET_ADMIN_TOKEN=TOKEN, PYTHONPATH=str(ROOT))
            hub = subprocess.Popen([sys.executable, "-m", "edgefleet", "hub", "serve", "--data", str(work / "hub"),
                                    "--port", str(port), "--mqtt", broker.url], env=env, cwd=ROOT,
                                   stdout=subprocess.DEVNULL, stderr=open(work / "hub.log", "wb"))
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or hub.poll() is not None:
                    sys.exit(f"hub did not start: {(work / 'hub.log').read_text()[-2000:]}")
                time.sleep(0.1)
            with HubClient(url, TOKEN, timeout=600) as c:
                c.get("/api/v1/models")  # warm the routes before measuring idle
                idle = psutil.Process(hub.pid).memory_info().rss
                register_s, build_s, peaks, baseline_s = [], [], [], []
                for i in range(args.rounds):
                    baseline_s.append(sha256sum_seconds(model))
                    with RssSampler(hub.pid) as sampler:
                        t = time.perf_counter()
                        c.register_model("big", [model])
                        register_s.append(time.perf_counter() - t)
                        t = time.perf_counter()
                        # a new module name per round: each build hashes every chunk afresh
                        c.post("/api/v1/modules", {"name": f"big-svc-{i}", "models": [f"big:{i + 1}"]})
                        build_s.append(time.perf_counter() - t)
                    peaks.append(sampler.peak - idle)
                hwm = int(next(line.split()[1] for line in Path(f"/proc/{hub.pid}/status").read_text().splitlines()
                               if line.startswith("VmHWM:"))) * 1024
    finally:
        if hub is not None:
            hub.terminate()
            hub.wait(30)
        shutil.rmtree(work, ignore_errors=True)

    med = statistics.median
    mbps = lambda s: size / s / 1e6  # noqa: E731
    print(f"rounds: {args.rounds}, file {size / 1e6:.1f} MB, hub idle RSS {idle / 1e6:.1f} MB, VmHWM {hwm / 1e6:.1f} MB")
    print(f"sha256sum (baseline)          median {med(baseline_s):6.2f}s  {mbps(med(baseline_s)):7.0f} MB/s")
    print(f"hub module build (hash+chunk) median {med(build_s):6.2f}s  {mbps(med(build_s)):7.0f} MB/s  "
          f"= {med(baseline_s) / med(build_s):.0%} of sha256sum (goal >= 50%)")
    print(f"hub register (upload+hash+load-check) median {med(register_s):6.2f}s  {mbps(med(register_s)):7.0f} MB/s  "
          f"= {med(baseline_s) / med(register_s):.0%} of sha256sum")
    print(f"hub peak RSS above idle       median {med(peaks) / 1e6:6.1f} MB  max {max(peaks) / 1e6:.1f} MB "
          f"(goal < 100 MB)")


if __name__ == "__main__":
    main()
