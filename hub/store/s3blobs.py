"""The blob store on an S3-compatible object store (``s3://bucket/prefix``), for hub replicas with no shared volume.

Each blob is one object, its key the prefix and its sha256. An upload is hashed into a local cache file first
(so a digest that does not match is refused before anything reaches the bucket, and content already stored
is not sent again), then uploaded (multipart for large files, by boto3). Reads that need a local file
(:meth:`S3BlobStore.path`, :meth:`S3BlobStore.open`) fetch the object into the cache once: a read-through
cache, checked against the digest as it is written. Install with ``pip install 'edgefleet[s3]'``; the endpoint
and credentials come from boto3's usual settings (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, …).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import boto3
from botocore.exceptions import ClientError

from modules.store import ContentStore, DerivedBlobMethods
from protocol.topics import DIGEST_RE


def parse_s3_url(url: str) -> tuple[str, str]:
    """(bucket, key prefix) of ``s3://bucket/prefix``; the prefix ends with ``/`` unless empty."""
    u = urlparse(url)
    if u.scheme != "s3" or not u.netloc:
        raise ValueError(f"not an s3://bucket[/prefix] URL: {url!r}")
    prefix = u.path.strip("/")
    return u.netloc, f"{prefix}/" if prefix else ""


class S3BlobStore(DerivedBlobMethods):
    """A :class:`hub.store.blobs.BlobStore` on a bucket; ``cache`` is a local directory for read-through copies
    (``get``, ``open``, ``put``, ``put_stream``: :class:`~modules.store.DerivedBlobMethods`)."""

    def __init__(self, url: str, cache: Path, client: Any = None) -> None:
        self.bucket, self.prefix = parse_s3_url(url)
        self.client = client or boto3.client("s3")
        self.cache = ContentStore(cache)

    def _key(self, digest: str) -> str:
        if not DIGEST_RE.match(digest):
            raise ValueError(f"not a sha256 digest: {digest!r}")
        return self.prefix + digest

    def _head(self, digest: str) -> dict[str, Any] | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(digest))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def has(self, digest: str) -> bool:
        return self._head(digest) is not None

    def put_blocks(self, blocks: Iterable[bytes], expected: str | None = None) -> tuple[str, int]:
        digest, size = self.cache.put_blocks(blocks, expected)  # hashed and checked before any byte is uploaded
        if not self.has(digest):
            self.client.upload_file(str(self.cache.path(digest)), self.bucket, self._key(digest))
        return digest, size

    def read_range(self, digest: str, offset: int, length: int) -> bytes:
        if self.cache.has(digest):
            return self.cache.read_range(digest, offset, length)
        if length <= 0:
            return b""
        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self._key(digest),
                                         Range=f"bytes={offset}-{offset + length - 1}")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "InvalidRange":  # past the end, as a file read
                return b""
            raise
        return got["Body"].read()

    def path(self, digest: str) -> Path:
        """The cached copy, fetched from the bucket on first use (FileNotFoundError if the bucket has none)."""
        if not self.cache.has(digest):
            try:
                body = self.client.get_object(Bucket=self.bucket, Key=self._key(digest))["Body"]
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    raise FileNotFoundError(f"blob {digest} is not in s3://{self.bucket}/{self.prefix}") from None
                raise
            self.cache.put_stream(body, expected=digest)  # an object whose bytes are not its name is refused
        return self.cache.path(digest)

    def delete(self, digest: str) -> int:
        head = self._head(digest)
        self.cache.delete(digest)
        if head is None:
            return 0
        self.client.delete_object(Bucket=self.bucket, Key=self._key(digest))
        return int(head.get("ContentLength", 0))
