"""How many simulated devices fit in one process: N real agents, N real MQTT connections, each heartbeating.

Starts mosquitto (fd limit raised, ``max_connections -1``) and a hub in this process, then
``edgefleet sim run --devices N`` as a child process. Memory per device is the simulator's RSS
with every device online divided by N: an upper bound, as it includes the interpreter and
onnxruntime (the agents are all built before they connect, so an RSS slope over "online" says
nothing). Heartbeat health is the share of devices whose telemetry batch (sent every interval, empty
with no module installed) an observer on the broker saw within each interval once all are online.

The broker runs the hub's real isolation path, as ``hub serve`` does by default: per-device passwords
and the ACL the hub writes at each enrolment batch (hub/fleet/broker_auth.py), reloaded by SIGHUP,
client ids bound to logins. The observer logs in as ingest worker 0 (read-only on telemetry and
data; no ingest worker runs here), since no other login may read every device's topics.
``--insecure-broker`` runs the open broker of the earlier figures, for comparison.
Usage: ``python bench/sim_scale.py [--devices 10000] [--telemetry-interval 30] [--insecure-broker]``
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402

from edgefleet.broker import LocalBroker, raise_fd_limit  # noqa: E402
from hub import HubConfig, HubServer  # noqa: E402
from hub.fleet.broker_auth import HUB_USER, BrokerAuth, worker_login  # noqa: E402
from hub.testing import MqttProbe  # noqa: E402
from protocol.broker_url import parse_broker_url  # noqa: E402

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
    ap.add_argument("--insecure-broker", action="store_true", help="an open broker (no logins, no ACL)")
    args = ap.parse_args()
    n, every, isolate = args.devices, args.telemetry_interval, not args.insecure_broker
    print(f"open-file limit: {raise_fd_limit()} (the sim and the broker each need more than {n});"
          f" broker isolation {'on' if isolate else 'off (--insecure-broker)'}")
    print("load average at the start (1, 5, 15 min): " + ", ".join(f"{x:.1f}" for x in os.getloadavg()))
    with tempfile.TemporaryDirectory(prefix="edgefleet-sim-scale-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        auth = BrokerAuth(work / "hub" / "broker", workers=1)  # the directory the hub writes (hub/context.py)
        if isolate:
            auth.write([])  # the hub's own login must exist before the broker starts
        broker = LocalBroker(kind="mosquitto", **({"password_file": auth.password_file, "acl_file": auth.acl_file}
                                                  if isolate else {}))
        stack.enter_context(broker)
        assert broker.proc is not None
        hub_url = auth.hub_url(broker.url) if isolate else broker.url
        server = HubServer(HubConfig(work / "hub", hub_url, public_mqtt_url=broker.url, admin_token=TOKEN,
                                     mqtt_client_id="bench-scale-hub", writer_batch_rows=5000, isolate=isolate,
                                     broker_pid=broker.proc.pid if isolate else None)).start()
        assert server.wait_mqtt(10)
        db = server.hub.db
        mosquitto = psutil.Process(broker.proc.pid)
        probe_url = broker.url
        if isolate:  # the observer's login: ingest worker 0's (the hub was started without workers, so add it)
            hub_auth = server.hub.broker_auth
            assert hub_auth is not None
            hub_auth.workers = 1
            hub_auth.write(server.hub.fleet.broker_credentials())
            b = parse_broker_url(hub_url)
            probe_url = f"mqtt://{worker_login(HUB_USER, 0)}:{quote(b.password or '', safe='')}@{b.host}:{b.port}"
        probe = MqttProbe(probe_url)  # an observer beside the hub: every device's telemetry batch
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
            logins = sum(not line.startswith(HUB_USER) for line in auth.password_file.read_text().splitlines()) \
                if isolate else 0
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
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"load average at the end (1, 5, 15 min): {load}")
    if isolate:
        print(f"broker isolation: {logins} device logins in {auth.password_file.name}, ACL bound to %u, client id = login")
    print(f"devices {n}: enrolled after {t_enrolled:.0f}s, all online after {t_online:.0f}s"
          f" (connect ramp {args.connect_rate:g}/s)")
    print(f"heartbeat health: {', '.join(f'{h:.1%}' for h in health)} of devices heard per {every:g}s interval")
    print(f"sim RSS {rss_online / 2**20:.0f} MB when all online, {rss / 2**20:.0f} MB after, peak {peak / 2**20:.0f} MB;"
          f" {rss / n / 1024:.0f} KB per device (upper bound: includes the interpreter and onnxruntime)")
    print(f"broker (mosquitto) RSS {broker_rss / 2**20:.0f} MB ({broker_rss / n / 1024:.1f} KB per connection);"
          f" sim CPU at rest {cpu:.0f}% of one core")


if __name__ == "__main__":
    main()
