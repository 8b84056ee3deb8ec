"""Test material for batch scoring and Python models: a real scikit-learn pickle with its entry script,
tables of feature rows, and signed bundle directories built without a hub."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from modules.bundle import ROOT_FILE, build_manifest, read_blocks, sign_release, write_bundle_dir
from modules.examples import write_logreg_onnx
from protocol.encoding import canonical_json
from protocol.manifest import TensorSpec
from protocol.signing import make_root

ROOT = Path(__file__).resolve().parents[1]
N_FEATURES = 8
FEATURES = [f"f{i}" for i in range(N_FEATURES)]

# The Azure ML shape: init() loads the pickle from the one documented variable, run() answers.
SKLEARN_ENTRY = '''\
import os

import joblib
import numpy as np


def init():
    global model
    model = joblib.load(os.path.join(os.environ["EDGEFLEET_MODEL_DIR"], "clf", "model.joblib"))


def run(inputs):
    x = np.asarray(inputs["x"], dtype=np.float64)
    return {"label": model.predict(x), "proba": model.predict_proba(x)}
'''


def feature_rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, N_FEATURES))


def train_sklearn(model_dir: Path, seed: int = 0) -> Any:
    """A real classifier, saved the way operators do (joblib, in a model directory with a metadata file)."""
    import joblib
    from sklearn.ensemble import RandomForestClassifier

    x = feature_rows(600, seed)
    y = ((x[:, 0] - 0.5 * x[:, 1] + 0.3 * x[:, 2] ** 2) > 0.2).astype(np.int64) + (x[:, 3] > 1.0)
    clf = RandomForestClassifier(n_estimators=15, max_depth=6, random_state=seed).fit(x, y)
    model_dir.mkdir(parents=True, exist_ok=True)
    joblib.dump(clf, model_dir / "model.joblib")
    (model_dir / "meta.json").write_text(json.dumps({"features": FEATURES, "classes": clf.classes_.tolist()}))
    return clf


def write_table(path: Path, x: np.ndarray, ids: bool = True, row_group_size: int | None = None) -> Path:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    cols = {"id": pa.array(np.arange(len(x), dtype=np.int64))} if ids else {}
    cols |= {f"f{i}": pa.array(x[:, i]) for i in range(x.shape[1])}
    table = pa.table(cols)
    if path.suffix == ".csv":
        pacsv.write_csv(table, path)
    else:
        pq.write_table(table, path, row_group_size=row_group_size)
    return path


def sign_bundle(dest: Path, name: str, files: dict[str, Path], *, runtime: str, model: str, entry: str = "",
                inputs: list[TensorSpec] | None = None, outputs: list[TensorSpec] | None = None,
                sample: dict[str, Any] | None = None, version: int = 1) -> Path:
    """A signed bundle directory (release.json, files/, root.json) from files on disk, with fresh keys."""
    root_key, release_key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    root = make_root({"root": [root_key], "release": [release_key], "director": [release_key]}, [root_key])
    files = dict(files)
    if sample is not None:
        (dest.parent / f"{name}-sample.json").write_text(json.dumps(sample))
        files["sample.json"] = dest.parent / f"{name}-sample.json"
    manifest = build_manifest(name, version, runtime, files, model=model, entry=entry,
                              sample="sample.json" if sample is not None else "", inputs=inputs, outputs=outputs)
    envelope = sign_release(manifest, [release_key], int(time.time()) + 3600)
    write_bundle_dir(dest, envelope, lambda e: read_blocks(files[e.path]))
    (dest / ROOT_FILE).write_bytes(canonical_json(root))
    return dest


def onnx_bundle(dest: Path) -> Path:
    """The example logistic regression as a signed bundle."""
    from modules.examples import N_FEATURES as K

    model = write_logreg_onnx(dest.parent / "logreg.onnx")
    return sign_bundle(dest, "logreg", {"model.onnx": model}, runtime="onnx", model="model.onnx",
                       inputs=[TensorSpec(name="x", dtype="float32", shape=[None, K])],
                       outputs=[TensorSpec(name="probability", dtype="float32", shape=[None, 1])])


def sklearn_bundle(dest: Path, workdir: Path) -> tuple[Path, Any]:
    """The scikit-learn pickle (a model directory) with its entry script, as a signed python bundle."""
    clf = train_sklearn(workdir / "clf")
    (workdir / "score.py").write_text(SKLEARN_ENTRY)
    files = {"clf/model.joblib": workdir / "clf" / "model.joblib", "clf/meta.json": workdir / "clf" / "meta.json",
             "score.py": workdir / "score.py"}
    sample = {"inputs": {"x": feature_rows(2, 9).tolist()}}
    return sign_bundle(dest, "clf", files, runtime="python", model="clf/model.joblib", entry="score.py",
                       sample=sample), clf


def score_cli(*args: str, hub: Any = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``edgefleet [--hub URL --token T] score ARGS…`` in a subprocess."""
    pre = ["--hub", hub.url, "--token", hub.admin_token] if hub is not None else []
    return subprocess.run([sys.executable, "-m", "edgefleet", *pre, "score", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)
