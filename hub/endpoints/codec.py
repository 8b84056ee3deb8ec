"""Request and response bodies: JSON (orjson when installed) and the binary ``application/x-npy`` form."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from modules.bundle import RELEASE_FILE
from protocol.manifest import Manifest
from protocol.schema import validate

NPY = "application/x-npy"
JSON = "application/json"

try:  # orjson parses and writes JSON several times faster than json, and writes numpy arrays directly
    import orjson

    def dumps(obj: Any) -> bytes:
        return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)

    loads = orjson.loads
except ImportError:  # pragma: no cover - the plain-json fallback
    def _default(obj: Any) -> Any:
        if isinstance(obj, np.ndarray | np.generic):
            return obj.tolist()
        raise TypeError(f"{type(obj).__name__} is not JSON serialisable")

    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":"), default=_default).encode()

    loads = json.loads


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def read_npy(body: bytes) -> np.ndarray:
    return np.load(io.BytesIO(body), allow_pickle=False)


def json_safe(arr: np.ndarray) -> Any:
    """Arrays orjson cannot write as such (non-native dtypes, strings) become lists."""
    if isinstance(arr, np.ndarray) and (arr.dtype.kind in "OUSb" or not arr.flags.c_contiguous):
        return arr.tolist()
    return arr


def read_manifest(bundle_dir: Path) -> Manifest:
    """The manifest of a pulled bundle, from its (already verified) release file."""
    return validate(Manifest, loads((bundle_dir / RELEASE_FILE).read_bytes())["signed"]["manifest"])
