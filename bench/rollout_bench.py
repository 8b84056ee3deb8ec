"""A rollout of a 1 MB bundle to many simulated devices in one wave: time until all run it, and the hub's egress.

The hub publishes bundle parts in passes (hub/mqtt/blob_carousel.py): a pass waits until the wave's
requests stop arriving, and every device installing the bundle is subscribed to its blob topic, so a
wave costs the hub about one copy of the bundle. The baseline, measured in the same run, is gather 0:
every request answered with its own copy, i.e. per-device transfer (run on fewer devices, because
the broker then fans every copy out to every subscriber).

Hub in this process (to read its egress counter, also exported as edgefleet_hub_blob_bytes_sent_total);
the fleet is ``edgefleet sim run`` in a child process, real agents over real MQTT connections.
Usage: ``python bench/rollout_bench.py [--devices 1000] [--baseline-devices 30] [--mb 1]``
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from edgefleet.broker import LocalBroker, raise_fd_limit  # noqa: E402
from hub import HubConfig, HubServer  # noqa: E402

TOKEN = "bench-rollout-token-0123456789abcdef"


def write_onnx(path: Path, mb: float) -> Path:
    """y = x @ W with W of ``mb`` megabytes of random float32 (incompressible)."""
    from onnx import TensorProto, helper, numpy_helper

    cols = int(mb * 1024 * 1024 / 4 / 4)
    w = np.random.default_rng(0).random((4, cols), dtype=np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "wide",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", cols])],
                              initializer=[numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def run(devices: int, gather: float, mb: float, broker: LocalBroker, work: Path) -> dict[str, float]:
    server = HubServer(HubConfig(work / f"hub-{gather}", broker.url, admin_token=TOKEN, blob_gather_s=gather,
                                 mqtt_client_id=f"bench-hub-{gather}", rollout_tick_s=0.5)).start()
    assert server.wait_mqtt(10)
    api = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120)
    sim = None
    try:
        model = write_onnx(work / "wide.onnx", mb)
        api.post("/api/v1/models", data={"name": "wide"},
                 files=[("files", ("model.onnx", model.read_bytes()))]).raise_for_status()
        module = api.post("/api/v1/modules", json={"name": "wide", "models": ["wide:1"]}).json()
        log = open(work / f"sim-{gather}.log", "wb")
        sim = subprocess.Popen([sys.executable, "-m", "edgefleet", "--hub", server.url, "--token", TOKEN, "sim", "run",
                                "--devices", str(devices), "--rate", "0", "--telemetry-interval", "60",
                                "--data", str(work / f"sim-{gather}"), "--prefix", f"rb{int(gather * 10)}"],
                               stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while sum(d["online"] for d in api.get("/api/v1/devices").json()) < devices:
            assert sim.poll() is None and time.monotonic() < deadline, "fleet did not come online"
            time.sleep(1)
        sent0 = server.hub.bridge.blob_bytes_sent
        t0 = time.monotonic()
        api.post("/api/v1/deployments", json={"name": "wide", "module": "wide:1"}).raise_for_status()
        while True:
            counts = api.get("/api/v1/deployments/wide").json()["counts"]
            if counts.get("running", 0) >= devices:
                break
            assert time.monotonic() - t0 < 1200, f"rollout did not finish: {counts}"
            time.sleep(0.5)
        seconds = time.monotonic() - t0
        egress = server.hub.bridge.blob_bytes_sent - sent0
        return {"devices": devices, "gather_s": gather, "bundle_bytes": module["size"], "seconds": round(seconds, 1),
                "hub_egress_bytes": egress, "egress_per_bundle": round(egress / module["size"], 2),
                "egress_per_device_bytes": round(egress / devices)}
    finally:
        if sim is not None:
            sim.send_signal(signal.SIGINT)
            try:
                sim.wait(60)
            except subprocess.TimeoutExpired:
                sim.kill()
        api.close()
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--baseline-devices", type=int, default=30)
    ap.add_argument("--mb", type=float, default=1.0)
    ap.add_argument("--gather", type=float, default=HubConfig.blob_gather_s, help="carousel gathering time (s)")
    args = ap.parse_args()
    raise_fd_limit()
    os.environ.pop("EDGEFLEET_ADMIN_TOKEN", None)
    with tempfile.TemporaryDirectory(prefix="edgefleet-rollout-bench-") as tmp, LocalBroker(kind="mosquitto") as broker:
        work = Path(tmp)
        rows = [run(args.devices, args.gather, args.mb, broker, work), run(args.baseline_devices, 0.0, args.mb, broker, work)]
    print(f"{'devices':>8} {'gather':>7} {'bundle MB':>9} {'seconds':>8} {'hub egress MB':>13} {'x bundle':>8}"
          f" {'per device KB':>13}")
    for r in rows:
        print(f"{r['devices']:>8} {r['gather_s']:>7} {r['bundle_bytes'] / 2**20:>9.2f} {r['seconds']:>8}"
              f" {r['hub_egress_bytes'] / 2**20:>13.2f} {r['egress_per_bundle']:>8} {r['egress_per_device_bytes'] / 1024:>13.1f}")
    goal = rows[0]["egress_per_bundle"] <= 1.2
    print(f"goal (coalesced egress <= 1.2x the bundle): {'met' if goal else 'NOT met'}")


if __name__ == "__main__":
    main()
