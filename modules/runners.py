"""Runners: load a bundle's model and serve ``predict(inputs)``; the same code on devices and in the cloud.

* ``onnx``   onnxruntime InferenceSession
* ``tflite`` ai-edge-litert (NumPy 2) or tflite-runtime 2.14 (NumPy 1), whichever imports
* ``python`` an entry script with ``init()`` and ``run(inputs) -> outputs`` (as in Azure ML); it finds
  the model's files (a pickle, a directory, ...) through ``EDGEFLEET_MODEL_DIR`` (modules.pymodel)

An optional entry script beside an ONNX/TFLite model may define ``preprocess``
and/or ``postprocess``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import numpy as np

from modules.errors import BodyError, InputError, ModelError
from modules.pymodel import MODEL_DIR_ENV
from protocol.manifest import Manifest, TensorSpec

Batch = dict[str, np.ndarray]


class Runner(Protocol):
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def predict(self, inputs: Batch) -> Batch: ...


def describe_signature(specs: list[TensorSpec]) -> str:
    return ", ".join(f"{s.name}: {s.dtype}{[d if d is not None else 'N' for d in s.shape]}" for s in specs)


def coerce_inputs(raw: dict[str, Any], specs: list[TensorSpec]) -> Batch:
    """Turn JSON-ish inputs into arrays of the declared dtype and shape, or raise InputError."""
    if not isinstance(raw, dict):
        raise InputError(f"inputs must be an object keyed by input name; expected {describe_signature(specs)}")
    missing = [s.name for s in specs if s.name not in raw]
    if missing:
        raise InputError(f"missing input(s) {missing}; expected {describe_signature(specs)}")
    out: Batch = {}
    for spec in specs:
        try:
            arr = np.asarray(raw[spec.name], dtype=spec.dtype)
        except (TypeError, ValueError) as exc:
            raise InputError(f"input {spec.name!r} is not {spec.dtype}: {exc}") from None
        if arr.ndim != len(spec.shape) or any(
            want is not None and want >= 0 and got != want for got, want in zip(arr.shape, spec.shape, strict=False)
        ):
            raise InputError(f"input {spec.name!r} has shape {list(arr.shape)}; expected {describe_signature(specs)}")
        out[spec.name] = arr
    return out


def as_batch(raw: Any, specs: list[TensorSpec]) -> Batch:
    """Inputs for a runner: coerced to its signature, or (a python module without one) each value as an array."""
    if specs:
        return coerce_inputs(raw, specs)
    if not isinstance(raw, dict):
        raise InputError("inputs must be an object keyed by input name")
    out: Batch = {}
    for name, value in raw.items():
        try:
            out[name] = np.asarray(value)
        except ValueError as exc:  # ragged nested lists
            raise InputError(f"input {name!r} is not an array: {exc}") from None
    return out


def predict_json(runner: Runner, body: bytes) -> bytes:
    """A JSON body ``{"inputs": {...}}`` in, the outputs object as JSON out: the device's local API path."""
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise BodyError(f"body is not JSON: {exc}") from None
    raw = doc.get("inputs") if isinstance(doc, dict) else None
    out = runner.predict(as_batch(raw, runner.inputs))
    return json.dumps({k: v.tolist() for k, v in out.items()}).encode()


def _dim(d: Any) -> int | None:
    return d if isinstance(d, int) and d >= 0 else None


_ONNX_TYPES = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(int64)": "int64",
               "tensor(int32)": "int32", "tensor(uint8)": "uint8", "tensor(int8)": "int8",
               "tensor(bool)": "bool", "tensor(string)": "str", "tensor(float16)": "float16"}


class OnnxRunner:
    def __init__(self, model_path: Path, intra_op_threads: int = 1) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types per failure
            raise ModelError(f"onnxruntime could not load {model_path.name}: {exc}") from None
        self.inputs = [TensorSpec(name=i.name, dtype=_ONNX_TYPES.get(i.type, i.type), shape=[_dim(d) for d in i.shape])
                       for i in self.session.get_inputs()]
        self.outputs = [TensorSpec(name=o.name, dtype=_ONNX_TYPES.get(o.type, o.type), shape=[_dim(d) for d in o.shape])
                        for o in self.session.get_outputs()]
        self._output_names = [o.name for o in self.outputs]

    def predict(self, inputs: Batch) -> Batch:
        results = self.session.run(self._output_names, inputs)
        return dict(zip(self._output_names, (np.asarray(r) for r in results), strict=False))


def _tflite_interpreter(model_path: Path) -> Any:
    errors = []
    for module_name in ("ai_edge_litert.interpreter", "tflite_runtime.interpreter"):
        try:
            mod = importlib.import_module(module_name)
        except ImportError as exc:
            errors.append(f"{module_name}: {exc}")
            continue
        try:
            return mod.Interpreter(model_path=str(model_path))
        except Exception as exc:  # the interpreter raises ValueError/RuntimeError with its reason
            raise ModelError(f"{module_name} could not load {model_path.name}: {exc}") from None
    raise ModelError("no TFLite back end: pip install ai-edge-litert (NumPy 2) or tflite-runtime (NumPy 1); " + "; ".join(errors))


class TfliteRunner:
    def __init__(self, model_path: Path) -> None:
        self.interpreter = _tflite_interpreter(model_path)
        self.interpreter.allocate_tensors()
        self._in = self.interpreter.get_input_details()
        self._out = self.interpreter.get_output_details()
        self.inputs = [TensorSpec(name=d["name"], dtype=np.dtype(d["dtype"]).name,
                                  shape=[None if i == 0 else int(x) for i, x in enumerate(d["shape"])]) for d in self._in]
        self.outputs = [TensorSpec(name=d["name"], dtype=np.dtype(d["dtype"]).name,
                                   shape=[None if i == 0 else int(x) for i, x in enumerate(d["shape"])]) for d in self._out]

    def predict(self, inputs: Batch) -> Batch:
        first = inputs[self._in[0]["name"]]
        # The interpreter has fixed shapes: resize to this batch when it differs.
        if tuple(self._in[0]["shape"]) != first.shape:
            for d in self._in:
                self.interpreter.resize_tensor_input(d["index"], list(inputs[d["name"]].shape))
            self.interpreter.allocate_tensors()
            self._in = self.interpreter.get_input_details()
            self._out = self.interpreter.get_output_details()
        for d in self._in:
            self.interpreter.set_tensor(d["index"], inputs[d["name"]])
        self.interpreter.invoke()
        return {d["name"]: self.interpreter.get_tensor(d["index"]).copy() for d in self._out}


def _load_script(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"edgefleet_entry_{abs(hash(str(path)))}", path)
    if spec is None or spec.loader is None:
        raise ModelError(f"cannot import entry script {path}")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise ModelError(f"entry script {path.name} failed to import: {exc!r}") from None
    return module


class PythonRunner:
    """``init()`` once, then ``run(inputs: dict[str, ndarray]) -> dict[str, ndarray]``.

    ``EDGEFLEET_MODEL_DIR`` names ``model_dir`` (the bundle's files) while the script is imported and
    its ``init()`` runs: that is where it finds its model. Each runner has a process of its own on a
    device, an endpoint and in batch, so the variable is that process's.
    """

    def __init__(self, script: Path, inputs: list[TensorSpec], outputs: list[TensorSpec],
                 model_dir: Path | None = None) -> None:
        os.environ[MODEL_DIR_ENV] = str((model_dir or script.parent).resolve())
        self.module = _load_script(script)
        if not callable(getattr(self.module, "run", None)):
            raise ModelError(f"entry script {script.name} defines no run(inputs)")
        init = getattr(self.module, "init", None)
        if callable(init):
            try:
                init()
            except Exception as exc:
                raise ModelError(f"entry script {script.name} init() failed: {exc!r}") from None
        self.inputs, self.outputs = inputs, outputs

    def predict(self, inputs: Batch) -> Batch:
        out = self.module.run(inputs)
        if not isinstance(out, dict):
            raise ModelError(f"run() returned {type(out).__name__}; it must return a dict of output name -> array")
        return {k: np.asarray(v) for k, v in out.items()}


class WithEntry:
    """Wraps a model runner with an entry script's optional ``preprocess``/``postprocess``."""

    def __init__(self, inner: Runner, script: Path) -> None:
        self.inner = inner
        module = _load_script(script)
        identity: Callable[[Batch], Batch] = lambda b: b  # noqa: E731
        self.pre = getattr(module, "preprocess", identity)
        self.post = getattr(module, "postprocess", identity)
        self.inputs, self.outputs = inner.inputs, inner.outputs

    def predict(self, inputs: Batch) -> Batch:
        return self.post(self.inner.predict(self.pre(inputs)))


def load_model_file(path: Path, runtime: str) -> Runner:
    """Load one model file in its runtime (used by the registry to check and describe models)."""
    if runtime == "onnx":
        return OnnxRunner(path)
    if runtime == "tflite":
        return TfliteRunner(path)
    if runtime == "python":
        return PythonRunner(path, [], [])
    raise ModelError(f"unknown runtime {runtime!r}")


def detect_runtime(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix == ".tflite":
        return "tflite"
    if suffix == ".py":
        return "python"
    raise ModelError(f"cannot tell the framework of {path.name}: expected .onnx, .tflite or .py")


def load_runner(bundle_dir: Path, manifest: Manifest) -> Runner:
    """Load an unpacked, verified bundle."""
    if manifest.runtime == "python":
        # the entry script, when the bundle has one apart from its model files; else the model is the script
        script = manifest.entry or manifest.model
        if not script.endswith(".py"):
            raise ModelError(f"python module {manifest.name}:{manifest.version} has no entry script "
                             f"({script!r} is not a .py file): build it with --entry SCRIPT")
        return PythonRunner(bundle_dir / script, manifest.inputs, manifest.outputs, model_dir=bundle_dir)
    runner = load_model_file(bundle_dir / manifest.model, manifest.runtime)
    if manifest.entry:
        return WithEntry(runner, bundle_dir / manifest.entry)
    return runner


def load_sample(bundle_dir: Path, manifest: Manifest) -> dict[str, Any] | None:
    if not manifest.sample:
        return None
    return json.loads((bundle_dir / manifest.sample).read_text())


def health_check(runner: Runner, sample: dict[str, Any] | None) -> Batch:
    """Run the bundle's sample input; raise ModelError/InputError if it fails or gives non-finite output."""
    if sample is None:
        return {}
    batch = as_batch(sample.get("inputs", {}), runner.inputs)
    try:
        out = runner.predict(batch)
    except (InputError, ModelError):
        raise
    except Exception as exc:
        raise ModelError(f"sample inference failed: {exc!r}") from None
    for name, arr in out.items():
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise ModelError(f"sample inference gave non-finite values in output {name!r}")
    expected = sample.get("expected")
    if isinstance(expected, dict):
        for name, want in expected.items():
            got = out.get(name)
            if got is None or not np.allclose(np.asarray(got, dtype=float), np.asarray(want, dtype=float), atol=1e-4):
                raise ModelError(f"sample output {name!r} differs from the expected value")
    return out
