"""modules.tensors and modules.oip on their own: the one decoding, validation and encoding every way in shares.

Real onnxruntime on a small image CNN; the HTTP paths that call this are tests/test_tensors_oip.py.
"""

from __future__ import annotations

import io
import json

import numpy as np
import onnxruntime as ort
import pytest

from modules import oip
from modules.errors import BodyError, InputError, NotAcceptable
from modules.examples import write_cnn_onnx
from modules.runners import OnnxRunner
from modules.tensors import Form, check_inputs, decode, encode, serve
from protocol.manifest import TensorSpec

X = [TensorSpec(name="x", dtype="float32", shape=[None, 4])]
IDS = [TensorSpec(name="ids", dtype="int64", shape=[None, 2])]


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def v2_binary(inputs: dict[str, np.ndarray], **extra: object) -> tuple[Form, bytes]:
    head = {"inputs": [{"name": k, "shape": list(v.shape), "datatype": oip.DATATYPES[v.dtype.name],
                        "parameters": {"binary_data_size": v.nbytes}} for k, v in inputs.items()], **extra}
    raw = json.dumps(head).encode()
    return Form("v2", oip.BINARY, header_length=len(raw)), raw + b"".join(v.tobytes() for v in inputs.values())


@pytest.fixture(scope="module")
def cnn(tmp_path_factory) -> OnnxRunner:
    runner = OnnxRunner(write_cnn_onnx(tmp_path_factory.mktemp("cnn") / "cnn.onnx", size=32, embedding=True))
    runner.path = runner.session._model_path  # type: ignore[attr-defined]
    return runner


def test_json_numbers_convert_only_where_no_value_changes():
    assert check_inputs({"ids": [[1, 2.0]]}, IDS)["ids"].dtype == np.int64
    for bad, why in (([[1.5, 2]], "not int64"), ([[2**63, 1]], "range"), ([["a", "b"]], "not numbers"),
                     ([[True, False]], "booleans")):
        with pytest.raises(InputError, match=why):
            check_inputs({"ids": bad}, IDS)
    assert check_inputs({"x": [[1, 2, 3, 4]]}, X)["x"].dtype == np.float32
    with pytest.raises(InputError, match="not float32"):
        check_inputs({"x": [["1.5", 2, 3, 4]]}, X)  # a string that looks like a number is still a string


def test_typed_tensors_of_another_dtype_are_refused_never_cast():
    for dtype in (np.uint8, np.float64, np.dtype(">f4")):
        with pytest.raises(InputError, match=r"the model takes float32.*nothing is cast"):
            decode(Form(ctype="application/x-npy"), npy(np.ones((1, 4), dtype=dtype)), X)
    ok = decode(Form(ctype="application/x-npy"), npy(np.ones((1, 4), dtype=np.float32)), X)
    assert ok.inputs["x"].dtype == np.float32


@pytest.mark.parametrize("body", [b'{"inputs": {"x": [[NaN, 1, 2, 3]]}}', b'{"inputs": {"x": [[Infinity, 1, 2, 3]]}}'])
def test_non_finite_values_are_refused_in_json(body):
    with pytest.raises(InputError, match="non-finite"):
        decode(Form(), body, X)


def test_non_finite_values_are_refused_in_binary_bodies():
    for bad in (np.nan, np.inf, -np.inf):
        arr = np.ones((1, 4), dtype=np.float32)
        arr[0, 2] = bad
        with pytest.raises(InputError, match="non-finite"):
            decode(Form(ctype="application/x-npy"), npy(arr), X)
        with pytest.raises(InputError, match="non-finite"):
            decode(*v2_binary({"x": arr}), X)
    huge = np.full((1, 4), np.finfo(np.float64).max, dtype=np.float64)  # sums to inf, yet every value is finite
    assert check_inputs({"v": huge}, [TensorSpec(name="v", dtype="float64", shape=[1, 4])])["v"] is huge


def test_unknown_missing_and_misshapen_inputs_are_named():
    with pytest.raises(InputError, match=r"unknown input\(s\) \['y'\]"):
        check_inputs({"x": [[1, 2, 3, 4]], "y": [1]}, X)
    with pytest.raises(InputError, match=r"missing input\(s\) \['x'\]"):
        check_inputs({}, X)
    with pytest.raises(InputError, match=r"shape \[1, 3\]; expected x: float32\['N', 4\]"):
        check_inputs({"x": [[1, 2, 3]]}, X)
    with pytest.raises(BodyError, match="not JSON"):
        decode(Form(), b"{nope", X)


def test_v2_binary_round_trip_is_bit_identical_to_onnxruntime(cnn):
    image = np.random.default_rng(1).random((1, 32, 32, 3), dtype=np.float32)
    want = ort.InferenceSession(str(cnn.path), providers=["CPUExecutionProvider"]).run(
        None, {"image": image})
    form, body = v2_binary({"image": image}, outputs=[{"name": "scores", "parameters": {"binary_data": True}},
                                                      {"name": "embedding", "parameters": {"binary_data": False}}],
                           id="req-7")
    ctype, hlen, out, record = serve(cnn, form.to_dict(), body, "cnn", 3, sample=True)
    head = json.loads(out[:hlen])
    assert ctype == oip.BINARY and head["model_name"] == "cnn" and head["model_version"] == "3"
    assert head["id"] == "req-7"
    scores, embedding = head["outputs"]
    assert scores["parameters"]["binary_data_size"] == 40 and scores["shape"] == [1, 10]
    assert np.frombuffer(out[hlen:], np.float32).tobytes() == want[0].tobytes()
    assert np.asarray(embedding["data"], np.float32).tobytes() == want[1].ravel().tobytes()
    assert np.array_equal(np.asarray(json.loads(record)["input"]["image"], np.float32), image)


def test_v2_json_binary_mismatch_and_trailing_bytes_are_refused(cnn):
    image = np.zeros((1, 32, 32, 3), dtype=np.float32)
    form, body = v2_binary({"image": image})
    with pytest.raises(InputError, match="bytes after the last binary input"):
        decode(form, body + b"x", cnn.inputs)
    doc = {"inputs": [{"name": "image", "shape": [1, 32, 32, 3], "datatype": "FP64", "data": image.ravel().tolist()}]}
    with pytest.raises(InputError, match="the model takes float32"):
        decode(Form("v2"), json.dumps(doc).encode(), cnn.inputs)
    doc["inputs"][0]["datatype"] = "FP32"
    dec = decode(Form("v2"), json.dumps(doc).encode(), cnn.inputs)
    ctype, hlen, out = encode(dec, cnn.predict(dec.inputs), "cnn", 1)
    assert hlen == -1 and [o["name"] for o in json.loads(out)["outputs"]] == ["scores", "embedding"]


def test_npy_answer_of_a_two_output_model_is_refused_before_the_model_runs(cnn):
    image = np.zeros((1, 32, 32, 3), dtype=np.float32)
    form = Form(ctype="application/x-npy", accept="application/x-npy")
    with pytest.raises(NotAcceptable, match="2 outputs"):
        decode(form, npy(image), cnn.inputs, cnn.outputs)


def test_oip_paths():
    assert oip.parse_path("/v2") == oip.Route("server")
    assert oip.parse_path("/v2/health/ready") == oip.Route("ready")
    assert oip.parse_path("/v2/models/m/versions/3/infer?x=1") == oip.Route("infer", "m", "3")
    assert oip.parse_path("/v2/models/m/ready") == oip.Route("model_ready", "m")
    assert oip.parse_path("/v2/models/m") == oip.Route("model", "m")
    for bad in ("/v2/models", "/v2/models/m/versions", "/v2/models/m/predict", "/v1/modules/m/predict", "/v2x"):
        assert oip.parse_path(bad) is None, bad


def test_python_code_gets_writable_inputs_from_a_binary_body(tmp_path):
    from modules.runners import PythonRunner

    script = tmp_path / "main.py"
    script.write_text("def run(inputs):\n    x = inputs['x']\n    x *= 2\n    return {'y': x}\n")
    runner = PythonRunner(script, X, [TensorSpec(name="y", dtype="float32", shape=[None, 4])])
    form, body = v2_binary({"x": np.ones((1, 4), dtype=np.float32)})
    ctype, hlen, out, _ = serve(runner, form.to_dict(), body, "py", 1)
    assert json.loads(out)["outputs"][0]["data"] == [2.0, 2.0, 2.0, 2.0]
