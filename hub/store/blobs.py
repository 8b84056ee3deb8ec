"""The blob store's interface: what the hub asks of the place model files and bundle parts live.

The hub's code holds a :class:`BlobStore` (``HubContext.store``, made by :func:`open_blob_store`) and never
the implementation. Every hub replica must see the same blobs. Today that is the local-directory
implementation, :class:`modules.store.ContentStore`, on a directory all replicas mount
(``HubConfig.blobs_dir``, e.g. a ReadWriteMany volume); writes go to a temporary file and are renamed
into place, and blobs are content-addressed, so replicas writing the same blob at once agree.

An S3-compatible store fits behind the same methods (docs/scaling.md): ``put_*`` upload (key = sha256),
``has``/``get``/``read_range``/``open``/``delete`` map to HEAD/GET/ranged GET/streamed GET/DELETE, and
``path`` returns a local file, which such a store fills from the bucket on first use (a read-through
cache: the registry's load check symlinks model files, bundles are built from files, and bundle
downloads ``sendfile`` from them).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable


@runtime_checkable
class BlobStore(Protocol):
    """Content-addressed blobs, keyed by their sha256 (hex)."""

    def has(self, digest: str) -> bool:
        """Whether the blob is stored."""
        ...

    def get(self, digest: str) -> bytes:
        """The whole blob (small ones: metadata, samples, reports)."""
        ...

    def put(self, data: bytes, expected: str | None = None) -> str:
        """Store bytes; returns their digest (``expected``: refuse other content with ValueError)."""
        ...

    def put_stream(self, stream: BinaryIO, expected: str | None = None) -> tuple[str, int]:
        """Store a stream without holding it in memory; (digest, size)."""
        ...

    def put_blocks(self, blocks: Iterable[bytes], expected: str | None = None) -> tuple[str, int]:
        """Store an iterable of byte blocks; (digest, size)."""
        ...

    def read_range(self, digest: str, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset`` (a bundle part)."""
        ...

    def open(self, digest: str) -> BinaryIO:
        """The blob as a readable stream (a large one, read block by block; FileNotFoundError if absent)."""
        ...

    def path(self, digest: str) -> Path:
        """A local file holding the blob (a remote store fetches it into its cache first)."""
        ...

    def delete(self, digest: str) -> int:
        """Remove the blob; the bytes freed (0, and no error, if it was absent)."""
        ...


def open_blob_store(location: Path | str, cache: Path | None = None) -> BlobStore:
    """The blob store at ``location``: a directory (every replica mounts the same one), or an ``s3://bucket/prefix``
    URL (:mod:`hub.store.s3blobs`, its read-through copies in ``cache``); the one place that picks an implementation."""
    if str(location).startswith("s3://"):
        if cache is None:
            raise ValueError("an s3:// blob store needs a local cache directory")
        try:
            from hub.store.s3blobs import S3BlobStore
        except ImportError as exc:
            raise RuntimeError(f"{exc}: the S3 blob store needs `pip install 'edgefleet[s3]'`") from None
        return S3BlobStore(str(location), cache)
    from modules.store import ContentStore

    return ContentStore(Path(location))


def blocks(store: BlobStore, digest: str, size: int = 1024 * 1024) -> Iterator[bytes]:
    """The blob's bytes, ``size`` at a time (a bundle's file for ``pull_bundle``) without holding it whole."""
    with store.open(digest) as f:
        while data := f.read(size):
            yield data
