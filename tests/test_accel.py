"""Accelerator choice (modules/accel.py), pure and exhaustive; then real onnxruntime and LiteRT on this CPU-only
machine: a preference for an unavailable provider or delegate falls back to the CPU and says why."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from modules import accel
from modules.accel import CPU, Preferences, choose, preferences
from modules.examples import write_logreg_onnx
from modules.runners import ModelError, load_model_file

TFLITE = Path(__file__).resolve().parents[1] / "tests" / "data" / "hand_recrop.tflite"
ORT_GPU = ["TensorrtExecutionProvider", "CUDAExecutionProvider", CPU]


@pytest.mark.parametrize("wanted, available, facts, order, skipped", [
    ((), [CPU], {}, (CPU,), {}),  # no preference: CPU, as before
    (("cuda",), ORT_GPU, {}, ("CUDAExecutionProvider", CPU), {}),  # alias; the runtime offers it; no hardware fact
    (("tensorrt", "cuda"), ORT_GPU, {"accelerators": "cuda"}, ("TensorrtExecutionProvider", "CUDAExecutionProvider",
                                                                CPU), {}),  # preference order kept
    (("cuda",), [CPU], {}, (CPU,), {"cuda": "not available in this runtime build"}),
    (("cuda",), ORT_GPU, {"accelerators": "npu"}, (CPU,),
     {"cuda": "the device does not list 'cuda' in its accelerators fact"}),
    (("cuda",), ORT_GPU, {"accelerators": ""}, (CPU,),
     {"cuda": "the device does not list 'cuda' in its accelerators fact"}),
    (("warp-drive",), ORT_GPU, {}, (CPU,), {"warp-drive": "unknown accelerator"}),
    (("CUDAExecutionProvider", "cuda", "cpu"), ORT_GPU, {}, ("CUDAExecutionProvider", CPU), {}),  # de-duplicated
    (("xnnpack",), ["XnnpackExecutionProvider", CPU], {"accelerators": ""}, ("XnnpackExecutionProvider", CPU), {}),
    (("cpu", "cuda"), ORT_GPU, {}, ("CUDAExecutionProvider", CPU), {}),  # the CPU is always last
])
def test_onnx_choice(wanted, available, facts, order, skipped):
    got = choose("onnx", Preferences(tuple(wanted)), available, facts)
    assert got.order == order and got.skipped == skipped


@pytest.mark.parametrize("wanted, facts, order, skipped", [
    ((), {}, ("cpu",), {}),
    (("edgetpu", "gpu"), {"accelerators": "gpu"}, ("gpu", "cpu"),
     {"edgetpu": "the device does not list 'edgetpu' in its accelerators fact"}),
    (("gpu",), {}, ("gpu", "cpu"), {}),
    (("xnnpack", "cuda"), {}, ("cpu",), {"cuda": "unknown accelerator"}),
])
def test_tflite_choice(wanted, facts, order, skipped):
    got = choose("tflite", Preferences(tuple(wanted)), list(accel.TFLITE_DELEGATES), facts)
    assert got.order == order and got.skipped == skipped


def test_python_runtime_has_no_accelerators():
    got = choose("python", Preferences(("cuda",)), [], {})
    assert got.order == ("cpu",) and got.skipped == {"cuda": "the python runtime has no accelerators"}


@pytest.mark.parametrize("config, prefs", [
    (None, Preferences()), ({}, Preferences()), ({"accelerators": " cuda, ,tensorrt ", "threads": "4"},
                                                 Preferences(("cuda", "tensorrt"), 4)),
    ({"threads": 2, "labels": "a,b"}, Preferences((), 2)),
])
def test_preferences_from_config(config, prefs):
    assert preferences(config) == prefs


@pytest.mark.parametrize("config, why", [
    ({"threads": "many"}, "threads must be an integer"), ({"threads": 0}, "threads must be 1..64"),
    ({"threads": 65}, "threads must be 1..64"), ({"accelerators": 3}, "accelerators must be a comma-separated"),
])
def test_bad_preferences_are_refused_with_the_reason(config, why):
    with pytest.raises(accel.AccelError, match=why):
        preferences(config)


def test_describe_names_the_one_in_use_and_why_not_the_others():
    c = choose("onnx", Preferences(("cuda",)), [CPU], {})
    assert c.describe(CPU) == "CPUExecutionProvider (cuda: not available in this runtime build)"
    assert choose("onnx", Preferences(), [CPU], {}).describe(CPU) == CPU


def test_onnxruntime_falls_back_to_cpu_and_reports_it(tmp_path):
    model = write_logreg_onnx(tmp_path / "m.onnx")
    runner = load_model_file(model, "onnx", {"accelerators": "cuda,openvino", "threads": 2}, {"accelerators": "cuda"})
    assert runner.accelerator == ("CPUExecutionProvider (cuda: not available in this runtime build; openvino: "
                                  "not available in this runtime build)")
    assert runner.session.get_providers() == [CPU]
    assert runner.session.get_session_options().intra_op_num_threads == 2
    out = runner.predict({"x": np.zeros((1, 4), np.float32)})
    assert out["probability"].shape == (1, 1)
    assert load_model_file(model, "onnx").accelerator == CPU
    with pytest.raises(ModelError, match="threads must be 1..64"):
        load_model_file(model, "onnx", {"threads": 100})


def test_litert_delegate_that_does_not_load_falls_back_to_cpu(tmp_path):
    runner = load_model_file(TFLITE, "tflite", {"accelerators": "gpu", "threads": 2}, {})
    assert runner.accelerator.startswith("cpu (gpu: failed to start: ")
    out = runner.predict({"input_1": np.zeros((1, 256, 256, 3), np.float32)})
    assert out["output_crop"].shape == (1, 1, 1, 4)
