"""Runners: load a bundle's model and serve ``predict(inputs)``; the same code on devices and in the cloud.

* ``onnx``   onnxruntime InferenceSession
* ``tflite`` ai-edge-litert (NumPy 2) or tflite-runtime 2.14 (NumPy 1), whichever imports
* ``python`` an entry script with ``init()`` and ``run(inputs) -> outputs`` (as in Azure ML); it finds
  the model's files (a pickle, a directory, ...) through ``EDGEFLEET_MODEL_DIR`` (modules.pymodel)

An optional entry script beside an ONNX/TFLite model may define ``preprocess``
and/or ``postprocess``. ``preprocess`` runs on the request's inputs *before* they are checked against
the model's own signature (so it may take a camera frame and resize it); the script may declare what it
accepts and what ``postprocess`` returns as ``INPUTS``/``OUTPUTS`` (lists of ``{"name", "dtype", "shape"}``),
which become the module's advertised signature (undeclared: free, checked only after ``preprocess``).
"""

from __future__ import annotations

import ctypes
import importlib.util
import inspect
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import numpy as np

from modules import accel
from modules.accel import CPU, TFLITE_CPU, TFLITE_DELEGATES, Choice
from modules.errors import InputError, ModelError
from modules.pymodel import MODEL_DIR_ENV
from modules.samples import observed_specs as observed_specs  # re-exported beside health_check
from modules.samples import sample_inputs
from modules.samples import sample_request as sample_request
from modules.tensors import check_inputs, describe_signature, dumps, loads, outputs_json  # noqa: F401 (re-exported)
from protocol.manifest import Manifest, TensorSpec
from protocol.schema import validate

CONFIG_ENV = "EDGEFLEET_CONFIG"  # the module's configuration as JSON, for code that reads it outside init()

Batch = dict[str, np.ndarray]


class Runner(Protocol):
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def predict(self, inputs: Batch) -> Batch: ...


def fits(shape: tuple[int, ...], spec: TensorSpec) -> bool:
    """``shape`` has the rank of ``spec`` and its size in every fixed dimension."""
    return len(shape) == len(spec.shape) and all(
        want is None or want < 0 or got == want for got, want in zip(shape, spec.shape, strict=True))


def coerce_inputs(raw: Any, specs: list[TensorSpec]) -> Batch:
    """Inputs checked against the signature (``modules.tensors.check_inputs``: the one validation), or InputError."""
    return check_inputs(raw, specs)


def as_batch(raw: Any, specs: list[TensorSpec]) -> Batch:
    """Inputs for a runner: checked against its signature, or (a python module without one) each value as an array."""
    return check_inputs(raw, specs)


def predict_json(runner: Runner, body: bytes) -> bytes:
    """A JSON body ``{"inputs": {...}}`` in, the outputs object as JSON out: the device's local API path."""
    doc = loads(body)
    raw = doc.get("inputs") if isinstance(doc, dict) else None
    return dumps(outputs_json(runner.predict(as_batch(raw, runner.inputs))))


def _dim(d: Any) -> int | None:
    return d if isinstance(d, int) and d >= 0 else None


_ONNX_TYPES = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(int64)": "int64",
               "tensor(int32)": "int32", "tensor(int16)": "int16", "tensor(int8)": "int8", "tensor(uint64)": "uint64",
               "tensor(uint32)": "uint32", "tensor(uint16)": "uint16", "tensor(uint8)": "uint8",
               "tensor(bool)": "bool", "tensor(string)": "str", "tensor(float16)": "float16"}


class OnnxRunner:
    """``providers``: the execution providers to try, most wanted first (modules/accel.py chooses them); the
    session is built with the first that loads, the rest of the list behind it. ``accelerator`` says which."""

    def __init__(self, model_path: Path, intra_op_threads: int = 1, providers: Sequence[str] = (CPU,),
                 notes: dict[str, str] | None = None, spin: bool = True) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = 1
        if not spin:  # idle threads sleep instead of busy-waiting for the next call: the cores are shared
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        order = list(providers) if providers and providers[-1] == CPU else [*providers, CPU]
        skipped = dict(notes or {})
        for i, first in enumerate(order):
            try:
                self.session = ort.InferenceSession(str(model_path), opts, providers=order[i:])
                break
            except Exception as exc:  # onnxruntime raises its own exception types per failure
                if first == CPU:
                    raise ModelError(f"onnxruntime could not load {model_path.name}: {exc}") from None
                skipped[first] = f"failed to start: {str(exc)[:200]}"
        self.accelerator = Choice(tuple(order), skipped).describe(self.session.get_providers()[0])
        self.inputs = [TensorSpec(name=i.name, dtype=_ONNX_TYPES.get(i.type, i.type), shape=[_dim(d) for d in i.shape])
                       for i in self.session.get_inputs()]
        self.outputs = [TensorSpec(name=o.name, dtype=_ONNX_TYPES.get(o.type, o.type), shape=[_dim(d) for d in o.shape])
                        for o in self.session.get_outputs()]
        self._output_names = [o.name for o in self.outputs]
    def predict(self, inputs: Batch) -> Batch:
        results = self.session.run(self._output_names, inputs)
        return dict(zip(self._output_names, (np.asarray(r) for r in results), strict=False))


def _tflite_interpreter(model_path: Path, delegates: Sequence[str] = (), threads: int | None = None,
                        notes: dict[str, str] | None = None) -> tuple[Any, str]:
    """The interpreter, with the first of ``delegates`` (modules/accel.py names) whose library loads, and what it
    runs on; the CPU kernels when none does."""
    errors = []
    for module_name in ("ai_edge_litert.interpreter", "tflite_runtime.interpreter"):
        try:
            mod = importlib.import_module(module_name)
        except ImportError as exc:
            errors.append(f"{module_name}: {exc}")
            continue
        skipped = dict(notes or {})
        for name in delegates:
            if name == TFLITE_CPU:
                break
            library = TFLITE_DELEGATES[name][0]
            try:
                ctypes.CDLL(library)  # found at all? (load_delegate's failure leaves a half-made object behind)
            except OSError as exc:
                skipped[name] = f"failed to start: {str(exc)[:200]}"
                continue
            try:
                delegate = mod.load_delegate(library)
                return mod.Interpreter(model_path=str(model_path), experimental_delegates=[delegate],
                                       num_threads=threads), name
            except Exception as exc:  # no such library, or the delegate refuses this model: the next one
                skipped[name] = f"failed to start: {str(exc)[:200]}"
        try:
            interpreter = mod.Interpreter(model_path=str(model_path), num_threads=threads)
        except Exception as exc:  # the interpreter raises ValueError/RuntimeError with its reason
            raise ModelError(f"{module_name} could not load {model_path.name}: {exc}") from None
        return interpreter, Choice((TFLITE_CPU,), skipped).describe(TFLITE_CPU)
    raise ModelError("no TFLite back end: pip install ai-edge-litert (NumPy 2) or tflite-runtime (NumPy 1); " + "; ".join(errors))


def _tflite_spec(d: dict[str, Any]) -> TensorSpec:
    """A tensor as the model declares it: ``shape_signature`` marks free dimensions with -1 (``shape`` is the
    allocated one); a back end without it (old tflite-runtime) leaves only the batch dimension free."""
    sig = d.get("shape_signature")
    if sig is not None and len(sig) == len(d["shape"]):
        shape = [None if int(x) < 0 else int(x) for x in sig]
    else:
        shape = [None if i == 0 else int(x) for i, x in enumerate(d["shape"])]
    return TensorSpec(name=d["name"], dtype=np.dtype(d["dtype"]).name, shape=shape)


class TfliteRunner:
    def __init__(self, model_path: Path, delegates: Sequence[str] = (), threads: int | None = None,
                 notes: dict[str, str] | None = None) -> None:
        self.interpreter, self.accelerator = _tflite_interpreter(model_path, delegates, threads, notes)
        try:  # where a model needs an op the runtime lacks (mediapipe's custom ops): refused at registration
            self.interpreter.allocate_tensors()
        except (RuntimeError, ValueError) as exc:
            raise ModelError(f"LiteRT could not prepare {model_path.name}: {str(exc).splitlines()[0]}") from None
        self._in = self.interpreter.get_input_details()
        self._out = self.interpreter.get_output_details()
        self.inputs = [_tflite_spec(d) for d in self._in]
        self.outputs = [_tflite_spec(d) for d in self._out]

    def predict(self, inputs: Batch) -> Batch:
        for spec in self.inputs:  # a fixed dimension (batch included) is never resized: refuse, as ONNX does
            if spec.name not in inputs or not fits(inputs[spec.name].shape, spec):
                got = list(inputs[spec.name].shape) if spec.name in inputs else "missing"
                raise InputError(f"input {spec.name!r} has shape {got}; expected {describe_signature(self.inputs)}")
        # The interpreter holds one shape at a time: resize to this request's where a free dimension differs.
        if any(tuple(d["shape"]) != inputs[d["name"]].shape for d in self._in):
            for d in self._in:
                self.interpreter.resize_tensor_input(d["index"], list(inputs[d["name"]].shape))
            self.interpreter.allocate_tensors()
            self._in = self.interpreter.get_input_details()
            self._out = self.interpreter.get_output_details()
        for d in self._in:
            self.interpreter.set_tensor(d["index"], inputs[d["name"]])
        self.interpreter.invoke()
        # get_tensor already returns a copy of its own (the next invoke cannot change it): no second one
        return {d["name"]: self.interpreter.get_tensor(d["index"]) for d in self._out}


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


def call_init(module: ModuleType, script: Path, config: Mapping[str, Any] | None) -> None:
    """The script's ``init()``, or ``init(config)`` if it takes an argument (the module's configuration, a dict
    of str -> str/int/bool, ``{}`` when none is set): the documented way module code reads its config."""
    init = getattr(module, "init", None)
    if not callable(init):
        return
    try:
        takes = len(inspect.signature(init).parameters) > 0
    except (TypeError, ValueError):
        takes = False
    try:
        init(dict(config or {})) if takes else init()
    except Exception as exc:
        raise ModelError(f"entry script {script.name} init() failed: {exc!r}") from None


class PythonRunner:
    """``init()`` once, then ``run(inputs: dict[str, ndarray]) -> dict[str, ndarray]``.

    ``EDGEFLEET_MODEL_DIR`` names ``model_dir`` (the bundle's files) while the script is imported and
    its ``init()`` runs: that is where it finds its model. Each runner has a process of its own on a
    device, an endpoint and in batch, so the variable is that process's.
    """

    accelerator = "python"

    def __init__(self, script: Path, inputs: list[TensorSpec], outputs: list[TensorSpec],
                 model_dir: Path | None = None, config: Mapping[str, Any] | None = None) -> None:
        os.environ[MODEL_DIR_ENV] = str((model_dir or script.parent).resolve())
        self.module = _load_script(script)
        if not callable(getattr(self.module, "run", None)):
            raise ModelError(f"entry script {script.name} defines no run(inputs)")
        call_init(self.module, script, config)
        self.inputs, self.outputs = inputs, outputs

    def predict(self, inputs: Batch) -> Batch:
        out = self.module.run(inputs)
        if not isinstance(out, dict):
            raise ModelError(f"run() returned {type(out).__name__}; it must return a dict of output name -> array")
        return {k: np.asarray(v) for k, v in out.items()}


def declared_specs(module: ModuleType, attr: str) -> list[TensorSpec] | None:
    """An entry script's ``INPUTS``/``OUTPUTS`` declaration as specs, None when it declares none."""
    raw = getattr(module, attr, None)
    if raw is None:
        return None
    try:
        return [validate(TensorSpec, s) for s in raw]
    except (TypeError, ValueError) as exc:
        raise ModelError(f"entry script's {attr} is not a list of {{name, dtype, shape}}: {exc}") from None


class WithEntry:
    """Wraps a model runner with an entry script's optional ``preprocess``/``postprocess``.

    The request meets ``preprocess`` first; only its result is checked against the model's own inputs.
    ``inputs``/``outputs`` are what the script declares (``INPUTS``/``OUTPUTS``), the model's where the
    script leaves that side alone, and free (``[]``) where it transforms it without saying how.
    """

    def __init__(self, inner: Runner, script: Path, config: Mapping[str, Any] | None = None) -> None:
        self.inner = inner
        self.accelerator = getattr(inner, "accelerator", "")
        module = _load_script(script)
        call_init(module, script, config)
        self.pre: Callable[[Batch], Batch] | None = getattr(module, "preprocess", None)
        self.post: Callable[[Batch], Batch] | None = getattr(module, "postprocess", None)
        declared_in, declared_out = declared_specs(module, "INPUTS"), declared_specs(module, "OUTPUTS")
        self.inputs = declared_in if declared_in is not None else [] if self.pre else inner.inputs
        self.outputs = declared_out if declared_out is not None else [] if self.post else inner.outputs

    def predict(self, inputs: Batch) -> Batch:
        if self.pre is not None:
            inputs = self.pre(inputs)
            if not isinstance(inputs, dict):
                raise ModelError(f"preprocess() returned {type(inputs).__name__}; it must return a dict of arrays")
            try:
                inputs = coerce_inputs(_to_model_dtypes(inputs, self.inner.inputs), self.inner.inputs)
            except InputError as exc:
                raise InputError(f"after preprocess: {exc}") from None
        out = self.inner.predict(inputs)
        if self.post is not None:
            out = self.post(out)
            if not isinstance(out, dict):
                raise ModelError(f"postprocess() returned {type(out).__name__}; it must return a dict of arrays")
            out = {k: np.asarray(v) for k, v in out.items()}
        return out


def _to_model_dtypes(inputs: Batch, specs: list[TensorSpec]) -> Batch:
    """The entry script's own arrays in the model's dtypes where the cast keeps their kind (float64 -> float32).

    Only a client's tensors are never cast (modules/tensors.py); what ``preprocess`` makes is module code, which
    commonly computes in NumPy's default float64 for a float32 model.
    """
    out = dict(inputs)
    for spec in specs:
        v = out.get(spec.name)
        if isinstance(v, np.ndarray) and spec.dtype != "str" and v.dtype != np.dtype(spec.dtype) \
                and np.can_cast(v.dtype, spec.dtype, casting="same_kind"):
            out[spec.name] = v.astype(spec.dtype)
    return out


def load_model_file(path: Path, runtime: str, config: Mapping[str, Any] | None = None,
                    facts: Mapping[str, str] | None = None, *, spin: bool = True) -> Runner:
    """Load one model file in its runtime, on the accelerator its ``config`` prefers and the device (``facts``)
    has, falling back in order to the CPU (modules/accel.py). The registry loads with neither: CPU, 1 thread."""
    try:
        prefs = accel.preferences(config)
    except accel.AccelError as exc:
        raise ModelError(str(exc)) from None
    if runtime == "onnx":
        import onnxruntime as ort

        choice = accel.choose("onnx", prefs, ort.get_available_providers(), facts or {})
        return OnnxRunner(path, choice.threads, choice.order, choice.skipped, spin=spin)
    if runtime == "tflite":
        choice = accel.choose("tflite", prefs, list(TFLITE_DELEGATES), facts or {})
        return TfliteRunner(path, choice.order, choice.threads if config and "threads" in config else None,
                            choice.skipped)
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


def load_runner(bundle_dir: Path, manifest: Manifest, config: Mapping[str, Any] | None = None,
                facts: Mapping[str, str] | None = None, *, spin: bool = True) -> Runner:
    """Load an unpacked, verified bundle with the module's configuration (the desired state's ``config``:
    handed to the script's ``init(config)`` and in ``EDGEFLEET_CONFIG``; its accelerator keys pick the
    hardware, see modules/accel.py) on a device with ``facts``. ``spin`` false: ONNX Runtime's idle threads
    sleep rather than busy-wait (batch scoring, whose reader and writer threads need those cores)."""
    os.environ[CONFIG_ENV] = json.dumps(dict(config or {}), sort_keys=True)
    if manifest.runtime == "python":
        # the entry script, when the bundle has one apart from its model files; else the model is the script
        script = manifest.entry or manifest.model
        if not script.endswith(".py"):
            raise ModelError(f"python module {manifest.name}:{manifest.version} has no entry script "
                             f"({script!r} is not a .py file): build it with --entry SCRIPT")
        return PythonRunner(bundle_dir / script, manifest.inputs, manifest.outputs, model_dir=bundle_dir,
                            config=config)
    runner = load_model_file(bundle_dir / manifest.model, manifest.runtime, config, facts, spin=spin)
    if manifest.entry:
        return WithEntry(runner, bundle_dir / manifest.entry, config)
    return runner


def load_sample(bundle_dir: Path, manifest: Manifest) -> dict[str, Any] | None:
    if not manifest.sample:
        return None
    return json.loads((bundle_dir / manifest.sample).read_text())


def health_check(runner: Runner, sample: dict[str, Any] | None) -> Batch:
    """Run the bundle's sample input, or without one an input generated from the runner's signature; raise
    ModelError/InputError if it fails or gives non-finite output. Nothing to run only for a signature-less script."""
    if sample is None:
        generated = sample_inputs(runner.inputs)
        if generated is None:
            return {}
        batch, expected = generated, None
    else:
        batch, expected = as_batch(sample.get("inputs", {}), runner.inputs), sample.get("expected")
    try:
        out = runner.predict(batch)
    except (InputError, ModelError):
        raise
    except Exception as exc:
        raise ModelError(f"{'sample' if sample is not None else 'generated sample'} inference failed: {exc!r}") from None
    for name, arr in out.items():
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise ModelError(f"sample inference gave non-finite values in output {name!r}")
    if isinstance(expected, dict):
        for name, want in expected.items():
            got = out.get(name)
            if got is None or not np.allclose(np.asarray(got, dtype=float), np.asarray(want, dtype=float), atol=1e-4):
                raise ModelError(f"sample output {name!r} differs from the expected value")
    return out
