"""How many simulated devices fit in one process: N real agents, N real MQTT connections, each heartbeating.

Starts mosquitto (fd limit raised, ``max_connections -1``) and a hub in this process, then
``edgefleet sim run --devices N`` as a child process. Memory per device is the simulator's RSS
with every device online divided by N: an upper bound, as it includes the interpreter and
onnxruntime (the agents are all built before they connect, so an RSS slope over "online" says
nothing). "Heartbeating" is the hub hearing a telemetry batch from every device after all are online. Usage: ``python bench/sim_scale.py [--devices 10000] [--telemetry-interval 30]``
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402

from edgefleet.broker import LocalBroker, raise_fd_limit  # noqa: E402
from hub import HubConfig, HubServer  # noqa: E402

TOKEN = "bench-sim-token"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--telemetry-interval", type=float, default=30.0)
    ap.add_argument("--timeout", type=float, default=1800.0)
    args = ap.parse_args()
    n = args.devices
    print(f"open-file limit: {raise_fd_limit()} (the sim and the broker each need more than {n})")
    with tempfile.TemporaryDirectory(prefix="edgefleet-sim-scale-") as tmp, LocalBroker(kind="mosquitto") as broker:
        work = Path(tmp)
        server = HubServer(HubConfig(work / "hub", broker.url, admin_token=TOKEN, mqtt_client_id="bench-scale-hub",
                                     writer_batch_rows=5000)).start()
        assert server.wait_mqtt(10)
        db = server.hub.db
        t0 = time.monotonic()
        sim = subprocess.Popen([sys.executable, "-m", "edgefleet", "--hub", server.url, "--token", TOKEN, "sim", "run",
                                "--devices", str(n), "--rate", "0", "--telemetry-interval", str(args.telemetry_interval),
                                "--data", str(work / "sim"), "--prefix", "sc"],
                               stdout=open(work / "sim.log", "wb"), stderr=subprocess.STDOUT)
        proc = psutil.Process(sim.pid)
        marks: dict[int, tuple[float, int]] = {}
        try:
            online = 0
            while online < n:
                assert sim.poll() is None, (work / "sim.log").read_text()[-2000:]
                assert time.monotonic() - t0 < args.timeout, f"only {online} of {n} online"
                time.sleep(2)
                online = db.scalar("SELECT count(*) FROM devices WHERE online = 1")
                enrolled = db.scalar("SELECT count(*) FROM devices")
                print(f"  {time.monotonic() - t0:6.0f}s enrolled {enrolled:>6} online {online:>6}"
                      f" sim RSS {proc.memory_info().rss / 2**20:7.0f} MB", flush=True)
            marks[n] = (time.monotonic() - t0, proc.memory_info().rss)
            since = time.time()
            while True:  # every device heartbeats: a telemetry batch from each after all are online
                time.sleep(2)
                heard = db.scalar("SELECT count(DISTINCT device) FROM telemetry WHERE ts >= ?", (since,))
                if heard >= n or time.monotonic() - t0 > args.timeout:
                    break
            beat_s = time.time() - since
            rss = proc.memory_info().rss
            cpu = proc.cpu_percent(interval=5.0)
        finally:
            sim.send_signal(signal.SIGINT)
            try:
                sim.wait(120)
            except subprocess.TimeoutExpired:
                sim.kill()
            server.stop()
    t100, r100 = marks[n]
    per_device = r100 / n
    print(f"devices {n}: all online after {t100:.0f}s; telemetry heard from {heard} within {beat_s:.0f}s")
    print(f"sim RSS {rss / 2**20:.0f} MB in total; {per_device / 1024:.0f} KB per device (upper bound);"
          f" sim CPU at rest {cpu:.0f}% of one core (telemetry every {args.telemetry_interval:g}s)")


if __name__ == "__main__":
    main()
