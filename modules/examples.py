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
