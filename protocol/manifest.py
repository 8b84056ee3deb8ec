"""Bundle manifests and chunk maths.

A bundle is a set of files described by a canonical manifest; its identity is
the sha256 of the manifest's canonical JSON. Every file is cut into chunks of
``CHUNK_SIZE`` bytes, each named by its sha256, so a device fetches only the
chunks it does not already hold.

A release may also list, outside the manifest, each file's content-defined
chunks ("spans", variable length): an insertion then changes only the spans
around it. Devices never cut files themselves; they fetch whichever listed
chunks they lack. Spans sit beside the manifest, not in it, so the bundle's
digest and every older device (which ignores unknown release fields) are
unaffected.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from typing import Annotated, Any, Literal

from msgspec import Meta

from protocol.encoding import ProtocolError, digest_of
from protocol.names import Name, check_file_path
from protocol.schema import DIGEST_PATTERN, INT63_MAX, Positive, Schema, validate

CHUNK_SIZE = 256 * 1024
MAX_BUNDLE_FILES = 256
MAX_BUNDLE_BYTES = 2 * 1024**3
MAX_SPAN_BYTES = 1024 * 1024  # the largest span a device accepts (the hub cuts at most 512 KiB)

MAX_TENSORS = 256  # inputs or outputs of a model

Runtime = Literal["onnx", "tflite", "python"]
Digest = Annotated[str, Meta(pattern=DIGEST_PATTERN)]
Dim = Annotated[int, Meta(ge=-INT63_MAX, le=INT63_MAX)]


class TensorSpec(Schema, frozen=True, kw_only=True):
    name: Annotated[str, Meta(max_length=256)]  # the model's own tensor name (e.g. "input:0"): not a path
    dtype: Annotated[str, Meta(max_length=32)]  # numpy dtype name, e.g. "float32"
    shape: Annotated[list[Dim | None], Meta(max_length=32)]  # None (or a negative number): a free dimension


class FileEntry(Schema, frozen=True, kw_only=True):
    path: str
    sha256: Digest
    size: Annotated[int, Meta(ge=0, le=MAX_BUNDLE_BYTES)]
    chunks: Annotated[list[Digest], Meta(max_length=MAX_BUNDLE_BYTES // CHUNK_SIZE + 1)]

    def __post_init__(self) -> None:
        check_relative_path(self.path)  # on every construction, parsed or built


class Manifest(Schema, frozen=True, kw_only=True):
    """What a bundle holds; named by its digest, so the same inputs give the same name.

    The release role signs ``release_document(manifest, expires)``, which wraps it.
    """

    type: Literal["bundle"] = "bundle"
    v: Literal[1] = 1
    name: Name
    version: Positive
    runtime: Runtime
    model: str  # the model file (for "python" without an entry: the script itself)
    entry: str = ""  # onnx/tflite: optional preprocess/postprocess script; python: the init()/run() script
    sample: str = ""  # JSON file: {"inputs": {name: nested list}} used by health checks
    inputs: Annotated[list[TensorSpec], Meta(max_length=MAX_TENSORS)] = []
    outputs: Annotated[list[TensorSpec], Meta(max_length=MAX_TENSORS)] = []
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
    """A bundle file path: names (protocol.names) joined by ``/``; so never absolute, ``..``, ``\\`` or a control character."""
    return check_file_path(path)


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


class Span(Schema, frozen=True, kw_only=True):
    """One content-defined chunk of a file: its sha256 and length (offsets are the running sum)."""

    sha256: Annotated[str, Meta(pattern=DIGEST_PATTERN)]
    size: Annotated[int, Meta(ge=1, le=MAX_SPAN_BYTES)]


class Spans(Schema, frozen=True, kw_only=True):
    """The release's ``spans``: the chunker that cut them (informational) and, per file path, its spans in order.

    A file not listed is transferred by its fixed-size ``chunks``.
    """

    chunker: Annotated[str, Meta(max_length=128)]
    files: dict[str, list[Span]]


Chunk = tuple[str, int]  # (sha256, size)


def fixed_chunks(entry: FileEntry) -> list[Chunk]:
    """A file's fixed-size chunks with their sizes (every one but the last is CHUNK_SIZE)."""
    return [(d, min(CHUNK_SIZE, entry.size - i * CHUNK_SIZE)) for i, d in enumerate(entry.chunks)]


def parse_spans(release: Any, manifest: Manifest) -> dict[str, list[Chunk]]:
    """The spans of a verified release document, checked against its manifest ({} when it lists none).

    Refused: an unknown path, spans that do not add up to the file's size, or a digest given two sizes.
    """
    raw = release.get("spans") if isinstance(release, dict) else None
    if raw is None:
        return {}
    spans = validate(Spans, raw)
    entries = {f.path: f for f in manifest.files}
    sizes = {d: n for f in manifest.files for d, n in fixed_chunks(f)}
    out: dict[str, list[Chunk]] = {}
    for path, listed in spans.files.items():
        entry = entries.get(path)
        if entry is None:
            raise ProtocolError(f"release spans name {path!r}, which the manifest does not list")
        total = sum(s.size for s in listed)
        if total != entry.size:
            raise ProtocolError(f"spans of {path!r} add up to {total} bytes, the file has {entry.size}")
        for s in listed:
            if sizes.setdefault(s.sha256, s.size) != s.size:
                raise ProtocolError(f"chunk {s.sha256[:12]}… is listed with two sizes")
        out[path] = [(s.sha256, s.size) for s in listed]
    return out


def choose_chunks(manifest: Manifest, spans: dict[str, list[Chunk]], has: Callable[[str], bool]) -> dict[str, list[Chunk]]:
    """Per file, the chunk list to fetch and assemble from: of its spans (if listed) and its fixed chunks, the one
    with fewer bytes missing from the store (the spans on a tie). Once a list is complete it stays chosen, so the
    installer, asking again after the transfer, assembles from what was fetched."""
    chosen: dict[str, list[Chunk]] = {}
    for entry in manifest.files:
        options = ([spans[entry.path]] if entry.path in spans else []) + [fixed_chunks(entry)]
        chosen[entry.path] = min(options, key=lambda chunks: sum(n for d, n in dict(chunks).items() if not has(d)))
    return chosen


def release_document(manifest: Manifest, expires: int, spans: Spans | None = None) -> dict[str, Any]:
    """The ``signed`` part of a bundle's release envelope (``spans`` only when given: older releases had none)."""
    doc = {"type": "release", "v": 1, "bundle": manifest.digest(), "expires": expires, "manifest": manifest.to_dict()}
    if spans is not None:
        doc["spans"] = spans.to_dict()
    return doc
