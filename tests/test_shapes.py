"""Shapes told truthfully (issue 15): a TFLite model's fixed batch is recorded and enforced (422, not merged
outputs); the advertised sample request is built from the real signature and accepted; without a sample a
generated one health-checks the model, so one failing on every call is refused; ``preprocess`` runs before the
model's own inputs are checked; what ``postprocess`` returns is declared or observed. Real onnxruntime and LiteRT,
no hub process: the endpoint's Scorer is driven directly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper, save

from hub.endpoints.worker import Scorer
from hub.errors import Invalid
from hub.registry.bundles import entry_signature
from modules.bundle import build_manifest
from modules.examples import write_logreg_onnx
from modules.runners import (
    InputError,
    ModelError,
    OnnxRunner,
    TfliteRunner,
    WithEntry,
    coerce_inputs,
    health_check,
    observed_specs,
    sample_inputs,
    sample_request,
)
from protocol.manifest import TensorSpec

ROOT = Path(__file__).resolve().parents[1]
TFLITE = ROOT / "tests" / "data" / "hand_recrop.tflite"  # batch fixed at 1 in its shape_signature


def npy_item(rid: str, arr: np.ndarray) -> tuple:
    from hub.endpoints.codec import NPY
    from modules.tensors import npy_bytes

    return (rid, NPY, npy_bytes(arr), "input_1", False, "v1", -1, -1, 0)  # hub.endpoints.wire's request item


def json_item(rid: str, doc: bytes) -> tuple:
    return (rid, "application/json", doc, "", False, "v1", -1, -1, 0)


def test_tflite_fixed_batch_is_recorded_and_a_batch_of_two_gets_422(tmp_path):
    runner = TfliteRunner(TFLITE)
    assert [s.to_dict() for s in runner.inputs] == [{"name": "input_1", "dtype": "float32", "shape": [1, 256, 256, 3]}]
    assert runner.outputs[0].shape == [1, 1, 1, 4]
    two = np.zeros((2, 256, 256, 3), np.float32)
    with pytest.raises(InputError, match=r"shape \[2, 256, 256, 3\]"):
        runner.predict({"input_1": two})  # the runner itself refuses: no resize of a fixed dimension
    manifest = build_manifest("recrop", 1, "tflite", {TFLITE.name: TFLITE}, TFLITE.name,
                              inputs=runner.inputs, outputs=runner.outputs)
    scorer = Scorer(runner, manifest, "1")
    assert not scorer.batchable  # a fixed batch of 1 never stacks requests
    one = np.random.default_rng(0).random((1, 256, 256, 3), dtype=np.float32)
    (bad, good) = scorer.run([npy_item("a", two), npy_item("b", one)])
    assert bad[0] == 422 and b"expected input_1: float32[1, 256, 256, 3]" in bad[1]
    assert good[0] == 200


def test_the_advertised_sample_request_matches_the_signature_and_is_accepted():
    runner = TfliteRunner(TFLITE)
    req = sample_request(runner.inputs)
    assert np.asarray(req["inputs"]["input_1"]).shape == (1, 256, 256, 3)
    out = runner.predict(coerce_inputs(req["inputs"], runner.inputs))
    assert out["output_crop"].shape == (1, 1, 1, 4)
    free = [TensorSpec(name="x", dtype="int64", shape=[None, 3, None]), TensorSpec(name="s", dtype="str", shape=[None])]
    built = sample_inputs(free)
    assert built is not None and built["x"].shape == (1, 3, 1) and built["x"].dtype == np.int64
    assert built["s"].tolist() == [""]
    assert sample_inputs([]) is None  # nothing to build from


def failing_onnx(path: Path) -> Path:
    """Loads fine, fails on every call: reshapes [N, 4] to a shape of 3 elements."""
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["y"])], "fails",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
                              [numpy_helper.from_array(np.array([3], np.int64), "shape")])
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


def test_without_a_sample_a_generated_one_refuses_a_model_that_fails_on_every_call(tmp_path):
    bad = OnnxRunner(failing_onnx(tmp_path / "bad.onnx"))
    with pytest.raises(ModelError, match="generated sample inference failed"):
        health_check(bad, None)
    good = OnnxRunner(write_logreg_onnx(tmp_path / "good.onnx"))
    assert health_check(good, None)["probability"].shape == (1, 1)


PRE = '''
import numpy as np
INPUTS = [{"name": "frame", "dtype": "uint8", "shape": [None, None, 3]}]
OUTPUTS = [{"name": "score", "dtype": "float32", "shape": [1]}]

def preprocess(inputs):
    frame = inputs["frame"].astype(np.float32) / 255.0
    if frame.shape[1] == 4:  # a deliberately wrong result, to see the model's own check after preprocess
        return {"x": frame.reshape(1, -1)}
    return {"x": frame.mean(axis=(0, 1), keepdims=True).reshape(1, 3)[:, [0, 1, 2, 0]]}

def postprocess(out):
    return {"score": out["probability"].reshape(1)}
'''


def test_preprocess_runs_before_the_models_own_input_check_and_outputs_are_declared(tmp_path):
    model = write_logreg_onnx(tmp_path / "model.onnx")
    (tmp_path / "entry.py").write_text(PRE)
    runner = WithEntry(OnnxRunner(model), tmp_path / "entry.py")
    assert [s.name for s in runner.inputs] == ["frame"] and [s.name for s in runner.outputs] == ["score"]
    frame = np.full((48, 64, 3), 200, np.uint8)  # a camera frame: nothing like the model's x[N, 4]
    out = runner.predict(coerce_inputs({"frame": frame}, runner.inputs))
    assert out["score"].shape == (1,) and np.isfinite(out["score"]).all()
    with pytest.raises(InputError, match=r"after preprocess: input 'x' has shape \[1, 12\]"):
        runner.predict({"frame": np.zeros((1, 4, 3), np.uint8)})
    assert health_check(runner, None)["score"].shape == (1,)  # generated from the declared INPUTS


def test_the_module_signature_is_the_entry_scripts_where_it_changes_it():
    model = {"inputs": [{"name": "x", "dtype": "float32", "shape": [None, 4]}],
             "outputs": [{"name": "probability", "dtype": "float32", "shape": [None, 1]}]}
    ins, outs = entry_signature("onnx", model, PRE, "entry.py")
    assert [s.name for s in ins] == ["frame"] and outs[0].to_dict() == {"name": "score", "dtype": "float32",
                                                                        "shape": [1]}
    undeclared = "def preprocess(inputs):\n    return inputs\n"
    ins, outs = entry_signature("onnx", model, undeclared, "entry.py")
    assert ins == [] and [s.name for s in outs] == ["probability"]  # free inputs; postprocess absent: model's outputs
    post_only = "def postprocess(out):\n    return out\n"
    ins, outs = entry_signature("onnx", model, post_only, "entry.py")
    assert [s.name for s in ins] == ["x"] and outs == []
    with pytest.raises(Invalid, match="INPUTS must be a literal"):
        entry_signature("onnx", model, "INPUTS = make()\ndef preprocess(i):\n    return i\n", "entry.py")
    with pytest.raises(Invalid, match="INPUTS/OUTPUTS"):
        entry_signature("onnx", model, "INPUTS = [{'name': 'x'}]\ndef preprocess(i):\n    return i\n", "entry.py")


def test_an_undeclared_postprocess_is_described_by_what_it_returned(tmp_path):
    model = write_logreg_onnx(tmp_path / "model.onnx")
    (tmp_path / "entry.py").write_text("import numpy as np\ndef postprocess(out):\n"
                                       "    return {'label': (out['probability'] > 0.5).astype(np.int64)}\n")
    runner = WithEntry(OnnxRunner(model), tmp_path / "entry.py")
    assert runner.outputs == [] and runner.inputs[0].name == "x"
    seen = health_check(runner, None)
    assert [s.to_dict() for s in observed_specs(seen)] == [{"name": "label", "dtype": "int64", "shape": [1, 1]}]


def test_an_endpoint_without_a_sample_advertises_one_its_model_accepts(tmp_path):
    from hub.endpoints.gateway import Gateway
    from hub.endpoints.pool import Pool, Settings
    from modules.bundle import RELEASE_FILE
    from protocol.encoding import canonical_json
    from protocol.manifest import release_document

    runner = TfliteRunner(TFLITE)
    manifest = build_manifest("recrop", 1, "tflite", {TFLITE.name: TFLITE}, TFLITE.name,
                              inputs=runner.inputs, outputs=runner.outputs)  # no sample
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / RELEASE_FILE).write_bytes(canonical_json({"signed": release_document(manifest, 2**40),
                                                        "signatures": []}))
    gateway = Gateway("recrop-web", None)
    pool = Pool("recrop-web", "1", bundle, Settings())
    pool.info = {"inputs": [s.to_dict() for s in runner.inputs], "outputs": [s.to_dict() for s in runner.outputs]}
    gateway.pools = {"1": pool}
    advertised = gateway.describe()["sample_request"]
    assert np.asarray(advertised["inputs"]["input_1"]).shape == (1, 256, 256, 3)  # not [1, 128]
    scorer = Scorer(runner, manifest, "1")
    ((status, body, _, _),) = scorer.run([json_item("s", json.dumps(advertised).encode())])
    assert status == 200, body
