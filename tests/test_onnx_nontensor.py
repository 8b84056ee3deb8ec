"""A model whose outputs are not all tensors, as third-party exporters make them: skl2onnx's default classifier
gives its probabilities as an ONNX sequence of maps (ZipMap, ``seq(map(int64,tensor(float)))``).

Registered and served as a user would: on the device's local API and on a web endpoint, as JSON (the maps with
string keys, as JSON objects must have) and as OIP v2 (BYTES, each row's map one JSON text; in the binary
extension, Triton's length-prefixed strings, read back by tritonclient), every answer equal to onnxruntime's.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import tritonclient.http as triton
from skl2onnx import to_onnx
from sklearn.linear_model import LogisticRegression

from edgefleet.broker import free_port
from modules.runners import load_model_file
from tests.batch_support import score_cli, sign_bundle, write_table
from tests.hubside import HubSide, new_device, running_agent, until
from tests.webside import model_endpoint

X = np.random.default_rng(3).random((5, 4), dtype=np.float32)


@pytest.fixture(scope="module")
def zipmap(tmp_path_factory) -> Path:
    y = np.array([0, 1, 2, 1, 0])
    onx = to_onnx(LogisticRegression(max_iter=500).fit(X, y), X[:1])  # zipmap on: skl2onnx's default
    path = tmp_path_factory.mktemp("zipmap") / "clf.onnx"
    path.write_bytes(onx.SerializeToString())
    return path


def expected(path: Path) -> tuple[list[int], list[dict[str, float]]]:
    """onnxruntime's labels and probabilities, the maps' keys as JSON has them."""
    labels, probs = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"X": X})
    return labels.tolist(), [{str(k): float(v) for k, v in row.items()} for row in probs]


def check_json(doc: dict, labels: list[int], probs: list[dict[str, float]]) -> None:
    assert doc["outputs"]["output_label"] == labels and doc["outputs"]["output_probability"] == probs


def test_a_zipmap_classifier_answers_on_a_device_as_json(broker, tmp_path, zipmap):
    labels, probs = expected(zipmap)
    runner = load_model_file(zipmap, "onnx")
    assert runner.outputs[1].dtype == "seq(map(int64,tensor(float)))"
    hub = HubSide(broker.url, tmp_path / "hub")
    device, port = new_device(), free_port()
    bundle = hub.build("clf", 1, model_file=(zipmap, runner.inputs, runner.outputs))

    async def main() -> None:
        async with running_agent(hub, device, tmp_path / "device", isolation="process", api_port=port):
            hub.publish_desired(device, 1, [bundle.desired()])
            await until(lambda: hub.module_state(device, "clf") == "running", 60, "clf running")
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
                r = await c.post("/v1/modules/clf/predict", json={"inputs": {"X": X.tolist()}})
                assert r.status_code == 200, r.text
                check_json(r.json(), labels, probs)
                meta = (await c.get("/v2/models/clf")).json()
                assert meta["outputs"][1] == {"name": "output_probability", "datatype": "BYTES", "shape": [-1]}

    try:
        asyncio.run(main())
    finally:
        hub.close()


def test_a_zipmap_classifier_on_a_web_endpoint_as_json_and_through_tritonclient(broker, tmp_path, zipmap):
    labels, probs = expected(zipmap)
    with model_endpoint(broker.url, tmp_path / "hub", "clf", zipmap) as web:
        key, url, port = web["key"], web["url"], web["port"]
        r = httpx.post(url, json={"inputs": {"X": X.tolist()}}, headers={"api-key": key}, timeout=60)
        assert r.status_code == 200, r.text
        check_json(r.json(), labels, probs)

        client = triton.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=60)
        try:
            for binary in (True, False):  # Triton's length-prefixed BYTES, then JSON data
                inp = triton.InferInput("X", list(X.shape), "FP32")
                inp.set_data_from_numpy(X, binary_data=binary)
                outs = [triton.InferRequestedOutput(n, binary_data=binary)
                        for n in ("output_label", "output_probability")]
                result = client.infer("clf", [inp], outputs=outs, headers={"api-key": key})
                assert result.as_numpy("output_label").tolist() == labels
                rows = [json.loads(v) for v in result.as_numpy("output_probability").tolist()]
                assert rows == probs
        finally:
            client.close()


def test_batch_scoring_writes_a_column_per_class_of_a_zipmap_output(zipmap, tmp_path):
    labels, probs = expected(zipmap)
    runner = load_model_file(zipmap, "onnx")
    bundle = sign_bundle(tmp_path / "bundle", "clf", {"clf.onnx": zipmap}, runtime="onnx", model="clf.onnx",
                         inputs=runner.inputs, outputs=runner.outputs)
    features = write_table(tmp_path / "features.csv", X, ids=False)
    for out in ("scored.parquet", "scored.csv"):  # both formats take a column per class (CSV has no maps)
        done = score_cli("--bundle", str(bundle), "-i", str(features), "-o", str(tmp_path / out), "--json")
        assert done.returncode == 0, done.stderr
        table = pq.read_table(tmp_path / out) if out.endswith(".parquet") else pacsv.read_csv(tmp_path / out)
        assert table.column_names == ["f0", "f1", "f2", "f3", "output_label", *(f"output_probability_{c}"
                                                                                   for c in probs[0])]
        assert table["output_label"].to_pylist() == labels
        for c in probs[0]:
            assert table[f"output_probability_{c}"].to_pylist() == [p[c] for p in probs]
