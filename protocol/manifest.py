"""Bundle manifests and chunk maths.

A bundle is a set of files described by a canonical manifest; its identity is
the sha256 of the manifest's canonical JSON. Every file is cut into chunks of
``CHUNK_SIZE`` bytes, each named by its sha256, so a device fetches only the
chunks it does not already hold.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Iterable, Iterator
from typing import Annotated, Any, Literal

from msgspec import Meta

from protocol.encoding import ProtocolError, digest_of
from protocol.schema import DIGEST_PATTERN, Schema, validate

CHUNK_SIZE = 256 * 1024
MAX_BUNDLE_FILES = 256
MAX_BUNDLE_BYTES = 2 * 1024**3

Runtime = Literal["onnx", "tflite", "python"]


class TensorSpec(Schema, frozen=True, kw_only=True):
    name: str
    dtype: str  # numpy dtype name, e.g. "float32"
    shape: list[int | None]  # None (or a negative number) is a free dimension, usually the batch


class FileEntry(Schema, frozen=True, kw_only=True):
    path: str
    sha256: Annotated[str, Meta(pattern=DIGEST_PATTERN)]
    size: Annotated[int, Meta(ge=0, le=MAX_BUNDLE_BYTES)]
    chunks: list[str]

    def __post_init__(self) -> None:
        check_relative_path(self.path)  # on every construction, parsed or built


class Manifest(Schema, frozen=True, kw_only=True):
    """What a bundle holds; named by its digest, so the same inputs give the same name.

    The release role signs ``release_document(manifest, expires)``, which wraps it.
    """

    type: Literal["bundle"] = "bundle"
    v: Literal[1] = 1
    name: Annotated[str, Meta(min_length=1, max_length=64)]
    version: Annotated[int, Meta(ge=1)]
    runtime: Runtime
    model: str  # the model file (for "python" without an entry: the script itself)
    entry: str = ""  # onnx/tflite: optional preprocess/postprocess script; python: the init()/run() script
    sample: str = ""  # JSON file: {"inputs": {name: nested list}} used by health checks
    inputs: list[TensorSpec] = []
    outputs: list[TensorSpec] = []
    files: Annotated[list[FileEntry], Meta(max_length=MAX_BUNDLE_FILES)]
    collect_rate_ppm: Annotated[int, Meta(ge=0, le=1_000_000)] = 0

    def digest(self) -> str:
        return digest_of(self.to_dict())

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def chunk_digests(self) -> list[str]:
        """Every distinct chunk the bundle needs, in file order."""
        seen: dict[str, None] = {}
        for f in self.files:
            for c in f.chunks:
                seen.setdefault(c, None)
        return list(seen)


def check_relative_path(path: str) -> str:
    """Refuse absolute paths, ``..``, backslashes and empty parts (path traversal)."""
    if not path or path.startswith("/") or "\\" in path or "\x00" in path:
        raise ProtocolError(f"unsafe file path in manifest: {path!r}")
    if any(part in ("", ".", "..") for part in path.split("/")) or posixpath.normpath(path) != path:
        raise ProtocolError(f"unsafe file path in manifest: {path!r}")
    return path


def split_chunks(blocks: Iterable[bytes], chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """Re-cut a stream of byte blocks into chunks of ``chunk_size`` (the last may be shorter)."""
    buf = bytearray()
    for block in blocks:
        buf += block
        while len(buf) >= chunk_size:
            yield bytes(buf[:chunk_size])
            del buf[:chunk_size]
    if buf:
        yield bytes(buf)


def describe_file(path: str, blocks: Iterable[bytes]) -> tuple[FileEntry, list[bytes]]:
    """Hash a file's bytes into a FileEntry; also returns its chunks (for small files)."""
    whole = hashlib.sha256()
    chunks: list[bytes] = []
    size = 0
    for chunk in split_chunks(blocks):
        whole.update(chunk)
        size += len(chunk)
        chunks.append(chunk)
    entry = FileEntry(
        path=path, sha256=whole.hexdigest(), size=size, chunks=[hashlib.sha256(c).hexdigest() for c in chunks]
    )
    return entry, chunks


def parse_manifest(signed: Any) -> Manifest:
    manifest = validate(Manifest, signed)
    paths = [f.path for f in manifest.files]
    if len(set(paths)) != len(paths):
        raise ProtocolError("manifest lists a file path twice")
    if manifest.size > MAX_BUNDLE_BYTES:
        raise ProtocolError(f"bundle of {manifest.size} bytes exceeds the limit of {MAX_BUNDLE_BYTES}")
    for needed in (manifest.model, manifest.entry, manifest.sample):
        if needed and needed not in paths:
            raise ProtocolError(f"manifest names {needed!r} but lists no such file")
    return manifest


def release_document(manifest: Manifest, expires: int) -> dict[str, Any]:
    """The ``signed`` part of a bundle's release envelope."""
    return {"type": "release", "v": 1, "bundle": manifest.digest(), "expires": expires, "manifest": manifest.to_dict()}
