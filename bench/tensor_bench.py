"""Camera-sized tensors over the binary path, each against the bare runtime measured in the same run.

    python bench/tensor_bench.py [--rounds 3] [--requests 300] [--mediapipe-wheel FILE] [--shm-copy]
                                 [--models NAME ...]

For each image model: the bare runtime's p50 (onnxruntime ``session.run`` / LiteRT ``invoke``, set up as
the runners set them up), then one client with a keep-alive socket sending pre-built OIP v2 binary
requests (JSON header + the image's raw bytes, outputs as raw bytes) to
(d) the device's local API (a real agent, ``python -m agent``, module in its worker process),
(s) the device's local API with the image in a shared memory region (OIP v2 system shared memory: the
    request is the JSON header only, the outputs written into a second region; the app's frame is in the region,
    written there by its capture or decoder as the bare call's frame is in its array; ``--shm-copy``: the client
    copies the frame in before each request, as an app holding it elsewhere must),
(d') the module's direct socket (``DATA/run/<module>.sock``, the agent's loop off the path),
(s') the direct socket with shared memory: the regions registered on the agent's Unix socket (``run/api.sock``)
    as this process's uid, the requests (JSON header only) on ``run/<module>.sock``,
(w) a web endpoint (``edgefleet serve``, one worker, no sandbox),
and the same image as JSON to the device for scale. Goals (issue 15): device <= 1.1x bare (<= +0.5 ms
for models under 2 ms), web binary <= 1.2x bare at 1 client.

Models: mediapipe's face detection (128x128x3), selfie segmentation (256x256x3) and hand landmarks (the
full model, 224x224x3) ``.tflite`` from the mediapipe 0.10.14 wheel (downloaded once with ``pip download --no-deps`` into ~/.cache/edgefleet, or
given), SqueezeNet 1.0 (ONNX model zoo, 1x3x224x224, shipped in the onnx wheel), and a small ONNX CNN on a
512x512x3 float image built here (the stress case: a 3 MB tensor for 2-3 ms of compute). Without the
wheel, mediapipe's hand_recrop (256x256x3, shipped in tests/data) stands in.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.apitokens import TOKENS_FILE, load_tokens  # noqa: E402
from edgefleet.broker import LocalBroker, free_port  # noqa: E402
from modules.examples import write_cnn_onnx  # noqa: E402
from modules.runners import load_model_file  # noqa: E402
from protocol.manifest import TensorSpec  # noqa: E402
from tests.hubside import HubSide, new_device  # noqa: E402

CACHE = Path(os.environ.get("EDGEFLEET_CACHE", Path.home() / ".cache" / "edgefleet"))
WHEEL = "mediapipe==0.10.14"
MEDIAPIPE = {"face_detection": "mediapipe/modules/face_detection/face_detection_short_range.tflite",
             "selfie_segmentation": "mediapipe/modules/selfie_segmentation/selfie_segmentation.tflite",
             "hand_landmark": "mediapipe/modules/hand_landmark/hand_landmark_full.tflite"}
KEY = "bench-key-0123456789abcdef0123456789"


@dataclass
class Model:
    name: str
    path: Path
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    image: np.ndarray


def models(work: Path, wheel: Path | None, only: list[str] | None = None) -> list[Model]:
    paths: dict[str, Path] = {}
    wheel = wheel or fetch_wheel()
    if wheel is not None:
        with zipfile.ZipFile(wheel) as z:
            for name, member in MEDIAPIPE.items():
                paths[name] = work / f"{name}.tflite"
                paths[name].write_bytes(z.read(member))
    else:
        print("mediapipe wheel not available: hand_recrop from tests/data stands in", file=sys.stderr)
        paths["hand_recrop"] = ROOT / "tests" / "data" / "hand_recrop.tflite"
    paths["squeezenet"] = squeezenet()
    paths["cnn512"] = write_cnn_onnx(work / "cnn512.onnx", size=512, width=8)
    out = []
    for name, path in paths.items():
        if only and name not in only:
            continue
        runner = load_model_file(path, path.suffix[1:])
        spec = runner.inputs[0]
        shape = [1 if d is None else d for d in spec.shape]
        image = np.random.default_rng(0).random(shape, dtype=np.float32).astype(spec.dtype)
        inputs = [TensorSpec(name=spec.name, dtype=spec.dtype, shape=shape)]
        out.append(Model(name, path, inputs, runner.outputs, image))
    return out


def squeezenet() -> Path:
    """SqueezeNet 1.0 (ONNX model zoo) as the onnx wheel ships it for its backend tests: the real graph, its
    weights made by ConstantOfShape nodes (folded once at load), so the compute per image is the real one."""
    import onnx

    return Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / "light_squeezenet.onnx"


def fetch_wheel() -> Path | None:
    dest = CACHE / "mediapipe-wheel"
    found = sorted(dest.glob("mediapipe-0.10.14-*.whl"))
    if found:
        return found[0]
    dest.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d", str(dest)],
                       check=True, capture_output=True, timeout=600)
    except (subprocess.SubprocessError, OSError) as exc:
        print(f"could not download {WHEEL}: {exc}", file=sys.stderr)
        return None
    found = sorted(dest.glob("mediapipe-0.10.14-*.whl"))
    return found[0] if found else None


# --- the bare runtime ----------------------------------------------------------------------------

def bare_call(model: Model) -> Callable[[], object]:
    """One inference straight on the runtime, set up as the runner sets it up."""
    if model.path.suffix == ".onnx":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
        session = ort.InferenceSession(str(model.path), opts, providers=["CPUExecutionProvider"])
        feed = {model.inputs[0].name: model.image}
        return lambda: session.run(None, feed)
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(model.path))
    interp.allocate_tensors()
    (inp,), outs = interp.get_input_details(), interp.get_output_details()

    def call() -> object:
        interp.set_tensor(inp["index"], model.image)
        interp.invoke()
        return [interp.get_tensor(o["index"]) for o in outs]  # a copy already, as the runner takes it

    return call


# --- one client on a keep-alive socket -----------------------------------------------------------

def oip_request(path: str, model: Model, headers: str = "") -> bytes:
    head = json.dumps({"inputs": [{"name": model.inputs[0].name, "shape": list(model.image.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": model.image.nbytes}}],
                       "parameters": {"binary_data_output": True}}).encode()
    body = head + model.image.tobytes()
    return (f"POST {path} HTTP/1.1\r\nHost: bench\r\n{headers}Inference-Header-Content-Length: {len(head)}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


class ShmRegions:
    """An app's two POSIX shared memory objects (input, outputs) under /dev/shm, mapped here."""

    def __init__(self, model: Model, outputs: list[np.ndarray]) -> None:
        import mmap

        tag = f"ef_bench_{os.getpid()}_{model.name}"
        self.keys, self.maps = [f"/{tag}_in", f"/{tag}_out"], []
        self.out_sizes = [o.nbytes for o in outputs]
        for key, size in zip(self.keys, (model.image.nbytes, sum(self.out_sizes)), strict=True):
            fd = os.open(f"/dev/shm{key}", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            os.ftruncate(fd, size)
            self.maps.append(mmap.mmap(fd, size))
            os.close(fd)
        self.image = np.frombuffer(self.maps[0], dtype=model.image.dtype).reshape(model.image.shape)
        self.names = [f"{model.name}_in", f"{model.name}_out"]  # one app registers the regions of every model

    def register(self, connect: Callable[[], socket.socket], auth: str) -> None:
        """Register both regions for the app ``connect`` and ``auth`` make: a token's on TCP, this uid's on api.sock."""
        for region, key, mm in zip(self.names, self.keys, self.maps, strict=True):
            body = json.dumps({"key": key, "offset": 0, "byte_size": len(mm)}).encode()
            sock = connect()
            sock.sendall((f"POST /v2/systemsharedmemory/region/{region}/register HTTP/1.1\r\nHost: b\r\n{auth}"
                          f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body)
            answer = sock.recv(65536)
            sock.close()
            if not answer.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(answer.decode(errors="replace"))

    def request(self, path: str, model: Model, names: list[str], headers: str) -> bytes:
        offsets = np.cumsum([0, *self.out_sizes])
        body = json.dumps({"inputs": [{"name": model.inputs[0].name, "shape": list(model.image.shape), "datatype": "FP32",
                                       "parameters": {"shared_memory_region": self.names[0],
                                                      "shared_memory_byte_size": model.image.nbytes}}],
                           "outputs": [{"name": n, "parameters": {"shared_memory_region": self.names[1],
                                                                 "shared_memory_byte_size": int(size),
                                                                 "shared_memory_offset": int(off)}}
                                       for n, size, off in zip(names, self.out_sizes, offsets, strict=False)]}).encode()
        return (f"POST {path} HTTP/1.1\r\nHost: bench\r\n{headers}Content-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    def close(self) -> None:
        self.image = None  # type: ignore[assignment]
        for key, mm in zip(self.keys, self.maps, strict=True):
            mm.close()
            os.unlink(f"/dev/shm{key}")


class ShmClient:
    """A client whose frame is in its region: written there by the app's capture or decoder, as the bare call's
    frame is in its array (an app that copies a frame it holds elsewhere pays one memcpy more: ``--shm-copy``)."""

    def __init__(self, client: Client, regions: ShmRegions, image: np.ndarray, copy: bool) -> None:
        self.client, self.regions, self.source, self.copy = client, regions, image, copy
        np.copyto(self.regions.image, self.source)

    def __call__(self) -> bytes:
        if self.copy:
            np.copyto(self.regions.image, self.source)
        return self.client()

    def close(self) -> None:
        self.client.close()


def json_request(path: str, model: Model, headers: str = "") -> bytes:
    body = json.dumps({"inputs": {model.inputs[0].name: model.image.tolist()}}).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: bench\r\n{headers}Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


class Client:
    """One keep-alive connection sending a pre-built request and reading the answer by its Content-Length."""

    def __init__(self, connect: Callable[[], socket.socket], request: bytes) -> None:
        self.sock, self.request = connect(), request
        if self.sock.family != socket.AF_UNIX:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def __call__(self) -> bytes:
        self.sock.sendall(self.request)
        buf = self.sock.recv(1 << 20)
        while (end := buf.find(b"\r\n\r\n")) < 0 or len(buf) < end + 4 + content_length(buf[:end]):
            buf += self.sock.recv(1 << 20)
        if not buf.startswith(b"HTTP/1.1 200 "):
            raise RuntimeError(buf[:300].decode(errors="replace"))
        return buf

    def close(self) -> None:
        self.sock.close()


def paired(bare: Callable[[], object], client: Client | ShmClient, requests: int) -> tuple[float, float]:
    """p50 of the bare call and of the request, taken in turns: both see the same load on a busy machine."""
    client()  # warm: the connection, the server's buffers
    a, b = [], []
    try:
        for _ in range(requests):
            t0 = time.perf_counter()
            bare()
            t1 = time.perf_counter()
            client()
            t2 = time.perf_counter()
            a.append(t1 - t0)
            b.append(t2 - t1)
    finally:
        client.close()
    return statistics.median(a) * 1000.0, statistics.median(b) * 1000.0


def content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def unix(path: str) -> Callable[[], socket.socket]:
    def connect() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        return sock

    return connect


# --- the device and the web ----------------------------------------------------------------------

def bench_device(hub: HubSide, work: Path, ms: list[Model], requests: int, rounds: int,
                 shm_copy: bool = False) -> dict[str, dict[str, float]]:
    """p50s per model: "device", "shm", "direct", "shm_direct", "device_json" and each one's paired "bare_..." (medians over rounds)."""
    device, port = new_device(), free_port()
    bundles = [hub.build(m.name.replace("_", "-"), 1, model_file=(m.path, m.inputs, m.outputs)) for m in ms]
    runs: dict[str, dict[str, list[float]]] = {m.name: {} for m in ms}
    token = ""
    shms: list[ShmRegions] = []

    def measure() -> None:
        for m, b in zip(ms, bundles, strict=True):
            name = b.manifest.name
            bare = bare_call(m)
            tcp = lambda: socket.create_connection(("127.0.0.1", port))  # noqa: E731
            sock = unix(str(work / "device" / "run" / f"{name}.sock"))
            auth = f"Authorization: Bearer {token}\r\n"  # the TCP API asks every request for an app's token
            oip, oip_tcp = oip_request(f"/v2/models/{name}/infer", m), oip_request(f"/v2/models/{name}/infer", m, auth)
            r = runs[m.name]
            shm = ShmRegions(m, [np.asarray(o) for o in bare()])  # type: ignore[attr-defined]
            shms.append(shm)
            names = [o.name for o in m.outputs]
            shm.register(tcp, auth)  # the token's app, on TCP
            shm.register(unix(str(work / "device" / "run" / "api.sock")), "")  # this uid, for the direct socket
            shm_tcp = shm.request(f"/v2/models/{name}/infer", m, names, auth)
            shm_direct = shm.request(f"/v2/models/{name}/infer", m, names, "")
            for _ in range(rounds):
                for key, connect, request in (("shm", tcp, shm_tcp), ("shm_direct", sock, shm_direct)):
                    base, got = paired(bare, ShmClient(Client(connect, request), shm, m.image, shm_copy),
                                       requests)
                    r.setdefault(key, []).append(got)
                    r.setdefault(f"bare_{key}", []).append(base)
                for key, connect, request, n in (("device", tcp, oip_tcp, requests), ("direct", sock, oip, requests),
                                                 ("device_json", tcp,
                                                  json_request(f"/v1/modules/{name}/predict", m, auth),
                                                  max(5, requests // 20))):
                    base, got = paired(bare, Client(connect, request), n)
                    r.setdefault(key, []).append(got)
                    r.setdefault(f"bare_{key}", []).append(base)

    # the agent in a process of its own (as on a device): the client threads here must not share its GIL
    hub.identity(device, work / "device")
    proc = subprocess.Popen([sys.executable, "-m", "agent", "--data", str(work / "device"), "--api-port", str(port),
                             "--log-level", "WARNING"], cwd=ROOT)
    try:
        hub.publish_desired(device, 1, [b.desired() for b in bundles])
        deadline = time.monotonic() + 180
        while not (all(hub.module_state(device, b.manifest.name) == "running" for b in bundles)
                   and all((work / "device" / "run" / f"{b.manifest.name}.sock").exists() for b in bundles)):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the modules did not start on the device")
            time.sleep(0.1)
        token = next(iter(load_tokens(work / "device" / TOKENS_FILE)))
        measure()
    finally:
        proc.terminate()
        proc.wait(30)
        for shm in shms:
            shm.close()
    return {name: {k: statistics.median(v) for k, v in r.items()} for name, r in runs.items()}


def make_bundle(work: Path, m: Model) -> tuple[Path, Path]:
    """A signed bundle directory and its root, as ``edgefleet bundle pull`` leaves them."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from modules.bundle import build_manifest, read_blocks, sign_release, write_bundle_dir
    from protocol.encoding import canonical_json
    from protocol.signing import make_root

    keys = {r: Ed25519PrivateKey.generate() for r in ("root", "release", "director")}
    root = make_root({r: [k] for r, k in keys.items()}, [keys["root"]])
    model = f"model{m.path.suffix}"
    files = {model: m.path}
    manifest = build_manifest(m.name.replace("_", "-"), 1, m.path.suffix[1:], files, model=model, inputs=m.inputs,
                              outputs=m.outputs)
    envelope = sign_release(manifest, [keys["release"]], int(time.time()) + 3600)
    bundle = work / f"bundle-{m.name}"
    write_bundle_dir(bundle, envelope, lambda e: read_blocks(files[e.path]))
    (work / f"root-{m.name}.json").write_bytes(canonical_json(root))
    return bundle, work / f"root-{m.name}.json"


def bench_web(work: Path, m: Model, requests: int, rounds: int) -> tuple[float, float]:
    """(bare p50, web binary p50), paired, medians over rounds."""
    bundle, root = make_bundle(work, m)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "edgefleet", "serve", str(bundle), "--root", str(root), "--host",
                             "127.0.0.1", "--port", str(port), "--key", KEY, "--no-sandbox"], cwd=ROOT,
                            stderr=subprocess.DEVNULL)
    name = m.name.replace("_", "-")
    request = oip_request(f"/v2/models/{name}/infer", m, f"Authorization: Bearer {KEY}\r\n")
    connect = lambda: socket.create_connection(("127.0.0.1", port))  # noqa: E731
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                Client(connect, request)()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"edgefleet serve of {m.name} did not come up") from None
                time.sleep(0.2)
        bare = bare_call(m)
        pairs = [paired(bare, Client(connect, request), requests) for _ in range(rounds)]
        return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--mediapipe-wheel", type=Path, default=None)
    parser.add_argument("--models", nargs="+", metavar="NAME", help="only these (default: all)")
    parser.add_argument("--shm-copy", action="store_true", help="copy the frame into its region before each request")
    args = parser.parse_args()
    with LocalBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ms = models(work, args.mediapipe_wheel, args.models)
        hub = HubSide(broker.url, work / "hub")
        try:
            dev = bench_device(hub, work, ms, args.requests, args.rounds, args.shm_copy)
        finally:
            hub.close()
        for m in ms:  # the web after the device: one server at a time on the machine
            dev[m.name]["bare_web"], dev[m.name]["web"] = bench_web(work, m, args.requests, args.rounds)
    print(f"p50 in ms, median of {args.rounds} rounds x {args.requests} requests, 1 client, keep-alive, each request "
          f"taken in turns with a bare call (the bare p50 printed beside it); OIP v2 binary unless said")
    for m in ms:
        d = dev[m.name]
        print(f"{m.name} {list(m.image.shape)} ({m.image.nbytes / 2**20:.1f} MB in):")
        for key, what, goal in (("device", "device local API", 1.1), ("shm", "device shared memory", 1.1),
                                ("direct", "device direct socket", 1.1), ("shm_direct", "direct socket + shm", 1.1),
                                ("device_json", "device JSON (v1)", 0), ("web", "web endpoint", 1.2)):
            got, bare = d[key], d[f"bare_{key}"]
            limit = max(goal * bare, bare + 0.5) if goal == 1.1 and bare < 2 else goal * bare
            verdict = "for scale" if not goal else f"{'meets' if got <= limit else 'misses'} the {goal}x goal"
            print(f"  {what:20} {got:9.3f}  bare {bare:8.3f}  {got / bare:6.2f}x  {got - bare:+9.3f} ms  ({verdict})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
