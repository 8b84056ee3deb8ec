"""How many simulated devices fit in one process: N real agents, N real MQTT connections, each heartbeating.

Starts mosquitto (fd limit raised, ``max_connections -1``) and a hub in this process, then
``edgefleet sim run --devices N`` as a child process. Memory per device is the simulator's RSS
with every device online divided by N: an upper bound, as it includes the interpreter and
onnxruntime (the agents are all built before they connect, so an RSS slope over "online" says
nothing). Heartbeat health is the share of devices whose telemetry batch (sent every interval, empty
with no module installed) an observer on the broker saw within each interval once all are online. Usage: ``python bench/sim_scale.py [--devices 10000] [--telemetry-interval 30]``
"""

from __future__ import annotations

import argparse
import shutil
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
from hub.testing import MqttProbe  # noqa: E402

TOKEN = "bench-sim-token-0123456789abcdefghijk"


def peak_rss(pid: int) -> int:
    """The process's high-water resident set (VmHWM), bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--telemetry-interval", type=float, default=30.0)
    ap.add_argument("--connect-rate", type=float, default=1000.0, help="devices started per second (0: all at once)")
    ap.add_argument("--intervals", type=int, default=3, help="telemetry intervals to watch once all are online")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--keep-log", type=Path, help="copy the simulator's log here")
    args = ap.parse_args()
    n, every = args.devices, args.telemetry_interval
    print(f"open-file limit: {raise_fd_limit()} (the sim and the broker each need more than {n})")
    with tempfile.TemporaryDirectory(prefix="edgefleet-sim-scale-") as tmp, LocalBroker(kind="mosquitto") as broker:
        work = Path(tmp)
        server = HubServer(HubConfig(work / "hub", broker.url, admin_token=TOKEN, mqtt_client_id="bench-scale-hub",
                                     writer_batch_rows=5000)).start()
        assert server.wait_mqtt(10) and broker.proc is not None
        db = server.hub.db
        mosquitto = psutil.Process(broker.proc.pid)
        probe = MqttProbe(broker.url)  # an observer beside the hub: every device's telemetry batch
        probe.subscribe("edgefleet/v1/devices/+/telemetry", qos=0)
        t0 = time.monotonic()
        sim = subprocess.Popen([sys.executable, "-m", "edgefleet", "--hub", server.url, "--token", TOKEN, "sim", "run",
                                "--devices", str(n), "--rate", "0", "--telemetry-interval", str(every),
                                "--connect-rate", str(args.connect_rate),
                                "--data", str(work / "sim"), "--prefix", "sc"],
                               stdout=open(work / "sim.log", "wb"), stderr=subprocess.STDOUT)
        proc = psutil.Process(sim.pid)
        t_enrolled = None
        health: list[float] = []
        try:
            online = 0
            while online < n:
                assert sim.poll() is None, (work / "sim.log").read_text()[-2000:]
                assert time.monotonic() - t0 < args.timeout, f"only {online} of {n} online"
                time.sleep(2)
                online = db.scalar("SELECT count(*) FROM devices WHERE online = 1")
                enrolled = db.scalar("SELECT count(*) FROM devices")
                if t_enrolled is None and enrolled >= n:
                    t_enrolled = time.monotonic() - t0
                print(f"  {time.monotonic() - t0:6.0f}s enrolled {enrolled:>6} online {online:>6}"
                      f" sim RSS {proc.memory_info().rss / 2**20:7.0f} MB", flush=True)
            t_online, rss_online = time.monotonic() - t0, proc.memory_info().rss
            # heartbeat health: the share of devices whose telemetry batch reached the broker in each interval
            for _ in range(args.intervals):
                mark = len(probe.messages)
                time.sleep(every)
                heard = len({m.topic.split("/")[3] for m in probe.messages[mark:]})
                still = db.scalar("SELECT count(*) FROM devices WHERE online = 1")
                health.append(heard / n)
                print(f"  interval: telemetry from {heard} of {n} ({heard / n:.1%}), {still} online", flush=True)
            rss, peak = proc.memory_info().rss, peak_rss(sim.pid)
            broker_rss = mosquitto.memory_info().rss
            cpu = proc.cpu_percent(interval=5.0)
        finally:
            sim.send_signal(signal.SIGINT)
            try:
                sim.wait(120)
            except subprocess.TimeoutExpired:
                sim.kill()
            probe.close()
            server.stop()
            if args.keep_log:
                shutil.copy(work / "sim.log", args.keep_log)
    print(f"devices {n}: enrolled after {t_enrolled:.0f}s, all online after {t_online:.0f}s"
          f" (connect ramp {args.connect_rate:g}/s)")
    print(f"heartbeat health: {', '.join(f'{h:.1%}' for h in health)} of devices heard per {every:g}s interval")
    print(f"sim RSS {rss_online / 2**20:.0f} MB when all online, {rss / 2**20:.0f} MB after, peak {peak / 2**20:.0f} MB;"
          f" {rss / n / 1024:.0f} KB per device (upper bound: includes the interpreter and onnxruntime)")
    print(f"broker (mosquitto) RSS {broker_rss / 2**20:.0f} MB ({broker_rss / n / 1024:.1f} KB per connection);"
          f" sim CPU at rest {cpu:.0f}% of one core")


if __name__ == "__main__":
    main()
