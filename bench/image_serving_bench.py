"""Web serving of image models: `edgefleet serve` against the naive server and LitServe, side by side (issue 15).

    python bench/image_serving_bench.py [--rounds 3] [--duration 8] [--concurrency 1,16,64]
                                        [--models squeezenet,selfie_segmentation] [--workers 1] [--threads 1]
                                        [--no-sandbox] [--json]

For each image model (tensor_bench.py's: SqueezeNet from the onnx wheel, mediapipe's selfie segmentation
``.tflite`` from the mediapipe wheel, face detection, cnn512), three servers on this machine, one model at a time:
(a) ``edgefleet serve`` of the signed bundle (``--workers`` worker processes, in the default sandbox unless
    ``--no-sandbox``), the image as ``.npy`` on ``/endpoints/NAME/score``, the answer as ``.npy``;
(b) the naive server, what one writes first: FastAPI + uvicorn, ``await request.body()``, ``np.frombuffer`` of the
    image's bytes into the input shape the server knows, onnxruntime / LiteRT inline, the output's raw bytes back;
(c) LitServe (``pip install -e '.[bench]'``), one worker, no batching: a LitAPI whose ``setup`` loads the model,
    ``decode_request`` takes the raw body (annotated ``Annotated[bytes, Body()]``: LitServe parses a
    ``fastapi.Request`` as JSON or a form, FastAPI hands a non-JSON ``bytes`` body over unchanged) and
    ``encode_response`` answers a ``fastapi.Response`` of the output's raw bytes.
The naive server and LitServe use their runtime's default threads, as a first try would.
All three get the same bytes: wrk (``--latency``, a Lua script whose body is the ``.npy`` file read at its top level,
carrying both servers' key headers) at each concurrency, the servers' order rotated every round; a run with any
non-2xx answer fails. Before loading, each server's answer is checked against the bare runtime's output.
Prints, per model and concurrency, the medians over rounds of req/s, p50 and p99 per server and the ratios
edgefleet/naive and edgefleet/LitServe, with the bare runtime's single-thread p50 (as the runners set it up) for scale.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from endpoint_bench import run_wrk  # noqa: E402
from tensor_bench import Model, bare_call, free_port, make_bundle, models  # noqa: E402

KEY = "bench-key-0123456789abcdef0123456789"
SERVERS = ("edgefleet", "naive", "litserve")
WRK_TIMEOUT_S = 30.0  # above any queueing delay here: wrk leaves a timed-out request out of its percentiles

# What the two other servers share: load the model, run it on an array, give the one output back.
RUNTIME = '''
import sys
import numpy as np

PATH, PORT, SHAPE, KEY = sys.argv[1], int(sys.argv[2]), tuple(int(d) for d in sys.argv[3].split(",")), sys.argv[4]
NBYTES = int(np.prod(SHAPE)) * 4


def load():
    """A function from the float32 input array to the first output array."""
    if PATH.endswith(".onnx"):
        import onnxruntime as ort

        session = ort.InferenceSession(PATH, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})[0]
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=PATH)
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0]["index"], interp.get_output_details()[0]["index"]

    def run(x):
        interp.set_tensor(inp, x)
        interp.invoke()
        return interp.get_tensor(out)

    return run


def image(body):
    """The image: the body's last bytes (an .npy ends with its C-order data), in the shape the server knows."""
    return np.frombuffer(body, dtype=np.float32, offset=len(body) - NBYTES).reshape(SHAPE)
'''

NAIVE = RUNTIME + '''
import uvicorn
from fastapi import FastAPI, HTTPException, Request, Response

model = load()
app = FastAPI()


@app.post("/predict")
async def predict(request: Request):
    if request.headers.get("authorization") != "Bearer " + KEY:
        raise HTTPException(401)
    body = await request.body()
    if len(body) < NBYTES:
        raise HTTPException(422, "the body is shorter than the image")
    return Response(model(image(body)).tobytes(), media_type="application/octet-stream")


uvicorn.run(app, host="127.0.0.1", port=PORT, log_level="warning", access_log=False)
'''

LITSERVE = RUNTIME + '''
from typing import Annotated

import litserve as ls
from fastapi import Body, HTTPException, Response


class ImageAPI(ls.LitAPI):
    def setup(self, device):
        self.model = load()

    # LitServe types the request by this annotation: fastapi.Request would be parsed as JSON (or a form), a body of
    # bytes reaches here unchanged (FastAPI hands non-JSON content types over as the raw body)
    def decode_request(self, request: Annotated[bytes, Body(media_type="application/x-npy")]):
        if len(request) < NBYTES:
            raise HTTPException(422, "the body is shorter than the image")
        return image(request)

    def predict(self, x):
        return self.model(x)

    def encode_response(self, output):
        return Response(output.tobytes(), media_type="application/octet-stream")


if __name__ == "__main__":
    # one inference worker, no batching (LitAPI's defaults); the key is LIT_SERVER_API_KEY, checked on X-API-Key
    server = ls.LitServer(ImageAPI(), accelerator="cpu", workers_per_device=1, timeout=60)
    server.run(host="127.0.0.1", port=PORT, log_level="warning", generate_client_file=False)
'''

LUA = '''
local f = assert(io.open("@FILE@", "rb"))
wrk.body = f:read("*a")
f:close()
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/x-npy"
wrk.headers["Accept"] = "application/x-npy"
wrk.headers["Authorization"] = "Bearer @KEY@"
wrk.headers["X-API-Key"] = "@KEY@"
'''


def need_litserve() -> None:
    try:
        import litserve  # noqa: F401
    except ImportError:
        sys.exit("LitServe is not installed: pip install -e '.[bench]'")


def headers() -> dict[str, str]:
    return {"Content-Type": "application/x-npy", "Accept": "application/x-npy", "Authorization": f"Bearer {KEY}",
            "X-API-Key": KEY}


def answer(server: str, content: bytes, like: np.ndarray) -> np.ndarray:
    """The output array in a server's answer: .npy from edgefleet, raw bytes of the expected dtype from the others."""
    if server == "edgefleet":
        return np.load(io.BytesIO(content))
    return np.frombuffer(content, dtype=like.dtype).reshape(like.shape)


def wait_up(server: str, url: str, body: bytes, expected: np.ndarray, proc: subprocess.Popen[bytes]) -> None:
    """Until the server answers 200; then its output must be the bare runtime's (threads may change the last bits)."""
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{server} exited with {proc.returncode} before it served")
        try:
            res = httpx.post(url, content=body, headers=headers(), timeout=30)
            if res.status_code == 200:
                break
            if res.status_code not in (404, 503):
                raise RuntimeError(f"{server} answered {res.status_code}: {res.text[:300]}")
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{server} did not come up at {url}")
        time.sleep(0.2)
    got = answer(server, res.content, expected)
    if got.shape != expected.shape or not np.allclose(got, expected, rtol=1e-3, atol=1e-4):
        raise RuntimeError(f"{server}'s answer is not the bare runtime's: shape {got.shape}, "
                           f"max diff {np.max(np.abs(got.astype(np.float64) - expected)):.3g}")


def bare_p50(m: Model, calls: int = 200) -> float:
    call = bare_call(m)
    call()
    took = []
    for _ in range(calls):
        t0 = time.perf_counter()
        call()
        took.append(time.perf_counter() - t0)
    return statistics.median(took) * 1000.0


def start(work: Path, m: Model, args: argparse.Namespace) -> tuple[dict[str, str], dict[str, subprocess.Popen[bytes]]]:
    """The three servers of one model: their URLs and processes."""
    bundle, root = make_bundle(work, m)
    name = m.name.replace("_", "-")
    shape = ",".join(str(d) for d in m.image.shape)
    model_file = str(bundle / "files" / f"model{m.path.suffix}")
    (work / "naive.py").write_text(NAIVE)
    (work / "lit.py").write_text(LITSERVE)
    ports = {s: free_port() for s in SERVERS}
    serve = [sys.executable, "-m", "edgefleet", "serve", str(bundle), "--root", str(root), "--host", "127.0.0.1",
             "--port", str(ports["edgefleet"]), "--workers", str(args.workers), "--threads", str(args.threads), "--key", KEY,
             *(["--no-sandbox"] if args.no_sandbox else [])]
    cmds = {"edgefleet": serve,
            "naive": [sys.executable, str(work / "naive.py"), model_file, str(ports["naive"]), shape, KEY],
            "litserve": [sys.executable, str(work / "lit.py"), model_file, str(ports["litserve"]), shape, KEY]}
    env = {**os.environ, "LIT_SERVER_API_KEY": KEY}
    procs = {}
    for s, cmd in cmds.items():  # stderr to a log (LitServe's workers print tracebacks as they are stopped)
        with open(work / f"{s}.log", "wb") as log:
            procs[s] = subprocess.Popen(cmd, cwd=work, env=env, start_new_session=True, stderr=log)
    urls = {"edgefleet": f"http://127.0.0.1:{ports['edgefleet']}/endpoints/{name}/score",
            "naive": f"http://127.0.0.1:{ports['naive']}/predict",
            "litserve": f"http://127.0.0.1:{ports['litserve']}/predict"}
    return urls, procs


def stop(procs: dict[str, subprocess.Popen[bytes]]) -> None:
    """Each server's whole process group: LitServe's and edgefleet's workers are children of the process started."""
    for proc in procs.values():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs.values():
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # what is left of the group (a LitServe worker outlives its parent)
        proc.wait()


def bench_model(work: Path, m: Model, args: argparse.Namespace, conns: list[int]) -> dict[str, object]:
    """Medians over rounds for one model: per concurrency, each server's req/s, p50, p99, and the ratios."""
    npy = work / f"{m.name}.npy"
    np.save(npy, m.image)
    body = npy.read_bytes()
    lua = work / f"{m.name}.lua"
    lua.write_text(LUA.replace("@FILE@", str(npy)).replace("@KEY@", KEY))
    expected = np.asarray(bare_call(m)()[0])  # type: ignore[index]
    urls, procs = start(work, m, args)
    runs: dict[tuple[str, int], list[dict[str, float]]] = {(s, c): [] for s in SERVERS for c in conns}
    bare: list[float] = []
    try:
        for s in SERVERS:
            try:
                wait_up(s, urls[s], body, expected, procs[s])
            except RuntimeError:
                print((work / f"{s}.log").read_text(errors="replace")[-3000:], file=sys.stderr)
                raise
            run_wrk(urls[s], lua, 16, 2, WRK_TIMEOUT_S)  # warm: connections, the runtime's first calls
        for r in range(args.rounds):
            bare.append(bare_p50(m))
            order = SERVERS[r % 3:] + SERVERS[:r % 3]  # rotate who goes first
            for c in conns:
                for s in order:
                    got = run_wrk(urls[s], lua, c, args.duration, WRK_TIMEOUT_S)
                    if got["non2xx"]:
                        raise RuntimeError(f"{m.name} {s} c={c}: {got['non2xx']:.0f} non-2xx answers")
                    runs[(s, c)].append(got)
                    print(f"{m.name} round {r + 1} c={c} {s}: {got}", file=sys.stderr)
    finally:
        stop(procs)
    rows = []
    for c in conns:
        med = {s: {k: statistics.median(x[k] for x in runs[(s, c)]) for k in ("rps", "p50_ms", "p99_ms")}
               for s in SERVERS}
        ef = med["edgefleet"]
        rows.append({"connections": c, **{s: {k: round(v, 2) for k, v in med[s].items()} for s in SERVERS},
                     **{f"vs_{b}": {"rps": round(ef["rps"] / med[b]["rps"], 2),
                                    "p99": round(ef["p99_ms"] / med[b]["p99_ms"], 2)} for b in ("naive", "litserve")},
                     "socket_errors": {s: sum(x["socket_errors"] for x in runs[(s, c)]) for s in SERVERS}})
    return {"model": m.name, "shape": list(m.image.shape), "bare_p50_ms": round(statistics.median(bare), 3),
            "results": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--concurrency", default="1,16,64")
    p.add_argument("--models", default="squeezenet,selfie_segmentation")
    p.add_argument("--workers", type=int, default=1, help="edgefleet serve's worker processes")
    p.add_argument("--threads", type=int, default=1, help="edgefleet serve's runtime threads per worker")
    p.add_argument("--no-sandbox", action="store_true", help="edgefleet serve --no-sandbox")
    p.add_argument("--mediapipe-wheel", type=Path, default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout's TERM still stops the servers (finally)
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (apt-get install wrk)")
    need_litserve()
    conns = [int(c) for c in args.concurrency.split(",")]
    wanted = args.models.split(",")
    work = Path(tempfile.mkdtemp(prefix="image-serving-bench-"))
    try:
        found = {m.name: m for m in models(work, args.mediapipe_wheel)}
        if missing := [w for w in wanted if w not in found]:
            sys.exit(f"models not available: {missing} (have {sorted(found)})")
        out = [bench_model(work, found[w], args, conns) for w in wanted]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps({"rounds": args.rounds, "duration_s": args.duration, "workers": args.workers, "threads": args.threads,
                          "sandbox": not args.no_sandbox, "models": out}, indent=2))
        return
    print(f"median of {args.rounds} round(s), {args.duration:g} s each; edgefleet serve: {args.workers} worker(s) x {args.threads} thread(s), "
          f"{'no sandbox' if args.no_sandbox else 'default sandbox'}; naive and LitServe: 1 process, runtime defaults")
    for mo in out:
        print(f"\n{mo['model']} {mo['shape']}: bare runtime p50 {mo['bare_p50_ms']:.2f} ms (1 thread)")
        print(f"{'conns':>5} | " + " | ".join(f"{s + ' req/s':>15} {'p50':>7} {'p99':>7}" for s in SERVERS) +
              " | x naive: req/s p99 | x LitServe: req/s p99")
        for row in mo["results"]:  # type: ignore[attr-defined]
            cells = " | ".join(f"{row[s]['rps']:>15.1f} {row[s]['p50_ms']:>7.1f} {row[s]['p99_ms']:>7.1f}"
                               for s in SERVERS)
            print(f"{row['connections']:>5} | {cells} | {row['vs_naive']['rps']:>10.2f} {row['vs_naive']['p99']:>4.2f}"
                  f" | {row['vs_litserve']['rps']:>13.2f} {row['vs_litserve']['p99']:>4.2f}"
                  + (f"  socket errors {row['socket_errors']}" if any(row["socket_errors"].values()) else ""))


if __name__ == "__main__":
    main()
