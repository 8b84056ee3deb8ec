"""System shared memory (the OIP v2 / Triton extension) on the device's local API, driven by the real ``tritonclient``.

A real agent serves a CNN in its worker process; two apps (two tokens) register POSIX shared memory regions made
by ``tritonclient.utils.shared_memory``; an inference whose input and outputs name regions gets outputs
bit-identical to bare onnxruntime's, written into the output region. Refused: keys outside /dev/shm, symlinks,
sizes beyond the file, another app's region, a byte size that does not match the tensor.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton
import tritonclient.utils.shared_memory as shm

from agent.apitokens import ApiTokens
from agent.localapi import TOKEN_REQUIRED
from edgefleet.broker import free_port
from modules.examples import write_cnn_onnx
from protocol.manifest import TensorSpec
from tests.hubside import HubSide, new_device, running_agent, until

SIZE = 64
IMAGE = [TensorSpec(name="image", dtype="float32", shape=[1, SIZE, SIZE, 3])]
OUTPUTS = [TensorSpec(name="scores", dtype="float32", shape=[1, 10]),
           TensorSpec(name="embedding", dtype="float32", shape=[1, 16])]
TOKENS = {"a" * 24: "app-a", "b" * 24: "app-b"}


def test_tritonclient_infers_through_shared_memory_and_regions_are_checked(broker, tmp_path):
    model = write_cnn_onnx(tmp_path / "cnn.onnx", size=SIZE, embedding=True)
    image = np.random.default_rng(3).random((1, SIZE, SIZE, 3), dtype=np.float32)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    bare = dict(zip(["scores", "embedding"], sess.run(None, {"image": image}), strict=True))
    hub = HubSide(broker.url, tmp_path / "hub")
    device, port = new_device(), free_port()
    bundle = hub.build("cnn", 1, model_file=(model, IMAGE, OUTPUTS))
    data = tmp_path / "device"
    sock = data / "run" / "cnn.sock"

    async def main() -> None:
        tokens_file = tmp_path / "api-tokens"
        tokens_file.write_text("".join(f"{app} {token}\n" for token, app in TOKENS.items()))
        tokens = ApiTokens(tokens_file)
        async with running_agent(hub, device, data, isolation="process", api_port=port, api_tokens=tokens) as agent:
            hub.publish_desired(device, 1, [bundle.desired()])
            await until(lambda: hub.module_state(device, "cnn") == "running" and sock.exists(), 60, "cnn running")
            await asyncio.to_thread(checks, port, image, bare)
            assert agent.active["cnn"].stats.total == 2  # the two shared memory inferences (refusals are not)

    try:
        asyncio.run(main())
    finally:
        hub.close()


def checks(port: int, image: np.ndarray, bare: dict[str, np.ndarray]) -> None:
    tag = secrets.token_hex(4)
    key_in, key_out = f"/ef_in_{tag}", f"/ef_out_{tag}"
    out_size = bare["scores"].nbytes + bare["embedding"].nbytes
    region_in = shm.create_shared_memory_region("in", key_in, image.nbytes)
    region_out = shm.create_shared_memory_region("out", key_out, out_size)
    link = Path(f"/dev/shm/ef_link_{tag}")
    client = triton.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=60)
    auth = {"Authorization": f"Bearer {'a' * 24}"}
    other = {"Authorization": f"Bearer {'b' * 24}"}
    try:
        # the server says it has the extension (a client's first question), with its binary-tensor one
        assert set(client.get_server_metadata(headers=dict(auth))["extensions"]) >= {"system_shared_memory",
                                                                                      "binary_tensor_data"}
        shm.set_shared_memory_region(region_in, [image])
        client.register_system_shared_memory("in", key_in, image.nbytes, headers=dict(auth))
        client.register_system_shared_memory("out", key_out, out_size, headers=dict(auth))
        status = client.get_system_shared_memory_status(headers=dict(auth))
        assert sorted(r["name"] for r in status) == ["in", "out"]
        assert client.get_system_shared_memory_status(headers=dict(other)) == []  # another app sees none of them

        def infer(headers: dict[str, str], size: int = image.nbytes) -> triton.InferResult:
            inp = triton.InferInput("image", [1, SIZE, SIZE, 3], "FP32")
            inp.set_shared_memory("in", size)
            outs = [triton.InferRequestedOutput("scores", binary_data=True),
                    triton.InferRequestedOutput("embedding", binary_data=True)]
            outs[0].set_shared_memory("out", bare["scores"].nbytes)
            outs[1].set_shared_memory("out", bare["embedding"].nbytes, offset=bare["scores"].nbytes)
            return client.infer("cnn", [inp], outputs=outs, headers=dict(headers))

        for _ in range(2):  # the second time the worker already holds the regions
            result = infer(auth)
            outs = {o["name"]: o for o in result.get_response()["outputs"]}
            assert outs["scores"]["parameters"] == {"shared_memory_region": "out", "shared_memory_byte_size": 40}
            assert "data" not in outs["embedding"]  # nothing in the answer's body: it is in the region
            got = shm.get_contents_as_numpy(region_out, np.float32, [out_size // 4])
            assert got.tobytes() == bare["scores"].tobytes() + bare["embedding"].tobytes()

        # the one validation still applies to a tensor in shared memory: a non-finite value is refused
        shm.set_shared_memory_region(region_in, [np.full_like(image, np.nan)])
        with pytest.raises(triton.InferenceServerException, match="non-finite"):
            infer(auth)
        with pytest.raises(triton.InferenceServerException, match="is not registered by this app"):
            infer(other)  # app-b cannot use app-a's region by its name
        with pytest.raises(triton.InferenceServerException, match="shared_memory_byte_size"):
            infer(auth, image.nbytes - 4)

        # registration refusals, with the reason
        os.symlink(f"/dev/shm{key_in}", link)
        for name, key, size, words in (("x", "/../etc/passwd", 8, "not one name under"),
                                       ("x", "/a/b", 8, "not one name under"),
                                       ("x", link.name, 8, "cannot open"),
                                       ("x", key_in, image.nbytes + 1, "do not fit"),
                                       ("bad/name", key_in, 8, "no route"),
                                       ("bad name", key_in, 8, "region name"),
                                       ("in", key_in, 8, "already registered")):
            with pytest.raises(triton.InferenceServerException, match=words):
                client.register_system_shared_memory(name, key, size, headers=dict(auth))
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
        assert http.post("/v2/systemsharedmemory/region/in/register", json={"key": key_in, "byte_size": 8}).status_code == 401
        with pytest.raises(triton.InferenceServerException) as refused:  # the reason where tritonclient reads it
            client.get_system_shared_memory_status(headers={"Authorization": "Bearer not-a-token-of-this-device"})
        assert refused.value.message() == TOKEN_REQUIRED and refused.value.status() == "401"

        client.unregister_system_shared_memory("in", headers=dict(other))  # not app-b's: nothing happens to it
        assert len(client.get_system_shared_memory_status(headers=dict(auth))) == 2
        client.unregister_system_shared_memory(headers=dict(auth))
        assert client.get_system_shared_memory_status(headers=dict(auth)) == []
        with pytest.raises(triton.InferenceServerException, match="is not registered by this app"):
            infer(auth)
    finally:
        client.close()
        link.unlink(missing_ok=True)
        shm.destroy_shared_memory_region(region_in)
        shm.destroy_shared_memory_region(region_out)
