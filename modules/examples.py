"""A small real model for demos and tests: logistic regression trained here with NumPy, saved as ONNX.

Training takes milliseconds and needs no scikit-learn; the ONNX graph is
MatMul -> Add -> Sigmoid, built with the ``onnx`` package and run by onnxruntime.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

N_FEATURES = 4


def synthetic_inputs(rng: np.random.Generator, n: int, shift: float = 0.0) -> np.ndarray:
    """Feature rows like the training data; ``shift`` moves feature 0 (drift scenarios)."""
    x = rng.normal(0.0, 1.0, size=(n, N_FEATURES)).astype(np.float32)
    x[:, 0] += shift
    return x


def train_logreg(seed: int = 0, n: int = 2000, steps: int = 300) -> tuple[np.ndarray, float]:
    rng = np.random.default_rng(seed)
    x = synthetic_inputs(rng, n)
    true_w = np.array([1.5, -2.0, 0.5, 1.0], dtype=np.float32)
    y = (x @ true_w + 0.3 * rng.normal(size=n) > 0).astype(np.float32)
    w = np.zeros(N_FEATURES, dtype=np.float32)
    b = 0.0
    for _ in range(steps):  # plain gradient descent on the log loss
        p = 1.0 / (1.0 + np.exp(-(x @ w + b)))
        w -= 0.5 * (x.T @ (p - y)) / n
        b -= 0.5 * float(np.mean(p - y))
    return w, b


def write_logreg_onnx(path: Path, seed: int = 0, invert: bool = False) -> Path:
    """Train and save the model; the same seed writes the same bytes. ``invert``: a model that runs fine and
    answers 1 - p, every prediction flipped (what health gates cannot see; shadow evaluation's test case)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w, b = train_logreg(seed)
    if invert:
        w, b = -w, -b
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["z0"]),
            helper.make_node("Add", ["z0", "B"], ["z"]),
            helper.make_node("Sigmoid", ["z"], ["probability"]),
        ],
        "edgefleet_logreg",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", N_FEATURES])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["N", 1])],
        initializer=[
            numpy_helper.from_array(w.reshape(N_FEATURES, 1).astype(np.float32), "W"),
            numpy_helper.from_array(np.array([b], dtype=np.float32), "B"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="edgefleet")
    model.ir_version = 8  # readable by onnxruntime releases back to 1.10
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def write_sample(path: Path, seed: int = 1) -> Path:
    rng = np.random.default_rng(seed)
    path.write_text(json.dumps({"inputs": {"x": synthetic_inputs(rng, 2).round(4).tolist()}}))
    return path


def write_cnn_onnx(path: Path, size: int = 128, width: int = 8, seed: int = 0, embedding: bool = False) -> Path:
    """A small image CNN: ``image`` float32[1, size, size, 3] (NHWC, as camera frames and mediapipe models come)
    -> two strided 3x3 convolutions with ReLU -> global average pool -> ``scores`` float32[1, 10] (softmax);
    with ``embedding``, the pooled features as a second output. Random weights: for serving and benchmarks."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = (rng.normal(0, 0.3, (width, 3, 3, 3))).astype(np.float32)
    w2 = (rng.normal(0, 0.1, (2 * width, width, 3, 3))).astype(np.float32)
    fc = (rng.normal(0, 0.3, (2 * width, 10))).astype(np.float32)
    nodes = [
        helper.make_node("Transpose", ["image"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "W1"], ["c1"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "W2"], ["c2"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["features"]),
        helper.make_node("MatMul", ["features", "FC"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["scores"], axis=1),
    ]
    outputs = [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 10])]
    if embedding:
        nodes.append(helper.make_node("Identity", ["features"], ["embedding"]))
        outputs.append(helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, 2 * width]))
    graph = helper.make_graph(
        nodes, "edgefleet_cnn", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, size, size, 3])],
        outputs, initializer=[numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2"),
                              numpy_helper.from_array(fc, "FC")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="edgefleet")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path
