#!/usr/bin/env python3
"""Train the example churn model and write what the pipeline needs (examples/ci/pipeline.sh runs this).

    python examples/ci/train.py --out DIR [--seed N] [--trainer auto|sklearn|numpy]

writes DIR/model.onnx, DIR/eval.csv (a held-out set with its label ``y``, the same rows every run so
versions are compared on the same data), DIR/sample.json (the bundle's health-check input),
DIR/baseline.json (reference inputs for drift monitoring) and DIR/train.json (what was done).

The data stands in for your feature store: four features drawn N(0, 1) (as the simulated fleet
sends them) and a label from a fixed linear rule plus noise. Training uses scikit-learn and converts
with skl2onnx when both are installed (``--trainer sklearn`` insists), else NumPy gradient descent
written as ONNX by ``modules.examples``.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

FEATURES = 4
TRUE_W = np.array([1.5, -2.0, 0.5, 1.0])
EVAL_SEED = 1_000_003  # the held-out set never changes, so its sha256 (and recorded metrics) carry across runs


def draw(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 1.0, size=(n, FEATURES)).astype(np.float32)
    y = (x @ TRUE_W + 0.3 * rng.normal(size=n) > 0).astype(np.int64)
    return x, y


def train_sklearn(x: np.ndarray, y: np.ndarray, out: Path) -> str:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=500).fit(x, y)
    # zipmap off: outputs are a label tensor and an [N, 2] probability tensor (what devices and evaluate read)
    onx = convert_sklearn(clf, initial_types=[("x", FloatTensorType([None, FEATURES]))],
                          options={id(clf): {"zipmap": False}}, target_opset={"": 15, "ai.onnx.ml": 3})
    out.write_bytes(onx.SerializeToString())
    return "sklearn"


def train_numpy(seed: int, out: Path) -> str:
    from modules.examples import write_logreg_onnx

    write_logreg_onnx(out, seed=seed)
    return "numpy"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=1, help="which training sample (e.g. the CI run number)")
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--trainer", choices=("auto", "sklearn", "numpy"), default="auto")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    x, y = draw(args.seed, args.rows)
    model = args.out / "model.onnx"
    trainer = args.trainer
    if trainer == "auto":
        try:
            import skl2onnx  # noqa: F401
            import sklearn  # noqa: F401
            trainer = "sklearn"
        except ImportError:
            trainer = "numpy"
    used = train_sklearn(x, y, model) if trainer == "sklearn" else train_numpy(args.seed, model)

    ex, ey = draw(EVAL_SEED, 1000)
    with (args.out / "eval.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([f"x{i}" for i in range(FEATURES)] + ["y"])
        w.writerows(row + [label] for row, label in zip(ex.round(5).tolist(), ey.tolist()))
    (args.out / "sample.json").write_text(json.dumps({"inputs": {"x": x[:2].round(4).tolist()}}))
    (args.out / "baseline.json").write_text(json.dumps({"inputs": {"x": x[:2000].round(4).tolist()}}))
    info = {"trainer": used, "seed": args.seed, "rows": args.rows, "model": str(model)}
    (args.out / "train.json").write_text(json.dumps(info))
    print(f"trained with {used} on {args.rows} rows (seed {args.seed}): {model}")


if __name__ == "__main__":
    main()
