"""Bodies and manifests for the endpoint processes: JSON (orjson) and the ``.npy`` type, from ``modules.tensors``.

The tensors themselves (JSON, ``.npy``, OIP v2 binary) are decoded, checked and encoded by
``modules.tensors``, the same code a device runs.
"""

from __future__ import annotations

from pathlib import Path

from modules.bundle import RELEASE_FILE
from modules.tensors import JSON, NPY, dumps, loads
from protocol.manifest import Manifest
from protocol.schema import validate

__all__ = ["JSON", "NPY", "dumps", "loads", "read_manifest"]


def read_manifest(bundle_dir: Path) -> Manifest:
    """The manifest of a pulled bundle, from its (already verified) release file."""
    return validate(Manifest, loads((bundle_dir / RELEASE_FILE).read_bytes())["signed"]["manifest"])
