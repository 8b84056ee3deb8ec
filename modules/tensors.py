"""Tensors in and out of a request: one decoding, one validation and one encoding for every way in.

The device's local API and direct socket (through ``agent/worker.py``) and the web endpoints' workers
(``hub.endpoints.worker``) all call this, so a request gets the same answer, status and words on the
web and on a device. Three request forms:

* ``v1`` JSON ``{"inputs": {name: nested lists}}`` (the ``/predict`` and ``/score`` routes)
* ``v1`` ``.npy``: ``Content-Type: application/x-npy``, one array, ``X-Input: NAME`` unless the model
  has one input; ``Accept: application/x-npy`` asks a single-output model for a ``.npy`` answer
* ``v2``: the Open Inference Protocol, JSON or its binary-data extension (a JSON header of
  ``Inference-Header-Content-Length`` bytes, then each binary input's raw bytes in order)

Validation (:func:`check_inputs`): every input present and none unknown, the declared shape, the
declared dtype (a typed tensor of another dtype is refused, never cast; JSON numbers are converted
only where no value changes), and finite values in float inputs. Failures raise ``InputError`` (422);
a body that is not JSON raises ``BodyError`` (400).
"""

from __future__ import annotations

import functools
import io
import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from modules.errors import BodyError, InputError, NotAcceptable
from modules.oip import DATATYPES, DTYPES
from modules.shmregions import Region
from protocol.manifest import TensorSpec

Batch = dict[str, np.ndarray]
NPY = "application/x-npy"
JSON = "application/json"

try:  # several times faster than json on large bodies, and writes NumPy arrays directly
    import orjson

    def dumps(obj: Any) -> bytes:
        return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)

    def loads(body: bytes) -> Any:
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            return _loads_slow(body)  # NaN/Infinity literals: parsed, then refused by the finite check
except ImportError:  # pragma: no cover - orjson is a dependency; this keeps a bare device working
    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":"), default=_listed).encode()

    def loads(body: bytes) -> Any:
        return _loads_slow(body)


def _listed(obj: Any) -> Any:
    if isinstance(obj, np.ndarray | np.generic):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _loads_slow(body: bytes) -> Any:
    try:
        return json.loads(body if isinstance(body, bytes | bytearray) else bytes(body))  # a memoryview too
    except (ValueError, UnicodeDecodeError) as exc:
        raise BodyError(f"body is not JSON: {exc}") from None


@dataclass
class Form:
    """How a request came and how it wants its answer (the HTTP details the decoder needs)."""

    kind: str = "v1"  # "v1": /predict, /score; "v2": OIP infer
    ctype: str = JSON
    accept: str = ""
    header_length: int = -1  # v2 binary extension: the JSON header's size; -1 none
    input_name: str = ""  # v1 .npy body: the input it is (X-Input)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "ctype": self.ctype, "accept": self.accept, "hlen": self.header_length,
                "input": self.input_name}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Form:
        return cls(str(d.get("kind", "v1")), str(d.get("ctype", JSON)), str(d.get("accept", "")),
                   int(d.get("hlen", -1)), str(d.get("input", "")))


@dataclass
class Decoded:
    """A request's inputs, checked, and what its answer should look like."""

    inputs: Batch
    form: Form
    id: str = ""
    binary: bool = False  # v2: outputs as raw bytes unless a requested output says otherwise
    requested: dict[str, bool | None] = field(default_factory=dict)  # v2: outputs asked for -> binary (None: default)
    shm_out: dict[str, tuple[str, memoryview]] = field(default_factory=dict)  # v2: output -> its region and bytes


# Looked up by the dtype itself: ``dtype.name`` is a Python-level property in NumPy 2, a measurable cost on the
# per-request path where the caches are cold after the model ran.
_DATATYPE = {np.dtype(k): v for k, v in DATATYPES.items() if k != "str"}


@functools.cache
def _dtype(name: str) -> np.dtype[Any] | None:
    """A signature's dtype by name, made once (None: strings)."""
    return None if name == "str" else np.dtype(name)


def describe_signature(specs: list[TensorSpec]) -> str:
    return ", ".join(f"{s.name}: {s.dtype}{[d if d is not None else 'N' for d in s.shape]}" for s in specs)


# --- validation ----------------------------------------------------------------------------------

def check_inputs(raw: Any, specs: list[TensorSpec]) -> Batch:
    """Inputs checked against the signature: arrays of exactly the declared dtype and shape, or InputError.

    Values may be arrays (a binary body: their dtype must be the declared one) or JSON values (converted
    when no value changes: 1.0 may be an int64, 1.5 may not). Without a signature (a python entry
    script that declares none) each value is taken as an array of its own type.
    """
    if not isinstance(raw, dict):
        raise InputError(f"inputs must be an object keyed by input name; expected {describe_signature(specs)}")
    if not specs:
        return {name: _finite(name, _as_array(name, value, None)) for name, value in raw.items()}
    missing = [s.name for s in specs if s.name not in raw]
    if missing:
        raise InputError(f"missing input(s) {missing}; expected {describe_signature(specs)}")
    unknown = sorted(set(raw) - {s.name for s in specs})
    if unknown:
        raise InputError(f"unknown input(s) {unknown}; expected {describe_signature(specs)}")
    out: Batch = {}
    for spec in specs:
        arr = _finite(spec.name, _as_array(spec.name, raw[spec.name], _dtype(spec.dtype)))
        if arr.ndim != len(spec.shape) or any(
            want is not None and want >= 0 and got != want for got, want in zip(arr.shape, spec.shape, strict=False)
        ):
            raise InputError(f"input {spec.name!r} has shape {list(arr.shape)}; expected {describe_signature(specs)}")
        out[spec.name] = arr
    return out


def _as_array(name: str, value: Any, dtype: np.dtype[Any] | None) -> np.ndarray:
    if isinstance(value, np.ndarray):
        if dtype is not None and value.dtype != dtype:
            raise InputError(f"input {name!r} is {value.dtype.str} ({value.dtype}); the model takes {dtype}: "
                             f"send {dtype} (nothing is cast)")
        return value
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as exc:  # ragged nested lists
        raise InputError(f"input {name!r} is not an array: {exc}") from None
    if dtype is None:
        return arr
    got = arr.dtype.kind
    ok = (got == "b" and dtype.kind == "b") or (got in "iu" and dtype.kind in "iuf") or (got == "f" and dtype.kind == "f")
    if got == "f" and dtype.kind in "iu":  # a JSON number written 3.0 is still the integer 3
        ok = bool(np.all(np.isfinite(arr)) and np.all(arr == np.trunc(arr)))
    if not ok:
        what = "numbers" if got in "iuf" else "booleans" if got == "b" else "not numbers"
        raise InputError(f"input {name!r} is not {dtype}: the values are {what}")
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        with np.errstate(invalid="ignore", over="ignore"):
            cast = arr.astype(dtype)
        # compared after the cast: a float like 2.0**63 passes a range check made in floats, yet wraps
        if arr.size and (arr.min() < info.min or arr.max() > info.max or not np.array_equal(cast, arr)):
            raise InputError(f"input {name!r} has values outside {dtype}'s range [{info.min}, {info.max}]")
        return cast
    return arr.astype(dtype, copy=False)


def _finite(name: str, arr: np.ndarray) -> np.ndarray:
    # isfinite().all() is exact and the cheapest pass measured over a 3 MB image (0.1 ms, a float64 sum 0.35 ms)
    if arr.dtype.kind == "f" and arr.size and not np.isfinite(arr).all():
        raise InputError(f"input {name!r} has non-finite values (NaN or infinity)")
    return arr


# --- decoding ------------------------------------------------------------------------------------

def decode(form: Form, body: bytes, specs: list[TensorSpec], outputs: list[TensorSpec] | None = None,
           regions: Mapping[str, Region] | None = None) -> Decoded:
    """A request body in ``form``, decoded and checked against ``specs`` (and a ``.npy`` answer against ``outputs``);
    OIP v2 tensors may name the caller's shared memory ``regions`` (``modules.shmregions``)."""
    if outputs is not None and len(outputs) > 1 and wants_npy(form):  # refused before the model runs
        raise NotAcceptable(_npy_refusal(len(outputs), [s.name for s in outputs]))
    if form.kind == "v2":
        return _decode_v2(form, body, specs, regions or {})
    if form.ctype.startswith(NPY):
        try:
            arr = np.load(io.BytesIO(body), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise InputError(f"body is not a .npy array: {exc}") from None
        name = form.input_name or (specs[0].name if len(specs) == 1 else "")
        if not name:
            raise InputError(f"a .npy body needs an X-Input header naming one of: {describe_signature(specs)}")
        return Decoded(check_inputs({name: arr}, specs), form)
    doc = loads(body)
    if not isinstance(doc, dict) or "inputs" not in doc:
        raise InputError(f'body must be {{"inputs": {{...}}}}; expected {describe_signature(specs)}')
    return Decoded(check_inputs(doc["inputs"], specs), form)


def _region(regions: Mapping[str, Region], what: str, params: dict[str, Any]) -> tuple[str, memoryview]:
    name = params["shared_memory_region"]
    region = regions.get(name) if isinstance(name, str) else None
    if region is None:
        raise InputError(f"{what}: shared memory region {name!r} is not registered by this app "
                         f"(POST /v2/systemsharedmemory/region/NAME/register)")
    return name, region.view(what, params.get("shared_memory_offset", 0), params.get("shared_memory_byte_size"))


def _decode_v2(form: Form, body: bytes, specs: list[TensorSpec], regions: Mapping[str, Region]) -> Decoded:
    hlen = form.header_length
    if hlen > len(body):
        raise BodyError(f"Inference-Header-Content-Length {hlen} is more than the body's {len(body)} bytes")
    doc = loads(body[:hlen] if hlen >= 0 else body)
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise InputError('an OIP v2 request is {"inputs": [{"name", "shape", "datatype", "data"}, ...]}')
    raw: dict[str, Any] = {}
    offset = hlen if hlen >= 0 else len(body)
    for t in doc["inputs"]:
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise InputError("each input needs a name, a shape and a datatype")
        name, datatype, shape = t["name"], t.get("datatype"), t.get("shape")
        if name in raw:
            raise InputError(f"input {name!r} is given twice")
        dtype = DTYPES.get(datatype) if isinstance(datatype, str) else None
        if dtype is None or dtype == "str":
            raise InputError(f"input {name!r}: datatype {datatype!r} is not one of "
                             f"{sorted(k for k in DTYPES if k != 'BYTES')}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise InputError(f"input {name!r}: shape must be a list of non-negative integers")
        count = math.prod(shape)  # not np.prod: ten times the cost on the per-request path, where caches are cold
        dt = np.dtype(dtype)
        params = t.get("parameters") or {}
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if isinstance(params, dict) and "shared_memory_region" in params:  # read in place, never copied
            view = _region(regions, f"input {name!r}", params)[1]
            if len(view) != count * dt.itemsize:
                raise InputError(f"input {name!r}: shared_memory_byte_size {len(view)}; {shape} {datatype} is "
                                 f"{count * dt.itemsize} bytes")
            arr = np.frombuffer(view, dtype=dt, count=count).reshape(shape)
        elif size is not None:
            want = count * dt.itemsize
            if not isinstance(size, int) or size != want or offset + size > len(body):
                raise InputError(f"input {name!r}: binary_data_size {size!r}; {shape} {datatype} is {want} bytes "
                                 f"and {len(body) - offset} are left in the body")
            arr = np.frombuffer(body, dtype=dt, count=count, offset=offset).reshape(shape)
            offset += size
        else:
            data = t.get("data")
            if data is None:
                raise InputError(f"input {name!r} has neither data nor parameters.binary_data_size")
            arr = _as_array(name, data, dt)
            if arr.size != count:
                raise InputError(f"input {name!r}: {arr.size} values for shape {shape}")
            arr = arr.reshape(shape)
        raw[name] = arr
    if offset != len(body):
        raise InputError(f"{len(body) - offset} bytes after the last binary input")
    params = doc.get("parameters") if isinstance(doc.get("parameters"), dict) else {}
    requested: dict[str, bool | None] = {}
    shm_out: dict[str, tuple[str, memoryview]] = {}
    for o in doc.get("outputs") or []:
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise InputError("each requested output needs a name")
        p = o.get("parameters") if isinstance(o.get("parameters"), dict) else {}
        requested[o["name"]] = bool(p["binary_data"]) if "binary_data" in p else None
        if "shared_memory_region" in p:
            shm_out[o["name"]] = _region(regions, f"output {o['name']!r}", p)
    return Decoded(check_inputs(raw, specs), form, id=str(doc.get("id", "")) if doc.get("id") is not None else "",
                   binary=bool(params.get("binary_data_output", False)), requested=requested, shm_out=shm_out)


# --- encoding ------------------------------------------------------------------------------------

def outputs_json(outputs: Batch) -> dict[str, Any]:
    """Outputs as JSON values (arrays orjson cannot write as they are become lists)."""
    return {k: (_jsonable(v.tolist()) if v.dtype.kind == "O" else v.tolist() if v.dtype.kind in "USb"
                or not v.flags.c_contiguous else v) for k, v in outputs.items()}


def _jsonable(value: Any) -> Any:
    """An element of a non-tensor output (an ONNX sequence or map: skl2onnx's default classifier gives its
    probabilities as a sequence of {class: probability}) as JSON can hold it: map keys become strings."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value.tolist() if isinstance(value, np.ndarray | np.generic) else value


def _text(value: Any) -> str:
    """One element of a BYTES output: a string as it is, anything else (a map, a sequence) as compact JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return json.dumps(_jsonable(value), separators=(",", ":"))


def _bytes_blob(arr: np.ndarray) -> bytes:
    """A BYTES output in the binary extension, as Triton writes it: each element's length (4 bytes, little
    endian), then its UTF-8 bytes."""
    parts = []
    for value in arr.ravel().tolist():
        data = value if isinstance(value, bytes) else _text(value).encode()
        parts += [struct.pack("<I", len(data)), data]
    return b"".join(parts)


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def wants_npy(form: Form) -> bool:
    return form.kind == "v1" and NPY in form.accept


def encode(dec: Decoded, outputs: Batch, module: str, version: int, request_id: str = "") -> tuple[str, int, bytes]:
    """(content type, OIP header length or -1, body) of a 200 answer in the form the request asked for.

    The v1 JSON answer is ``{"module", "version", "outputs"}`` (and ``request_id`` on the web). A
    ``.npy`` answer holds one array: asked of a model with several outputs it is refused (406).
    """
    if dec.form.kind == "v2":
        return _encode_v2(dec, outputs, module, version, request_id)
    if wants_npy(dec.form):
        if len(outputs) != 1:
            raise NotAcceptable(_npy_refusal(len(outputs), list(outputs)))
        return NPY, -1, npy_bytes(next(iter(outputs.values())))
    doc: dict[str, Any] = {"module": module, "version": version, "outputs": outputs_json(outputs)}
    if request_id:
        doc["request_id"] = request_id
    return JSON, -1, dumps(doc)


def _npy_refusal(count: int, names: list[str]) -> str:
    return (f"a .npy answer holds one array and this model has {count} outputs ({', '.join(names)}): "
            "ask for JSON, or for the OIP v2 binary form (POST /v2/models/NAME/infer)")


def _encode_v2(dec: Decoded, outputs: Batch, module: str, version: int, request_id: str) -> tuple[str, int, bytes]:
    names = list(dec.requested) or list(outputs)
    unknown = [n for n in names if n not in outputs]
    if unknown:
        raise InputError(f"unknown output(s) {unknown}; the model gives {sorted(outputs)}")
    tensors, blobs = [], []
    for name in names:
        arr = np.ascontiguousarray(outputs[name])
        text = arr.dtype.kind in "OUS"  # strings, or maps and sequences: BYTES, each element a string
        t: dict[str, Any] = {"name": name, "datatype": "BYTES" if text else _DATATYPE.get(arr.dtype) or arr.dtype.name.upper(),
                             "shape": list(arr.shape)}
        binary = dec.requested.get(name)
        if name in dec.shm_out:  # written into the caller's region: the answer only says where
            region, view = dec.shm_out[name]
            if arr.dtype.kind in "OUS" or arr.nbytes > len(view):
                raise InputError(f"output {name!r} is {arr.nbytes} bytes of {arr.dtype}; shared_memory_byte_size is "
                                 f"{len(view)}")
            np.frombuffer(view, dtype=np.uint8, count=arr.nbytes)[:] = arr.reshape(-1).view(np.uint8)
            t["parameters"] = {"shared_memory_region": region, "shared_memory_byte_size": arr.nbytes}
        elif binary if binary is not None else dec.binary:
            blob = _bytes_blob(arr) if text else arr.data.cast("B") if arr.ndim else arr.tobytes()
            t["parameters"] = {"binary_data_size": len(blob)}  # a byte view: its length is its size
            blobs.append(blob)
        else:
            t["data"] = ([_text(v) for v in arr.ravel().tolist()] if text
                         else arr.ravel().tolist() if arr.dtype.kind == "b" else arr.ravel())
        tensors.append(t)
    doc: dict[str, Any] = {"model_name": module, "model_version": str(version), "outputs": tensors}
    if dec.id or request_id:
        doc["id"] = dec.id or request_id
    head = dumps(doc)
    if not blobs:
        return JSON, -1, head
    return "application/octet-stream", len(head), b"".join([head, *blobs])


def for_runner(runner: Any, inputs: Batch) -> Batch:
    """Inputs as ``runner`` may use them: binary inputs are read-only views of the request body (no copy),
    which onnxruntime and LiteRT only read; Python code (an entry script's ``run`` or ``preprocess``)
    may write to its arrays, so it gets copies."""
    if type(runner).__name__ in ("OnnxRunner", "TfliteRunner"):
        return inputs
    return {k: v if v.flags.writeable else v.copy() for k, v in inputs.items()}


def serve(runner: Any, form: dict[str, Any], body: bytes, module: str, version: int,
          sample: bool = False, regions: Mapping[str, Region] | None = None) -> tuple[str, int, bytes, bytes]:
    """One request in ``form`` (:meth:`Form.to_dict`) through ``runner``: decoded, checked, run and encoded.

    (content type, OIP header length or -1, answer body, and when ``sample`` the inputs and outputs as
    a JSON data record, else b""): the device's worker and in-process paths.
    """
    dec = decode(Form.from_dict(form), body, runner.inputs, runner.outputs, regions)
    out = runner.predict(for_runner(runner, dec.inputs))
    ctype, hlen, answer = encode(dec, out, module, version)
    record = dumps({"input": outputs_json(dec.inputs), "output": outputs_json(out)}) if sample else b""
    return ctype, hlen, answer, record
