"""System shared memory on the module's direct socket (``DATA/run/<module>.sock``): regions a uid registers on the
agent's Unix socket (``DATA/run/api.sock``) are usable on every module's direct socket by that uid only.

A real agent (process isolation) serves a CNN; this test's uid registers an input and an output region on api.sock
and infers on run/cnn.sock: outputs bit-identical to bare onnxruntime's, written into the region. Refused on the
direct socket: a region a token app registered over TCP (the same words as an unknown region, even for a token app
named after this very uid), any region to another uid (``nobody``, a real process), the registration routes
themselves, a region once unregistered. A worker killed with SIGKILL and restarted by the agent still serves them.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import secrets
import signal
import socket
import tempfile
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import tritonclient.utils.shared_memory as shm

from agent.apitokens import ApiTokens
from edgefleet.broker import free_port
from modules.examples import write_cnn_onnx
from protocol.manifest import TensorSpec
from tests.hubside import HubSide, new_device, running_agent, until

SIZE = 32
IMAGE = [TensorSpec(name="image", dtype="float32", shape=[1, SIZE, SIZE, 3])]
OUTPUTS = [TensorSpec(name="scores", dtype="float32", shape=[1, 10]),
           TensorSpec(name="embedding", dtype="float32", shape=[1, 16])]
TOKEN = "t" * 24
OUT_SIZE = (10 + 16) * 4


def infer_body(region_in: str, nbytes: int, out: bool = True) -> dict:
    """An OIP v2 request whose input is in shared memory, and both outputs (one after the other) unless not ``out``."""
    return {"inputs": [{"name": "image", "shape": [1, SIZE, SIZE, 3], "datatype": "FP32",
                        "parameters": {"shared_memory_region": region_in, "shared_memory_byte_size": nbytes}}],
            "outputs": [] if not out else [{"name": "scores", "parameters": {"shared_memory_region": "out", "shared_memory_byte_size": 40}},
                        {"name": "embedding", "parameters": {"shared_memory_region": "out", "shared_memory_byte_size": 64,
                                                             "shared_memory_offset": 40}}]}


def uds(path: Path) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(path)), base_url="http://device", timeout=30)


def test_regions_registered_on_api_sock_serve_the_direct_socket(broker, tmp_path):
    model = write_cnn_onnx(tmp_path / "cnn.onnx", size=SIZE, embedding=True)
    image = np.random.default_rng(5).random((1, SIZE, SIZE, 3), dtype=np.float32)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    scores, embedding = sess.run(None, {"image": image})
    bare = scores.tobytes() + embedding.tobytes()
    hub = HubSide(broker.url, tmp_path / "hub")
    device, port = new_device(), free_port()
    bundle = hub.build("cnn", 1, model_file=(model, IMAGE, OUTPUTS))
    data = tmp_path / "device"
    api_sock, sock = data / "run" / "api.sock", data / "run" / "cnn.sock"
    tag = secrets.token_hex(4)
    keys = {"in": f"/ef_din_{tag}", "out": f"/ef_dout_{tag}", "tcp": f"/ef_dtcp_{tag}"}
    regions = {"in": shm.create_shared_memory_region("in", keys["in"], image.nbytes),
               "out": shm.create_shared_memory_region("out", keys["out"], OUT_SIZE),
               "tcp": shm.create_shared_memory_region("tcp", keys["tcp"], image.nbytes)}
    shm.set_shared_memory_region(regions["in"], [image])
    shm.set_shared_memory_region(regions["tcp"], [image])

    def infer(region_in: str = "in") -> httpx.Response:
        with uds(sock) as direct:  # a fresh connection: after a restart the socket is the new worker's
            return direct.post("/v2/models/cnn/infer", json=infer_body(region_in, image.nbytes))

    def served() -> None:
        shm.set_shared_memory_region(regions["out"], [np.zeros(OUT_SIZE // 4, np.float32)])
        r = infer()
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/json"  # no binary body: the outputs are in the region
        outs = {o["name"]: o for o in json.loads(r.content)["outputs"]}
        assert outs["embedding"]["parameters"] == {"shared_memory_region": "out", "shared_memory_byte_size": 64}
        assert "data" not in outs["scores"] and "binary_data_size" not in outs["scores"]["parameters"]
        assert shm.get_contents_as_numpy(regions["out"], np.float32, [OUT_SIZE // 4]).tobytes() == bare

    def register_and_check() -> None:
        with uds(api_sock) as api:
            for name in ("in", "out"):
                r = api.post(f"/v2/systemsharedmemory/region/{name}/register",
                             json={"key": keys[name], "byte_size": image.nbytes if name == "in" else OUT_SIZE})
                assert r.status_code == 200, r.text
        served()
        served()  # the same regions again: the worker already holds them
        with uds(sock) as direct:  # registration is the agent's, with where to do it
            r = direct.post("/v2/systemsharedmemory/region/x/register", json={"key": keys["in"], "byte_size": 8})
            assert r.status_code == 404 and "DATA/run/api.sock" in r.json()["error"]
            assert direct.get("/v2/systemsharedmemory/status").status_code == 404

        # a token app's region (TCP) is not this uid's: refused as an unknown region is
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {TOKEN}"},
                          timeout=30) as tcp:
            r = tcp.post("/v2/systemsharedmemory/region/tcp/register", json={"key": keys["tcp"], "byte_size": image.nbytes})
            assert r.status_code == 200, r.text
            assert tcp.post("/v2/models/cnn/infer", json=infer_body("tcp", image.nbytes, False)).status_code == 200  # there, yes
        refused, unknown = infer("tcp"), infer("nosuch")
        assert refused.status_code == unknown.status_code >= 400
        assert "is not registered by this app" in refused.json()["error"]
        assert refused.json()["error"] == unknown.json()["error"].replace("'nosuch'", "'tcp'")

    def other_uid() -> tuple[int, dict]:
        """The same request from uid ``nobody`` (a forked child that drops to it: no interpreter to find), through a
        hard link to the socket in a directory it can reach."""
        nobody = pwd.getpwnam("nobody")
        request = json.dumps(infer_body("in", image.nbytes)).encode()
        request = (b"POST /v2/models/cnn/infer HTTP/1.1\r\nHost: d\r\nConnection: close\r\n"
                   b"Content-Length: %d\r\n\r\n" % len(request)) + request
        with tempfile.TemporaryDirectory() as d:  # beside pytest's own (0700) directory: the same file system
            os.chmod(d, 0o755)
            link = Path(d) / "cnn.sock"
            os.link(sock, link)
            os.chmod(link, 0o666)  # the test's doing: on a device the socket's group decides who connects
            rfd, wfd = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: only system calls until _exit
                code = 1
                try:
                    os.close(rfd)
                    os.setgroups([])
                    os.setgid(nobody.pw_gid)
                    os.setuid(nobody.pw_uid)
                    with socket.socket(socket.AF_UNIX) as c:
                        c.connect(str(link))
                        c.sendall(request)
                        while chunk := c.recv(65536):
                            os.write(wfd, chunk)
                    code = 0
                finally:
                    os._exit(code)
            os.close(wfd)
            with os.fdopen(rfd, "rb") as r:
                out = r.read()
            assert os.waitpid(pid, 0)[1] == 0, out
        head, _, payload = out.partition(b"\r\n\r\n")
        return int(head.split()[1]), json.loads(payload)

    async def main() -> None:
        tokens_file = tmp_path / "api-tokens"
        tokens_file.write_text(f"uid:{os.getuid()} {TOKEN}\n")  # a token app named as this uid is still not it
        async with running_agent(hub, device, data, isolation="process", api_port=port, api_tokens=ApiTokens(tokens_file),
                                 api_socket=api_sock) as agent:
            hub.publish_desired(device, 1, [bundle.desired()])
            await until(lambda: hub.module_state(device, "cnn") == "running" and sock.exists(), 60, "cnn running")
            await asyncio.to_thread(register_and_check)
            status, doc = await asyncio.to_thread(other_uid)
            assert status >= 400 and "is not registered by this app" in doc["error"]

            runner = agent.active["cnn"].runner
            old = runner.pid
            os.kill(old, signal.SIGKILL)  # the agent restarts its worker, which takes the regions before serving
            await until(lambda: runner.pid not in (None, old) and runner.state == "serving", 60, "worker restarted")
            await asyncio.to_thread(served)

            with uds(api_sock) as api:
                assert (await asyncio.to_thread(api.post, "/v2/systemsharedmemory/region/in/unregister")).status_code == 200
            r = await asyncio.to_thread(infer)
            assert r.status_code >= 400 and "'in' is not registered by this app" in r.json()["error"]

    try:
        asyncio.run(main())
    finally:
        hub.close()
        for region in regions.values():
            shm.destroy_shared_memory_region(region)
