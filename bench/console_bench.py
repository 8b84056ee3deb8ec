"""The console's device list at 10,000 devices: its first page (``GET /devices?limit=50``) against the full-list
fetch the console made before (``GET /devices``: every device, every 2 s), measured in the same run.

The hub runs in this process on a real broker; the devices are stored through the hub's store (hub/seed.py),
each given a signed desired state by a deployment to every device, and a share of them report over MQTT
(running, failed), so rows carry the JSON a real fleet's do. Times are wall clock at the client, response
body read but not decoded. Goal (issue 14): the first page in under 1 s.
Usage: ``python bench/console_bench.py [--devices 10000] [--runs 15]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

from edgefleet.broker import LocalBroker  # noqa: E402
from hub import HubConfig, HubServer  # noqa: E402
from hub.fleet.device_query import DeviceFilter  # noqa: E402
from hub.seed import insert, play  # noqa: E402
from hub.testing import MqttProbe, wait_until  # noqa: E402
from modules.examples import write_logreg_onnx  # noqa: E402

TOKEN = "bench-console-token-0123456789abcdef"


def timed(api: httpx.Client, path: str, params: dict, runs: int) -> tuple[float, int, dict | list]:
    """Median seconds of ``runs`` GETs, the body size, and the last body."""
    times, size, body = [], 0, None
    for _ in range(runs):
        t = time.perf_counter()
        r = api.get(path, params=params)
        r.raise_for_status()
        times.append(time.perf_counter() - t)
        size, body = len(r.content), r
    return statistics.median(times), size, body.json()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--reporting", type=int, default=500, help="devices that report over MQTT (running or failed)")
    args = ap.parse_args()
    os.environ.pop("EDGEFLEET_ADMIN_TOKEN", None)
    with tempfile.TemporaryDirectory(prefix="edgefleet-console-bench-") as tmp, LocalBroker(kind="mosquitto") as broker:
        work = Path(tmp)
        server = HubServer(HubConfig(work / "hub", broker.url, admin_token=TOKEN, mqtt_client_id="bench-console")).start()
        assert server.wait_mqtt(10)
        api = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=300)
        probe = MqttProbe(broker.url)
        try:
            t = time.perf_counter()
            ids = insert(server.hub.db, args.devices, prefix="bench")
            model = write_logreg_onnx(work / "model.onnx", seed=1)
            api.post("/api/v1/models", data={"name": "scorer-model"},
                     files=[("files", ("model.onnx", model.read_bytes()))]).raise_for_status()
            module = api.post("/api/v1/modules", json={"name": "scorer", "models": ["scorer-model:1"]}).json()
            api.post("/api/v1/deployments", json={"name": "edge", "module": "scorer:1",
                                                                 "gates": {"max_install_failure_rate": 1}}).raise_for_status()
            reporting = ids[: args.reporting]
            play(probe, reporting[10:], module=("scorer", 1, module["digest"]), state="running")
            play(probe, reporting[:10], module=("scorer", 1, module["digest"]), state="failed", error="disk full")
            wait_until(lambda: api.get("/api/v1/devices", params={"status": "running", "limit": 1}).json()["total"]
                       == len(reporting) - 10, 120, 0.5, "the reports stored")
            print(f"seeded {args.devices} devices (desired states signed, {len(reporting)} reporting)"
                  f" in {time.perf_counter() - t:.1f} s")

            full, full_size, everything = timed(api, "/api/v1/devices", {}, max(3, args.runs // 3))
            assert len(everything) == args.devices
            first, first_size, page = timed(api, "/api/v1/devices", {"limit": 50}, args.runs)
            assert page["total"] == args.devices and len(page["items"]) == 50
            rows = [("full list (before)", full, full_size), ("first page, limit 50", first, first_size)]
            for name, params in [("page at device 5000", {"limit": 50, "cursor": ids[len(ids) // 2]}),
                                 ("status=failed", {"limit": 50, "status": "failed"}),
                                 ("label site=berlin", {"limit": 50, "label": "site=berlin"}),
                                 ("search q=bench-0999", {"limit": 50, "q": "bench-0999"}),
                                 ("fleet summary", "/api/v1/fleet/summary"),
                                 ("rollout status, all", "/api/v1/rollouts/edge"),
                                 ("rollout status, page", ("/api/v1/rollouts/edge", {"limit": 50}))]:
                path, params = ((params, {}) if isinstance(params, str) else params if isinstance(params, tuple)
                                else ("/api/v1/devices", params))
                med, size, _ = timed(api, path, params, args.runs)
                rows.append((name, med, size))
            rows.append(("healthz (HTTP floor)", *timed(api, "/healthz", {}, args.runs)[:2]))
            f = DeviceFilter()
            t0 = time.perf_counter()
            for _ in range(args.runs):
                server.hub.fleet.page(f, 50)
            rows.append(("page in-process", (time.perf_counter() - t0) / args.runs, 0))
            t0 = time.perf_counter()
            for _ in range(3):  # the summary as it was computed before: from every device's decoded view
                views = server.hub.fleet.devices()
                sum(d["online"] for d in views), sum(d["inferences"] for d in views)
            rows.append(("summary before, in-proc", (time.perf_counter() - t0) / 3, 0))
            t0 = time.perf_counter()
            for _ in range(args.runs):
                server.hub.fleet.summary()
            rows.append(("summary now, in-process", (time.perf_counter() - t0) / args.runs, 0))
            t0 = time.perf_counter()
            for _ in range(args.runs):
                server.hub.rollouts.status("edge", None, {"limit": 50})
            rows.append(("rollout page in-process", (time.perf_counter() - t0) / args.runs, 0))
            server.hub.rollouts.stop_loop()  # without the controller's ticks (it re-reads the 10,000 states each)
            rows.append(("rollout page, no ticks", *timed(api, "/api/v1/rollouts/edge", {"limit": 50}, args.runs)[:2]))
        finally:
            probe.close()
            api.close()
            server.stop()
    print(f"{'request':<24} {'median ms':>10} {'bytes':>10}")
    for name, med, size in rows:
        print(f"{name:<24} {med * 1000:>10.1f} {size:>10}")
    print(f"full list / first page: {full / first:.1f}x the time, {full_size / first_size:.0f}x the bytes")
    print(f"goal (first page < 1 s at {args.devices} devices): {'met' if first < 1 else 'NOT met'}")


if __name__ == "__main__":
    main()
