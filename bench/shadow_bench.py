"""The live path's latency on a device with and without a shadow candidate running, in the same run.

    python bench/shadow_bench.py [--rounds 3] [--requests 2000] [--sample-ppm 1000000] [--max-duty-ppm 500000]

One real agent (process isolation: the live version and the candidate each in their own worker
process) serves a logreg classifier on its local HTTP API; an application on the device sends
``--requests`` keep-alive requests per round. Rounds alternate: no shadow, then the same module
with a candidate (a different version) mirrored every live input (or ``--sample-ppm`` of them),
then no shadow again, and so on. Printed: the median over rounds of each phase's p50 and p99, their
ratios (goal: p50 within 10 %), and what the shadow compared and dropped.
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


async def run(hub: HubSide, work: Path, rounds: int, requests: int, sample_ppm: int,
              max_duty_ppm: int) -> dict[str, list[float]]:
    live, cand = hub.build("classifier", 1), hub.build("classifier", 2)
    plain = live.desired()
    shadowed = DesiredModule(name=plain.name, version=plain.version, bundle=plain.bundle, size=plain.size,
                             deployment="test", shadow=ShadowSpec(version=2, bundle=cand.digest, size=cand.manifest.size,
                                                                  sample_ppm=sample_ppm, max_duty_ppm=max_duty_ppm))
    device, port = new_device(), free_port()
    out: dict[str, list[float]] = {"off_p50": [], "off_p99": [], "on_p50": [], "on_p99": []}
    stats = {"compared": 0, "dropped": 0}
    revision = 0
    async with running_agent(hub, device, work / "dev", isolation="process", api_port=port,
                             telemetry_interval=3600.0) as agent:  # its telemetry would take the figures
        for r in range(rounds):
            for phase, module in (("off", plain), ("on", shadowed)):
                revision += 1
                hub.publish_desired(device, revision, [module])
                await until(lambda: hub.module_state(device, "classifier") == "running", 60, "live running")
                want = phase == "on"
                await until(lambda w=want: ("classifier" in agent.front.shadows) == w, 60, f"shadow {phase}")
                await asyncio.to_thread(latencies, port, 200)  # warm the path after the change
                times = await asyncio.to_thread(latencies, port, requests)
                out[f"{phase}_p50"].append(statistics.median(times))
                out[f"{phase}_p99"].append(pct(times, 99))
                if want:
                    await asyncio.sleep(0.2)  # let the candidate drain its queue before its figures are read
                    s = agent.front.shadows["classifier"]
                    point = s.take(time.time())
                    stats["compared"] += point.compared
                    stats["dropped"] += s.dropped_total
                print(f"round {r + 1} shadow {phase:>3}: p50 {out[f'{phase}_p50'][-1]:.3f} ms,"
                      f" p99 {out[f'{phase}_p99'][-1]:.3f} ms", flush=True)
    out["compared"], out["dropped"] = [stats["compared"]], [stats["dropped"]]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--sample-ppm", type=int, default=1_000_000)
    parser.add_argument("--max-duty-ppm", type=int, default=500_000, help="the candidate's busy share (protocol)")
    args = parser.parse_args()
    with LocalBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        hub = HubSide(broker.url, Path(tmp) / "hub")
        try:
            res = asyncio.run(run(hub, Path(tmp), args.rounds, args.requests, args.sample_ppm, args.max_duty_ppm))
        finally:
            hub.close()
    off50, on50 = statistics.median(res["off_p50"]), statistics.median(res["on_p50"])
    off99, on99 = statistics.median(res["off_p99"]), statistics.median(res["on_p99"])
    print(f"live path p50: without shadow {off50:.3f} ms, with shadow {on50:.3f} ms, ratio {on50 / off50:.3f}"
          f" (goal <= 1.10)")
    print(f"live path p99: without shadow {off99:.3f} ms, with shadow {on99:.3f} ms, ratio {on99 / off99:.3f}")
    print(f"shadow: {res['compared'][0]} predictions compared, {res['dropped'][0]} mirrored inputs dropped"
          f" (queue full); {args.rounds} rounds x {args.requests} requests, medians over rounds;"
          f" sample {args.sample_ppm / 1e6:g}, max duty {args.max_duty_ppm / 1e6:g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
