"""Endpoint throughput and latency against a naive single-process FastAPI + onnxruntime endpoint, same model, same run.

    python bench/endpoint_bench.py [--rounds 3] [--duration 8] [--workers 1] [--json]
    python bench/endpoint_bench.py --sandbox [--starts 7] ...   # the sandbox's cost instead

Builds a signed bundle of the logistic-regression example (modules.examples), starts
``edgefleet serve`` on it (the code path hub endpoints use) and the naive server written
below, then drives both with ``wrk --latency`` (a Lua script sets the POST body and key)
at 1, 16 and 64 concurrent connections, alternating the two servers each round.
Prints the median of the rounds for requests/s, p50 and p99, and the ratios.

With ``--sandbox`` the baseline is ``edgefleet serve --no-sandbox`` and the candidate the same
server with its workers in the sandbox (modules/sandbox.py); it also times worker starts (a pool
of one worker started and stopped ``--starts`` times per mode, alternating: spawn, import, load,
health check, plus staging the bundle in the sandbox) and the p50 of one request's hop from a pool
to its worker and back (sequential, modes interleaved every 100 requests), and prints their medians.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KEY = "bench-key"
BODY = '{"inputs":{"x":[[0.5,-1.2,0.3,2.0]]}}'

# The baseline: what one would write first. async def, so onnxruntime runs on the event loop, not a thread pool
# (a sync handler measured ~2x slower here); pydantic validates the body; the key is checked.
NAIVE = '''
import sys
import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, Header, HTTPException
from pydantic import BaseModel

session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
app = FastAPI()


class Body(BaseModel):
    inputs: dict[str, list]


@app.post("/score")
async def score(body: Body, authorization: str = Header("")):
    if authorization != "Bearer @KEY@":
        raise HTTPException(401)
    x = np.asarray(body.inputs["x"], dtype=np.float32)
    return {"outputs": {"probability": session.run(None, {"x": x})[0].tolist()}}


uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning", access_log=False)
'''.replace("@KEY@", KEY)

LUA = '''
wrk.method = "POST"
wrk.body = '@BODY@'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer @KEY@"
'''.replace("@BODY@", BODY).replace("@KEY@", KEY)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_bundle(work: Path) -> tuple[Path, Path]:
    """A signed bundle and the root that trusts it, as `edgefleet bundle pull` would leave them."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from modules.bundle import build_manifest, read_blocks, sign_release, write_bundle_dir
    from modules.examples import write_logreg_onnx, write_sample
    from protocol.encoding import canonical_json
    from protocol.manifest import TensorSpec
    from protocol.signing import make_root

    src = work / "src"
    src.mkdir()
    keys = {r: Ed25519PrivateKey.generate() for r in ("root", "release", "director")}
    root = make_root({r: [k] for r, k in keys.items()}, [keys["root"]])
    files = {"model.onnx": write_logreg_onnx(src / "model.onnx"), "sample.json": write_sample(src / "sample.json")}
    manifest = build_manifest("logreg", 1, "onnx", files, model="model.onnx", sample="sample.json",
                              inputs=[TensorSpec(name="x", dtype="float32", shape=[None, 4])],
                              outputs=[TensorSpec(name="probability", dtype="float32", shape=[None, 1])])
    envelope = sign_release(manifest, [keys["release"]], int(time.time()) + 3600)
    bundle = work / "bundle"
    write_bundle_dir(bundle, envelope, lambda e: read_blocks(files[e.path]))
    (work / "root.json").write_bytes(canonical_json(root))
    return bundle, work / "root.json"


def wait_up(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.post(url, content=BODY, headers={"Authorization": f"Bearer {KEY}",
                                                      "Content-Type": "application/json"}).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def to_ms(value: str) -> float:
    num, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", value).groups()  # type: ignore[union-attr]
    return float(num) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def run_wrk(url: str, lua: Path, conns: int, duration: float, timeout_s: float = 2.0) -> dict[str, float]:
    """wrk's figures; a request slower than ``timeout_s`` counts as a socket error, not in the latencies."""
    out = subprocess.run(["wrk", f"-t{min(conns, 2)}", f"-c{conns}", f"-d{duration:g}s", f"--timeout={timeout_s:g}s",
                          "--latency", "-s", str(lua), url], capture_output=True, text=True, check=True).stdout
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)\s*$", out, re.M))  # wrk pads "1.38s "
    if "50" not in lat or "99" not in lat:
        raise RuntimeError(f"no latency distribution in wrk's output:\n{out}")
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: .*", out)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
            "p50_ms": to_ms(lat["50"]), "p99_ms": to_ms(lat["99"]),
            "non2xx": float(non2xx.group(1)) if non2xx else 0.0, "socket_errors": 1.0 if errors else 0.0}


def pool_costs(bundle: Path, starts: int, blocks: int = 40, per_block: int = 100) -> dict[str, dict[str, float]]:
    """Per mode, in this process (no HTTP, no wrk): the median seconds from spawning a one-worker pool to its
    ready worker (alternating modes), and the median ms of one request through the pool to its worker and
    back, sequentially, switching mode every ``per_block`` requests so both see the same machine load."""
    import asyncio

    from hub.endpoints.pool import Pool, Settings
    from modules.sandbox import Sandbox, detect

    modes = {"no-sandbox": Sandbox(), "sandbox": detect("on")}
    print(f"sandbox: {modes['sandbox'].describe()}", file=sys.stderr)
    body = BODY.encode()

    async def start(box: Sandbox) -> tuple[Pool, float]:
        t0 = time.perf_counter()
        pool = Pool("bench", "logreg:1", bundle, Settings(replicas=1), box)
        await pool.start()
        return pool, time.perf_counter() - t0

    async def run() -> dict[str, dict[str, float]]:
        took: dict[str, list[float]] = {m: [] for m in modes}
        for i in range(starts):
            for mode in (list(modes) if i % 2 == 0 else list(reversed(modes))):
                pool, t = await start(modes[mode])
                took[mode].append(t)
                await pool.drain_and_stop(5)
        pools = {m: (await start(box))[0] for m, box in modes.items()}
        lat: dict[str, list[float]] = {m: [] for m in modes}
        for b in range(blocks):
            for mode in (list(modes) if b % 2 == 0 else list(reversed(modes))):
                for i in range(per_block):
                    t0 = time.perf_counter()
                    # an inline JSON body: v1, no OIP header (-1), not in the arena (-1, 0); see hub/endpoints/wire.py Item
                    item = (f"r{i}", "application/json", body, "", False, "v1", -1, -1, 0)
                    status = (await pools[mode].submit(item))[0]
                    lat[mode].append((time.perf_counter() - t0) * 1000)
                    assert status == 200
        for pool in pools.values():
            await pool.drain_and_stop(5)
        return {m: {"start_s": statistics.median(took[m]), "hop_p50_ms": statistics.median(lat[m])} for m in modes}

    return asyncio.run(run())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--workers", type=int, default=1, help="endpoint worker processes")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--max-wait-ms", type=float, default=2.0)
    p.add_argument("--concurrency", default="1,16,64")
    p.add_argument("--json", action="store_true")
    p.add_argument("--sandbox", action="store_true", help="compare the endpoint with and without the sandbox")
    p.add_argument("--starts", type=int, default=7, help="--sandbox: worker starts timed per mode")
    args = p.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (apt-get install wrk)")
    work = Path(tempfile.mkdtemp(prefix="endpoint-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        bundle, root = make_bundle(work)
        lua = work / "post.lua"
        lua.write_text(LUA)
        base_port, ep_port = free_port(), free_port()
        serve = [sys.executable, "-m", "edgefleet", "serve", str(bundle), "--root", str(root), "--host", "127.0.0.1",
                 "--workers", str(args.workers), "--max-batch", str(args.max_batch), "--max-wait-ms",
                 str(args.max_wait_ms), "--key", KEY]
        base, cand = ("no-sandbox", "sandbox") if args.sandbox else ("naive", "endpoint")
        costs = pool_costs(bundle, args.starts) if args.sandbox else {}
        if args.sandbox:
            procs.append(subprocess.Popen([*serve, "--port", str(base_port), "--no-sandbox"], cwd=ROOT,
                                          stderr=subprocess.DEVNULL))
            base_url = f"http://127.0.0.1:{base_port}/endpoints/logreg/score"
        else:
            (work / "naive.py").write_text(NAIVE)
            procs.append(subprocess.Popen([sys.executable, str(work / "naive.py"), str(bundle / "files" / "model.onnx"),
                                           str(base_port)], cwd=ROOT))
            base_url = f"http://127.0.0.1:{base_port}/score"
        procs.append(subprocess.Popen([*serve, "--port", str(ep_port)], cwd=ROOT, stderr=subprocess.DEVNULL))
        urls = {base: base_url, cand: f"http://127.0.0.1:{ep_port}/endpoints/logreg/score"}
        for url in urls.values():
            wait_up(url)
        conns = [int(c) for c in args.concurrency.split(",")]
        runs: dict[tuple[str, int], list[dict[str, float]]] = {(s, c): [] for s in urls for c in conns}
        for r in range(args.rounds):
            for c in conns:
                order = list(urls) if r % 2 == 0 else list(reversed(urls))  # alternate who goes first
                for server in order:
                    runs[(server, c)].append(run_wrk(urls[server], lua, c, args.duration))
                    print(f"round {r + 1} c={c} {server}: {runs[(server, c)][-1]}", file=sys.stderr)
        summary = []
        for c in conns:
            med = {s: {k: statistics.median(x[k] for x in runs[(s, c)]) for k in ("rps", "p50_ms", "p99_ms")}
                   for s in urls}
            bad = {s: sum(x["non2xx"] + x["socket_errors"] for x in runs[(s, c)]) for s in urls}
            summary.append({"connections": c, **{f"{s}_{k}": round(v, 2) for s in urls for k, v in med[s].items()},
                            "throughput_ratio": round(med[cand]["rps"] / med[base]["rps"], 2),
                            "p50_ratio": round(med[cand]["p50_ms"] / med[base]["p50_ms"], 2),
                            "p99_ratio": round(med[cand]["p99_ms"] / med[base]["p99_ms"], 2),
                            "failed": bad})
        if args.json:
            print(json.dumps({"rounds": args.rounds, "duration_s": args.duration, "workers": args.workers,
                              "pool": costs, "results": summary}, indent=2))
            return
        print(f"median of {args.rounds} round(s), {args.duration:g} s each; endpoint: {args.workers} worker(s), "
              f"max batch {args.max_batch}, max wait {args.max_wait_ms:g} ms")
        for key, what, scale in (("start_s", f"worker start ms (median of {args.starts})", 1000),
                                 ("hop_p50_ms", "pool->worker->pool ms, p50, modes interleaved (4,000 each)", 1)):
            if costs:
                print(f"{what}: " + ", ".join(f"{m} {c[key] * scale:.3f}" for m, c in costs.items()) +
                      f"; ratio {costs['sandbox'][key] / costs['no-sandbox'][key]:.2f}")
        print(f"{'conns':>5} | {base + ' req/s':>16} {'p50 ms':>7} {'p99 ms':>7} | {cand + ' req/s':>16} {'p50 ms':>7} "
              f"{'p99 ms':>7} | {'x req/s':>7} {'p50 ratio':>9} {'p99 ratio':>9}")
        for s in summary:
            print(f"{s['connections']:>5} | {s[base + '_rps']:>16.0f} {s[base + '_p50_ms']:>7.2f} "
                  f"{s[base + '_p99_ms']:>7.2f} | {s[cand + '_rps']:>16.0f} {s[cand + '_p50_ms']:>7.2f} "
                  f"{s[cand + '_p99_ms']:>7.2f} | {s['throughput_ratio']:>7.2f} {s['p50_ratio']:>9.2f} "
                  f"{s['p99_ratio']:>9.2f}")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
