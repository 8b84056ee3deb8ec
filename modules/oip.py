"""The Open Inference Protocol v2 (KServe v2; Triton, MLServer and Seldon speak it): its paths and metadata.

Pure and NumPy-free, shared by the device's local API and direct socket (``agent.localapi``,
``agent/worker.py``) and the web endpoints' gateway (``hub.endpoints.gateway``), so both answer the
same routes with the same documents. The tensors themselves (JSON ``data`` or the binary-data
extension) are ``modules.tensors``'s.

    GET  /v2                                           server metadata
    GET  /v2/health/live, /v2/health/ready             200 or 503
    GET  /v2/models/{name}[/versions/{v}]              model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready        200 or 503
    POST /v2/models/{name}[/versions/{v}]/infer        inference (JSON, or JSON header + raw bytes)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from protocol.manifest import TensorSpec

HEADER_LENGTH = "inference-header-content-length"  # the binary-data extension's header: the JSON part's size
BINARY = "application/octet-stream"
EXTENSIONS = ["binary_tensor_data"]

# numpy dtype name <-> OIP datatype
DATATYPES = {"bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
             "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64", "float16": "FP16",
             "float32": "FP32", "float64": "FP64", "str": "BYTES"}
DTYPES = {v: k for k, v in DATATYPES.items()}
PLATFORMS = {"onnx": "onnxruntime_onnx", "tflite": "tensorflow_lite", "python": "python"}


@dataclass(frozen=True)
class Route:
    """What a ``/v2`` path asks: ``kind`` is server, live, ready, model, model_ready or infer."""

    kind: str
    model: str = ""
    version: str = ""


def parse_path(path: str) -> Route | None:
    """The OIP v2 route a path names (query string ignored); None when it is not one."""
    parts = path.split("?", 1)[0].strip("/").split("/")
    if parts[0] != "v2":
        return None
    if len(parts) == 1:
        return Route("server")
    if parts[1] == "health" and len(parts) == 3 and parts[2] in ("live", "ready"):
        return Route(parts[2])
    if parts[1] != "models" or len(parts) < 3 or not parts[2]:
        return None
    name, rest, version = parts[2], parts[3:], ""
    if rest[:1] == ["versions"]:
        if len(rest) < 2 or not rest[1]:
            return None
        version, rest = rest[1], rest[2:]
    kind = {(): "model", ("ready",): "model_ready", ("infer",): "infer"}.get(tuple(rest))
    return Route(kind, name, version) if kind else None


def tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    if spec.dtype.startswith(("seq(", "map(")):  # an ONNX sequence or map: answered as BYTES, one JSON text per row
        return {"name": spec.name, "datatype": "BYTES", "shape": [-1]}
    return {"name": spec.name, "datatype": DATATYPES.get(spec.dtype, spec.dtype.upper()),
            "shape": [-1 if d is None or d < 0 else d for d in spec.shape]}


def model_metadata(name: str, versions: list[str], runtime: str, inputs: list[TensorSpec],
                   outputs: list[TensorSpec]) -> dict[str, Any]:
    return {"name": name, "versions": versions, "platform": PLATFORMS.get(runtime, runtime),
            "inputs": [tensor_metadata(s) for s in inputs], "outputs": [tensor_metadata(s) for s in outputs]}


def server_metadata(version: str, extensions: list[str] = EXTENSIONS) -> dict[str, Any]:
    return {"name": "edgefleet", "version": version, "extensions": extensions}


def error(text: str) -> dict[str, str]:
    """An OIP error body: ``{"error": text}``."""
    return {"error": text}
