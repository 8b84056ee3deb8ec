"""Telemetry ingest: the hub persisting batches vs the ceiling, a bare paho subscriber counting them.

Same broker (mosquitto), same publishers, same messages, one run:
  (a) bare:  a paho subscriber on edgefleet/v1/devices/+/telemetry that only counts;
  (b) hub:   `edgefleet hub serve` (child process) decoding, validating, de-duplicating and writing to SQLite.
Shapes: 1 point per batch (message rate) and 100 (or more) points per batch (points persisted per second).
Prints medians over rounds and the hub/bare ratio.
Usage: python bench/ingest_bench.py [--messages 20000] [--rounds 3] [--workers 0,1,3] [--points 1,100,1000]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from edgefleet.broker import LocalBroker, free_port, wait_for_port  # noqa: E402
from protocol.messages import LatencyMs, TelemetryBatch, TelemetryPoint  # noqa: E402
from protocol.topics import Channel, device_topic  # noqa: E402

PUBLISHERS = 2
DEVICES = 50
TOKEN = "bench-admin-token-0123456789abcdefgh"
_KEEP: list[object] = []


def publish(port: int, devices: list[str], count: int, points: int, seq0: int, ready: Any, start: Any) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{devices[0]}-{seq0}", protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(500)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    now = time.time()
    payloads = []
    for i in range(count):
        dev = devices[i % len(devices)]
        batch = TelemetryBatch(device=dev, seq=seq0 + i // len(devices), ts=now, points=[
            TelemetryPoint(ts=now + k * 1e-3, module="m", version=1, inferences=10, errors=0,
                           latency_ms=LatencyMs(p50=1.0, p95=2.0, p99=3.0)) for k in range(points)])
        payloads.append((device_topic(dev, Channel.TELEMETRY), batch.encode()))
    ready.wait()  # connected and encoded: only publishing is timed
    start.wait()
    infos = [client.publish(t, p, qos=1) for t, p in payloads]
    for info in infos:
        info.wait_for_publish(120)
    client.loop_stop()
    client.disconnect()


def run_publishers(port: int, total: int, points: int, seq0: int) -> tuple[list[mp.Process], float]:
    """Start the publishers; return them and the moment they were released (the clock's start)."""
    ctx = mp.get_context("spawn")
    ready, start = ctx.Barrier(PUBLISHERS + 1), ctx.Event()
    devs = [f"bench-{i:03d}" for i in range(DEVICES)]
    procs = [ctx.Process(target=publish, args=(port, devs[i::PUBLISHERS], total // PUBLISHERS, points, seq0, ready,
                                               start)) for i in range(PUBLISHERS)]
    for p in procs:
        p.start()
    ready.wait(300)  # the publishers have connected and pre-encoded (large batches take seconds to encode)
    t0 = time.perf_counter()
    start.set()
    _KEEP.extend((ready, start))  # the children may still hold them after we return: keep their semaphores alive
    return procs, t0


def bare(port: int, total: int, points: int, seq0: int) -> float:
    got, first, last = 0, 0.0, 0.0
    done = threading.Event()

    def on_message(c, u, m):
        nonlocal got, first, last
        got += 1
        last = time.perf_counter()
        if got == 1:
            first = last
        if got >= total:
            done.set()

    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bare-sub", protocol=mqtt.MQTTv5)
    sub.on_message = on_message
    ready = threading.Event()
    sub.on_subscribe = lambda *a: ready.set()
    sub.connect("127.0.0.1", port)
    sub.loop_start()
    sub.subscribe("edgefleet/v1/devices/+/telemetry", qos=1)
    ready.wait(10)
    procs, t0 = run_publishers(port, total, points, seq0)
    done.wait(300)
    for p in procs:
        p.join()
    sub.loop_stop()
    sub.disconnect()
    return got / (last - t0) if got else 0.0


def hub_batches(db: Path) -> int:
    """Batches persisted so far, by any ingest process (rowid only grows on a new row: O(log n) to read)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return conn.execute("SELECT COALESCE(MAX(rowid), 0) FROM telemetry_batches").fetchone()[0]


def hub_run(db: Path, port: int, total: int, points: int, seq0: int) -> float:
    base = hub_batches(db)
    procs, t0 = run_publishers(port, total, points, seq0)
    target = base + total  # every batch has points, so each is one new row
    deadline = time.monotonic() + 300
    while hub_batches(db) < target and time.monotonic() < deadline:
        time.sleep(0.05)
    elapsed = time.perf_counter() - t0
    if hub_batches(db) < target:
        raise SystemExit(f"the hub persisted {hub_batches(db) - base} of {total} batches in 300 s")
    for p in procs:
        p.join()
    return total / elapsed


def start_hub(broker_url: str, data: str, workers: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "EDGEFLEET_ADMIN_TOKEN": TOKEN}
    hub = subprocess.Popen([sys.executable, "-m", "edgefleet", "hub", "serve", "--data", data, "--port", str(port),
                            "--mqtt", broker_url, "--ingest-workers", str(workers)], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_for_port("127.0.0.1", port, 60, hub)
    time.sleep(2.0)  # let the ingest workers join the shared-subscription group
    return hub, url


def enroll(url: str) -> None:
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        tokens = c.post("/api/v1/enrollment-tokens", json={"count": DEVICES}).json()["tokens"]
        for i, tok in enumerate(tokens):
            c.post("/api/v1/enroll", json={"token": tok, "device_id": f"bench-{i:03d}"}).raise_for_status()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", default="0", help="comma-separated ingest worker counts to measure, e.g. 0,1,3")
    ap.add_argument("--points", default="1,100", help="comma-separated points per batch, e.g. 1,100,1000")
    args = ap.parse_args()
    worker_counts = [int(w) for w in args.workers.split(",")]
    shapes = [int(p) for p in args.points.split(",")]

    def size(points: int) -> int:
        """Batches per round: ``--messages`` single points, or 25x as many points in larger batches."""
        return args.messages if points == 1 else max(args.messages * 25 // points, 4 * DEVICES)
    results: dict[tuple[str, int], list[float]] = {}
    seq = 0
    # Rounds interleave the bare subscriber and each hub configuration, so drift in the machine's load hits all
    # alike. No hub runs during a bare round: it would consume the same messages and lower the ceiling.
    with LocalBroker(kind="mosquitto") as broker, tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for points in shapes:
                results.setdefault(("bare", points), []).append(bare(broker.port, size(points), points, seq))
                seq += size(points) // DEVICES + 1
            for workers in worker_counts:
                data = Path(tmp) / f"hub-{workers}"
                hub, url = start_hub(broker.url, str(data), workers)
                try:
                    if r == 0:
                        enroll(url)
                    for points in shapes:
                        results.setdefault((f"hub+{workers}", points), []).append(
                            hub_run(data / "hub.db", broker.port, size(points), points, seq))
                        seq += size(points) // DEVICES + 1
                finally:
                    hub.send_signal(signal.SIGINT)
                    hub.wait(30)
    print(f"{'ingest':<12} {'points/batch':>12} {'msgs/s':>9} {'vs bare':>8} {'points/s':>10}")
    for points in shapes:
        b = statistics.median(results[("bare", points)])
        print(f"{'bare':<12} {points:>12} {b:>9.0f} {1:>7.2f}x {b * points:>10.0f}")
        for workers in worker_counts:
            h = statistics.median(results[(f"hub+{workers}", points)])
            label = f"hub+{workers}w"
            print(f"{label:<12} {points:>12} {h:>9.0f} {h / b:>7.2f}x {h * points:>10.0f}")


if __name__ == "__main__":
    main()
