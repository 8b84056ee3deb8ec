"""Bundle download over HTTP for devices: their own credentials, release envelopes, chunks read from the store.

A device authenticates with HTTP Basic: its id and the MQTT password it got at enrolment (the hub keeps
``hash_token(password)``). Any enrolled device may read any released bundle, as on the MQTT blob topics.
Every refusal is counted by reason (``/metrics``) and says precisely why.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from fastapi import HTTPException

from hub.errors import NotFound
from hub.registry.bundles import release_envelope
from hub.store import Database
from hub.store.blobs import BlobStore
from hub.trust.tokens import hash_token
from protocol.encoding import canonical_json
from protocol.topics import DIGEST_RE

log = logging.getLogger("edgefleet.hub.device_http")

BLOCK = 64 * 1024
REALM = {"WWW-Authenticate": 'Basic realm="edgefleet-device"'}


@dataclass(frozen=True)
class ChunkSpan:
    """Where one chunk's bytes lie: ``length`` bytes from ``offset`` in the blob file at ``path``."""

    digest: str
    path: Path
    offset: int
    length: int


class RangeNotSatisfiable(Exception):
    pass


def parse_range(header: str | None, length: int) -> tuple[int, int] | None:
    """A single ``bytes=`` range as [start, end) within ``length``; None for the whole (absent, multi-range or
    malformed headers are ignored, as RFC 9110 allows). RangeNotSatisfiable when it starts past the end."""
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    first, sep, last = header[6:].strip().partition("-")
    if not sep or not (first or last) or not all(p.isdigit() for p in (first, last) if p):
        return None
    if not first:  # "bytes=-N": the last N bytes
        n = int(last)
        if n == 0:
            raise RangeNotSatisfiable()
        return max(0, length - n), length
    start = int(first)
    end = min(length, int(last) + 1) if last else length
    if start >= length or end <= start:
        raise RangeNotSatisfiable()
    return start, end


class DeviceDownloads:
    """Authenticates devices and locates what they download; counts bytes served and refusals."""

    def __init__(self, db: Database, store: BlobStore) -> None:
        self.db, self.store = db, store
        self.refused: Counter[str] = Counter()
        self.bytes_sent = 0
        self.chunks_served = 0
        self._lock = threading.Lock()

    def _refuse(self, status: int, reason: str, detail: str) -> HTTPException:
        with self._lock:
            self.refused[reason] += 1
        log.warning("device download refused (%s): %s", reason, detail)
        return HTTPException(status, detail, headers=REALM if status == 401 else None)

    def authenticate(self, header: str | None) -> str:
        """The device id an ``Authorization: Basic`` header proves, or HTTPException 401/403 saying why."""
        if not header or not header.lower().startswith("basic "):
            raise self._refuse(401, "no_credentials", "device routes need HTTP Basic credentials: the device id and"
                                                      " the MQTT password from enrolment")
        try:
            device_id, sep, password = base64.b64decode(header[6:].strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            sep = ""
        if not sep:
            raise self._refuse(401, "no_credentials", "malformed HTTP Basic credentials")
        row = self.db.one("SELECT mqtt_password_hash FROM devices WHERE id = ?", (device_id,))
        if row is None:
            gone = self.db.one("SELECT ts FROM audit WHERE action = 'device.decommissioned' AND subject = ?"
                               " ORDER BY id DESC LIMIT 1", (device_id,))
            if gone is not None:
                when = datetime.fromtimestamp(gone["ts"], UTC).isoformat(timespec="seconds")
                raise self._refuse(403, "decommissioned", f"device {device_id!r} was decommissioned at {when}:"
                                                          " enrol it again to download")
            raise self._refuse(401, "unknown_device", f"device {device_id!r} is not enrolled at this hub")
        stored = row["mqtt_password_hash"]
        if not stored or not hmac.compare_digest(stored, hash_token(password)):
            raise self._refuse(401, "wrong_password", f"wrong password for device {device_id!r}")
        return device_id

    def release(self, digest: str) -> bytes:
        """The signed release envelope: the bytes the MQTT path publishes on ``blobs/{digest}/manifest``."""
        try:
            return canonical_json(release_envelope(self.db, digest))
        except NotFound:
            raise self._refuse(404, "not_found", f"no released bundle {digest[:64]}") from None

    def chunk(self, digest: str) -> ChunkSpan:
        if not DIGEST_RE.match(digest):
            raise self._refuse(404, "not_found", f"{digest[:80]!r} is not a chunk digest (64 hex digits)")
        row = self.db.one("SELECT blob, offset, length FROM chunks WHERE digest = ?", (digest,))
        if row is None:
            raise self._refuse(404, "not_found", f"no released chunk {digest}")
        return ChunkSpan(digest, self.store.path(row["blob"]), row["offset"], row["length"])

    def open(self, span: ChunkSpan) -> BinaryIO:
        """The blob file, checked to hold the whole chunk (else 500: the store is damaged, not the request)."""
        try:
            f = span.path.open("rb")
        except OSError as exc:
            raise self._refuse(500, "store_damaged", f"chunk {span.digest[:12]}…: its blob is unreadable: {exc}") from None
        if f.seek(0, 2) < span.offset + span.length:
            f.close()
            raise self._refuse(500, "store_damaged", f"chunk {span.digest[:12]}…: its blob is truncated")
        return f

    def range_refused(self, span: ChunkSpan, header: str) -> HTTPException:
        exc = self._refuse(416, "bad_range", f"range {header[:80]!r} is outside chunk {span.digest[:12]}… "
                                             f"({span.length} bytes)")
        exc.headers = {"Content-Range": f"bytes */{span.length}"}
        return exc

    def stream(self, f: BinaryIO, offset: int, length: int) -> Iterator[bytes]:
        """``length`` bytes from ``offset``, a block at a time (a chunk is never held whole), counted as sent."""
        try:
            f.seek(offset)
            left = length
            while left > 0:
                block = f.read(min(BLOCK, left))
                if not block:
                    return
                left -= len(block)
                with self._lock:
                    self.bytes_sent += len(block)
                yield block
            with self._lock:
                self.chunks_served += 1
        finally:
            f.close()
