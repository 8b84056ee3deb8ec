"""A content-addressed file store (``root/ab/cd/abcd…``): the hub's blobs and the agent's chunks."""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from protocol.topics import DIGEST_RE

BLOCK = 1024 * 1024


class DerivedBlobMethods:
    """What a blob store derives from its ``path`` and ``put_blocks``: this store, and the hub's S3 one."""

    def path(self, digest: str) -> Path:
        raise NotImplementedError

    def put_blocks(self, blocks: Iterable[bytes], expected: str | None = None) -> tuple[str, int]:
        raise NotImplementedError

    def get(self, digest: str) -> bytes:
        return self.path(digest).read_bytes()

    def open(self, digest: str) -> BinaryIO:
        return self.path(digest).open("rb")

    def put(self, data: bytes, expected: str | None = None) -> str:
        return self.put_blocks([data], expected)[0]

    def put_stream(self, stream: BinaryIO, expected: str | None = None) -> tuple[str, int]:
        return self.put_blocks(iter(lambda: stream.read(BLOCK), b""), expected)


class ContentStore(DerivedBlobMethods):
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)  # blobs are private: files 0600 (mkstemp), dirs 0700
        self.stored = 0  # objects put since this store was opened (e.g. the chunks a device downloaded)
        self.stored_bytes = 0  # and their bytes
        self._count_lock = threading.Lock()  # puts come from several threads (HTTP chunk downloads)

    def path(self, digest: str) -> Path:
        if not DIGEST_RE.match(digest):
            raise ValueError(f"not a sha256 digest: {digest!r}")
        return self.root / digest[:2] / digest[2:4] / digest

    def has(self, digest: str) -> bool:
        return self.path(digest).exists()

    def put_blocks(self, blocks: Iterable[bytes], expected: str | None = None) -> tuple[str, int]:
        """Stream blocks to a temporary file, hashing as they pass, then rename into place.

        With ``expected``, a digest mismatch leaves nothing behind and raises ValueError.
        """
        h = hashlib.sha256()
        size = 0
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as out:
                for block in blocks:
                    h.update(block)
                    size += len(block)
                    out.write(block)
            digest = h.hexdigest()
            if expected is not None and digest != expected:
                raise ValueError(f"content hash {digest[:12]}… does not match expected {expected[:12]}…")
            final = self.path(digest)
            final.parent.parent.mkdir(exist_ok=True, mode=0o700)
            final.parent.mkdir(exist_ok=True, mode=0o700)
            os.replace(tmp, final)
            with self._count_lock:
                self.stored += 1
                self.stored_bytes += size
            return digest, size
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def read_range(self, digest: str, offset: int, length: int) -> bytes:
        with self.path(digest).open("rb") as f:
            f.seek(offset)
            return f.read(length)

    def delete(self, digest: str) -> int:
        """Remove an object; the bytes freed (0 if it was not there)."""
        path = self.path(digest)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        return size

    def digests(self) -> Iterator[str]:
        """Every object's digest (the store's ``ab/cd/abcd…`` layout; temporary files are not objects)."""
        for path in self.root.glob("??/??/*"):
            if DIGEST_RE.match(path.name):
                yield path.name
