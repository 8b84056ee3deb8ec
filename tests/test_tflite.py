"""A real TFLite model (tests/data/hand_recrop.tflite, from the mediapipe wheel) registers, bundles, verifies and
predicts; the one TfliteRunner is tested on both back ends: ai-edge-litert here (NumPy 2) and tflite-runtime 2.14 in
a NumPy-1 virtualenv that the test creates once under a cache directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from edgefleet.client import HubClient
from modules.bundle import FILES_DIR
from modules.runners import InputError, TfliteRunner, load_runner

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "tests" / "data" / "hand_recrop.tflite"
CACHE = Path(os.environ.get("EDGEFLEET_CACHE", Path.home() / ".cache" / "edgefleet"))
VENV = CACHE / "venv-tflite-runtime-2.14"
VENV_PACKAGES = ["tflite-runtime==2.14.0", "numpy<2", "msgspec>=0.18"]


def rng_input() -> np.ndarray:
    return np.random.default_rng(0).random((1, 256, 256, 3), dtype=np.float32)


def test_litert_backend_registers_bundles_verifies_predicts(server, tmp_path):
    try:
        import ai_edge_litert.interpreter  # noqa: F401
    except ImportError:
        pytest.fail("ai-edge-litert is missing: pip install -e '.[test]' (or pip install ai-edge-litert)")
    headers = {"Authorization": f"Bearer {server.admin_token}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as c:
        r = c.post("/api/v1/models", data={"name": "hand-recrop"},
                   files=[("files", (MODEL.name, MODEL.read_bytes(), "application/octet-stream"))])
        assert r.status_code == 200, r.text
        model = r.json()
        assert model["framework"] == "tflite"
        assert model["inputs"] == [{"name": "input_1", "dtype": "float32", "shape": [1, 256, 256, 3]}]  # batch fixed
        built = c.post("/api/v1/modules", json={"name": "recrop", "models": ["hand-recrop:1"]}).json()
        assert built["runtime"] == "tflite"
    dest = tmp_path / "bundle"
    with HubClient(server.url, server.admin_token) as hc:
        manifest = hc.pull_bundle("recrop", 1, dest)
    runner = load_runner(dest / FILES_DIR, manifest)
    assert isinstance(runner, TfliteRunner)
    assert type(runner.interpreter).__module__.startswith("ai_edge_litert")
    out = runner.predict({"input_1": rng_input()})["output_crop"]
    assert out.shape == (1, 1, 1, 4) and np.all(np.isfinite(out))
    with pytest.raises(InputError, match="expected input_1: float32"):  # its batch is fixed at 1: never resized
        runner.predict({"input_1": np.concatenate([rng_input(), rng_input()])})


def ensure_venv() -> Path:
    python = VENV / "bin" / "python"
    marker = VENV / ".edgefleet-ready"
    if marker.exists() and marker.read_text() == json.dumps(VENV_PACKAGES):
        return python
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True, capture_output=True,
                       timeout=120)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *VENV_PACKAGES], check=True, capture_output=True,
                       timeout=280)
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"could not create the NumPy-1 venv at {VENV} with {VENV_PACKAGES} (needs PyPI): "
                    f"{exc.stderr.decode(errors='replace')[-800:]}")
    marker.write_text(json.dumps(VENV_PACKAGES))
    return python


SCRIPT = """
import json, sys
from pathlib import Path
import numpy as np
from modules.runners import TfliteRunner
runner = TfliteRunner(Path(sys.argv[1]))
x = np.random.default_rng(0).random((1, 256, 256, 3), dtype=np.float32)
out = runner.predict({"input_1": x})["output_crop"]
print(json.dumps({"numpy": np.__version__, "backend": type(runner.interpreter).__module__,
                  "inputs": [s.to_dict() for s in runner.inputs], "out": out.ravel().tolist()}))
"""


@pytest.mark.timeout(600)
def test_tflite_runtime_backend_under_numpy_1(tmp_path):
    python = ensure_venv()
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), "HOME": str(Path.home())}
    proc = subprocess.run([str(python), "-c", SCRIPT, str(MODEL)], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["numpy"].startswith("1.") and got["backend"].startswith("tflite_runtime")
    assert got["inputs"] == [{"name": "input_1", "dtype": "float32", "shape": [1, 256, 256, 3]}]
    here = TfliteRunner(MODEL).predict({"input_1": rng_input()})["output_crop"].ravel()
    assert np.allclose(np.asarray(got["out"]), here, atol=1e-4)  # both back ends agree
