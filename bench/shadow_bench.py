"""The live path's latency on a device with and without a shadow candidate running, in the same run.

    python bench/shadow_bench.py [--blocks 40] [--block 250] [--sample-ppm 1000000] [--max-duty-ppm 500000]

One real agent (process isolation: the live version and the candidate each in their own worker
process) serves a logreg classifier on its local HTTP API, with a shadow candidate (another version)
installed from a signed desired state; an application on the device sends keep-alive requests in
``--blocks`` alternating blocks of ``--block`` requests: the candidate offered every live input (or
``--sample-ppm`` of them), then not, and so on, so the load of the rest of the machine falls on both
alike. Printed: p50 and p99 of all requests with and without, their ratios (goal: p50 within 10 %),
and what the shadow compared and dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgefleet.broker import LocalBroker, free_port  # noqa: E402
from protocol.messages import DesiredModule, ShadowSpec  # noqa: E402
from tests.hubside import HubSide, new_device, running_agent, until  # noqa: E402

X = [[0.1, 0.2, 0.3, 0.4]]


def latencies(port: int, requests: int) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port)
    body, headers = json.dumps({"inputs": {"x": X}}), {"Content-Type": "application/json"}
    out = []
    for _ in range(requests):
        t0 = time.perf_counter()
        conn.request("POST", "/v1/modules/classifier/predict", body, headers)
        resp = conn.getresponse()
        resp.read()
        out.append((time.perf_counter() - t0) * 1000.0)
        assert resp.status == 200, resp.status
    conn.close()
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


async def run(hub: HubSide, work: Path, blocks: int, block: int, sample_ppm: int,
              max_duty_ppm: int) -> dict[str, list[float]]:
    live, cand = hub.build("classifier", 1), hub.build("classifier", 2)
    plain = live.desired()
    shadowed = DesiredModule(name=plain.name, version=plain.version, bundle=plain.bundle, size=plain.size,
                             deployment="test", shadow=ShadowSpec(version=2, bundle=cand.digest, size=cand.manifest.size,
                                                                  sample_ppm=sample_ppm, max_duty_ppm=max_duty_ppm))
    device, port = new_device(), free_port()
    out: dict[str, list[float]] = {"off": [], "on": [], "compared": [0], "dropped": [0]}
    async with running_agent(hub, device, work / "dev", isolation="process", api_port=port,
                             telemetry_interval=3600.0) as agent:  # its telemetry would take the figures
        hub.publish_desired(device, 1, [shadowed])
        await until(lambda: hub.module_state(device, "classifier") == "running", 60, "live running")
        await until(lambda: "classifier" in agent.front.shadows, 60, "shadow running")
        shadow = agent.front.shadows["classifier"]
        await asyncio.to_thread(latencies, port, 300)  # warm both paths
        for k in range(blocks):
            # Alternate short blocks with the candidate offered the inputs or not (its worker stays up, idle when
            # not offered): load from the rest of the machine falls on both alike.
            on = k % 2 == 1
            if on:
                agent.front.shadows["classifier"] = shadow
            else:
                agent.front.shadows.pop("classifier", None)
            out["on" if on else "off"] += await asyncio.to_thread(latencies, port, block)
        agent.front.shadows["classifier"] = shadow
        await asyncio.sleep(0.5)  # the candidate drains its queue
        point = shadow.take(time.time())
        out["compared"], out["dropped"] = [point.compared], [shadow.dropped_total]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=40, help="alternating blocks, half with the shadow on")
    parser.add_argument("--block", type=int, default=250, help="requests per block")
    parser.add_argument("--sample-ppm", type=int, default=1_000_000)
    parser.add_argument("--max-duty-ppm", type=int, default=500_000, help="the candidate's busy share (protocol)")
    args = parser.parse_args()
    with LocalBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        hub = HubSide(broker.url, Path(tmp) / "hub")
        try:
            res = asyncio.run(run(hub, Path(tmp), args.blocks, args.block, args.sample_ppm, args.max_duty_ppm))
        finally:
            hub.close()
    off, on = res["off"], res["on"]
    off50, on50, off99, on99 = statistics.median(off), statistics.median(on), pct(off, 99), pct(on, 99)
    print(f"live path p50: without shadow {off50:.3f} ms, with shadow {on50:.3f} ms, ratio {on50 / off50:.3f}"
          f" (goal <= 1.10)")
    print(f"live path p99: without shadow {off99:.3f} ms, with shadow {on99:.3f} ms, ratio {on99 / off99:.3f}")
    print(f"shadow: {res['compared'][0]} predictions compared, {res['dropped'][0]} mirrored inputs dropped"
          f" (queue full); {len(off)} + {len(on)} requests in {args.blocks} alternating blocks;"
          f" sample {args.sample_ppm / 1e6:g}, max duty {args.max_duty_ppm / 1e6:g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
