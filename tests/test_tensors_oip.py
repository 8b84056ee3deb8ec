"""Binary tensors and the Open Inference Protocol v2, end to end, with the real ``tritonclient`` as the client.

A 512x512x3 float image CNN (3 MB in binary, 16.5 MB as JSON) served by a web endpoint (real hub, gateway
and worker processes) and by a device (a real agent with a worker process, its local API and direct
socket): tritonclient's answers are bit-identical to bare onnxruntime's, and both refuse the same bad
requests with the same status and words.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton

from edgefleet.broker import free_port
from modules.examples import write_cnn_onnx
from protocol.manifest import TensorSpec
from tests.hubside import HubSide, new_device, running_agent, until
from tests.webside import model_endpoint

SIZE = 512
IMAGE = [TensorSpec(name="image", dtype="float32", shape=[1, SIZE, SIZE, 3])]
OUTPUTS = [TensorSpec(name="scores", dtype="float32", shape=[1, 10]),
           TensorSpec(name="embedding", dtype="float32", shape=[1, 16])]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_cnn_onnx(tmp_path_factory.mktemp("cnn") / "cnn.onnx", size=SIZE, embedding=True)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(7).random((1, SIZE, SIZE, 3), dtype=np.float32)


@pytest.fixture(scope="module")
def bare(model, image) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return dict(zip(["scores", "embedding"], sess.run(None, {"image": image}), strict=True))


@pytest.fixture(scope="module")
def web(broker, model, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """One endpoint serving the CNN from a real hub: {"url", "port", "key", "version", "admin"}."""
    with model_endpoint(broker.url, tmp_path_factory.mktemp("hub"), "cnn", model) as web:
        yield web


def oip_checks(url: str, model: str, version: str, image: np.ndarray, bare: dict[str, np.ndarray],
               headers: dict[str, str] | None = None) -> None:
    """tritonclient against one server: health, metadata, binary and JSON inference, bit for bit."""
    fixed = headers or {}

    def h() -> dict[str, str]:  # tritonclient adds its Inference-Header-Content-Length to the dict it is given
        return dict(fixed)

    client = triton.InferenceServerClient(url, network_timeout=120, connection_timeout=60)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready(model, headers=h())
        assert client.is_model_ready(model, version, headers=h())
        meta = client.get_model_metadata(model, headers=h())
        assert meta["versions"] == [version] and meta["platform"] == "onnxruntime_onnx"
        assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [1, SIZE, SIZE, 3]}]
        assert [o["name"] for o in meta["outputs"]] == ["scores", "embedding"]

        binary = triton.InferInput("image", [1, SIZE, SIZE, 3], "FP32")
        binary.set_data_from_numpy(image, binary_data=True)
        result = client.infer(model, [binary], headers=h())  # no outputs named: all come back as raw bytes
        assert result.get_response()["model_version"] == version
        for name, want in bare.items():
            assert result.as_numpy(name).tobytes() == want.tobytes(), name

        as_json = triton.InferInput("image", [1, SIZE, SIZE, 3], "FP32")
        as_json.set_data_from_numpy(image, binary_data=False)
        asked = [triton.InferRequestedOutput("scores", binary_data=False)]
        result = client.infer(model, [as_json], outputs=asked, model_version=version, request_id="r1", headers=h())
        assert result.get_response()["id"] == "r1" and result.as_numpy("embedding") is None
        assert result.as_numpy("scores").tobytes() == bare["scores"].tobytes()

        # tritonclient's request_compression_algorithm: refused by name, and the connection serves on
        with pytest.raises(triton.InferenceServerException, match="Content-Encoding 'gzip' is not supported"):
            client.infer(model, [binary], headers=h(), request_compression_algorithm="gzip")

        wrong = triton.InferInput("image", [1, SIZE, SIZE, 3], "FP64")
        wrong.set_data_from_numpy(image.astype(np.float64), binary_data=True)
        with pytest.raises(triton.InferenceServerException, match="the model takes float32"):
            client.infer(model, [wrong], headers=h())

        if fixed:  # a server that asks for a key: refused with its reason where tritonclient looks for it
            with pytest.raises(triton.InferenceServerException) as refused:
                client.infer(model, [binary], headers={"Authorization": "Bearer wrong-key"})
            assert refused.value.status() == "401" and refused.value.message().startswith("a valid endpoint key")
    finally:
        client.close()


def test_tritonclient_drives_a_web_endpoint_bit_identical_to_onnxruntime(web, image, bare):
    oip_checks(f"127.0.0.1:{web['port']}", "cnn", str(web["version"]), image, bare,
               headers={"Authorization": f"Bearer {web['key']}"})
    r = httpx.get(f"http://127.0.0.1:{web['port']}/v2/models/cnn")
    assert r.status_code == 401  # metadata and inference need the endpoint's key; health does not
    # the 3 MB bodies went through the gateway's arena (read in place by the worker), and every slot was freed
    arena = web["admin"].get("/api/v1/endpoints/cnn").json()["status"]["arena"]
    assert arena["on"] and arena["bodies"] >= 2 and arena["slots"] == 0 and arena["in_use"] == 0, arena


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def refusals(client: httpx.Client, path: str, image: np.ndarray) -> list[tuple[int, str]]:
    """The same bad (and good) requests, as (status, reason) pairs, to compare web and device."""
    nan = image.copy()
    nan[0, 1, 2, 0] = np.nan
    small = np.zeros((1, 4, 4, 3), dtype=np.float32)
    cases = [
        {"content": npy(image.astype(np.float64)), "headers": {"content-type": "application/x-npy"}},
        {"content": npy((image * 255).astype(np.uint8)), "headers": {"content-type": "application/x-npy"}},
        {"content": npy(nan), "headers": {"content-type": "application/x-npy"}},
        {"content": b'{"inputs": {"image": [[[[NaN, 0, 0]]]]}}'},
        {"json": {"inputs": {"image": small.tolist(), "extra": [1.0]}}},
        {"content": npy(image), "headers": {"content-type": "application/x-npy", "accept": "application/x-npy"}},
        {"content": b"{not json"},
        {"content": gzip.compress(npy(image)), "headers": {"content-type": "application/x-npy",
                                                          "content-encoding": "gzip"}},
    ]
    out = []
    for kw in cases:
        r = client.post(path, **kw)
        doc = r.json()
        out.append((r.status_code, doc.get("detail", "")))
    return out


def test_a_device_serves_binary_and_oip_v2_as_the_web_does(broker, tmp_path, web, image, bare, model):
    hub = HubSide(broker.url, tmp_path / "hub")
    device, port = new_device(), free_port()
    bundle = hub.build("cnn", 3, model_file=(model, IMAGE, OUTPUTS))
    data = tmp_path / "device"
    sock = data / "run" / "cnn.sock"

    async def main() -> None:
        async with running_agent(hub, device, data, isolation="process", api_port=port) as agent:
            hub.publish_desired(device, 1, [bundle.desired()])
            await until(lambda: hub.module_state(device, "cnn") == "running" and sock.exists(), 60, "cnn running")
            await asyncio.to_thread(oip_checks, f"127.0.0.1:{port}", "cnn", "3", image, bare)
            await asyncio.to_thread(device_checks, port, sock, web, image, bare)
            # the inferences through the agent's TCP API were counted: tritonclient's binary and JSON ones and the
            # .npy one (refusals are not inferences; the direct socket's are pushed later, so not awaited here)
            assert agent.active["cnn"].stats.total >= 3

    try:
        asyncio.run(main())
    finally:
        hub.close()


def device_checks(port: int, sock: Path, web: dict[str, Any], image: np.ndarray, bare: dict[str, np.ndarray]) -> None:
    tcp = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    direct = httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://device", timeout=60)
    site = httpx.Client(headers={"api-key": web["key"]}, timeout=60)
    try:
        # a .npy image in, a .npy answer out is refused for two outputs; JSON out holds both, version an integer
        for client in (tcp, direct):
            r = client.post("/v1/modules/cnn/predict", content=npy(image), headers={"content-type": "application/x-npy"})
            assert r.status_code == 200, r.text
            doc = r.json()
            assert (doc["module"], doc["version"]) == ("cnn", 3)
            assert np.asarray(doc["outputs"]["scores"], np.float32).tobytes() == bare["scores"].tobytes()
        web_doc = site.post(web["url"], content=npy(image), headers={"content-type": "application/x-npy"}).json()
        assert (web_doc["module"], web_doc["version"]) == ("cnn", web["version"])  # the same types on the web

        # HEAD answered with the head alone: the next request on the same connection reads its own answer
        for client, path in ((tcp, "/healthz"), (direct, "/v2/health/ready")):
            first, second = client.head(path), client.get(path)
            assert first.status_code == second.status_code == 200 and first.content == b"" and second.json(), path

        # curl as a stranger posts an image file: over 1 MB it asks Expect: 100-continue and waits (here up to a
        # minute) for the interim answer before sending the body; every server gives it at once
        upload = sock.parent.parent / "image.npy"
        upload.write_bytes(npy(image))
        for url, extra in ((f"http://127.0.0.1:{port}/v1/modules/cnn/predict", []),
                           ("http://device/v1/modules/cnn/predict", ["--unix-socket", str(sock)]),
                           (web["url"], ["-H", f"api-key: {web['key']}"])):
            done = subprocess.run(["curl", "-sSv", "--fail-with-body", "--expect100-timeout", "60", *extra,
                                   "-H", "content-type: application/x-npy", "--data-binary", f"@{upload}", url],
                                  capture_output=True, timeout=120)
            assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
            assert b"< HTTP/1.1 100 Continue" in done.stderr, url
            scores = np.asarray(json.loads(done.stdout)["outputs"]["scores"], np.float32)
            assert scores.tobytes() == bare["scores"].tobytes(), url

        # OIP v2 binary on the direct socket (tritonclient cannot speak to a Unix socket)
        head = json.dumps({"inputs": [{"name": "image", "shape": [1, SIZE, SIZE, 3], "datatype": "FP32",
                                       "parameters": {"binary_data_size": image.nbytes}}],
                           "parameters": {"binary_data_output": True}}).encode()
        r = direct.post("/v2/models/cnn/infer", content=head + image.tobytes(),
                        headers={"inference-header-content-length": str(len(head))})
        assert r.status_code == 200, r.text
        n = int(r.headers["inference-header-content-length"])
        outs = json.loads(r.content[:n])["outputs"]
        assert [o["parameters"]["binary_data_size"] for o in outs] == [40, 64]
        assert r.content[n:] == bare["scores"].tobytes() + bare["embedding"].tobytes()

        # one validation: the device's TCP API, its direct socket and the web refuse alike, with the same words
        device = refusals(tcp, "/v1/modules/cnn/predict", image)
        assert refusals(direct, "/v1/modules/cnn/predict", image) == device
        assert refusals(site, web["url"], image) == device
        assert [s for s, _ in device] == [422, 422, 422, 422, 422, 406, 400, 415]
        assert "the model takes float32" in device[0][1] and "uint8" in device[1][1]
        assert "non-finite" in device[2][1] and "non-finite" in device[3][1]
        assert "unknown input(s) ['extra']" in device[4][1] and "2 outputs" in device[5][1]
        assert device[7][1] == "Content-Encoding 'gzip' is not supported: send the body uncompressed"
    finally:
        tcp.close()
        direct.close()
        site.close()
