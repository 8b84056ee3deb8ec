"""Bundle transfer over HTTP(S) from the hub: the release envelope, then each chunk the local store lacks.

The checks are the MQTT path's (``agent/transfer.py``, shared through ``VerifiedFetch``): the envelope
against the root of trust, its expiry and the desired state; each chunk's size and sha256 before it is
stored. A few chunks are in flight at once; a chunk cut short resumes with a ``Range`` request; chunks
already in the store are never fetched again, so a restart resumes. The client is the standard
library's ``http.client`` (paho loads it anyway) run in threads: httpx would cost the agent ~15 MB.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
import json
import logging
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from agent.errors import InstallError, SlowDownload
from agent.identity import check_hub_url
from agent.limits import DownloadLimits, RateWatch, disk_full, is_disk_full
from agent.transfer import Progress, Reject, VerifiedFetch
from modules.store import ContentStore
from protocol.encoding import ProtocolError, sha256_hex
from protocol.messages import DesiredModule
from protocol.signing import MAX_ENVELOPE_BYTES, Root, parse_envelope

log = logging.getLogger("edgefleet.agent.http")

CONCURRENCY = 4  # chunks in flight
MISMATCH_ATTEMPTS = 3  # a chunk whose bytes keep failing their digest fails the install
BLOCK = 64 * 1024
MAX_ERROR_BODY = 64 * 1024
Note = Callable[[str], None]  # the transfer's current trouble ("" once it is over), for the reported state


def _content_length(resp: http.client.HTTPResponse) -> int | None:
    try:
        return int(resp.getheader("content-length") or "")
    except ValueError:
        return None


class Transient(Exception):
    """Worth trying again later: the hub is unreachable or answered 5xx."""


# A refused connection, a timeout, a certificate failure, a dropped response: retried with backoff.
TRANSIENT = (OSError, http.client.HTTPException, Transient)


class HubHttp:
    """A small keep-alive HTTP(S) client for the hub's device routes, authenticated as the device (HTTP Basic).

    Thread-safe: each request takes an idle connection (or opens one) and returns it when the answer was read.
    ``https://`` verifies against the system store plus ``ca_pem`` (the broker CA pinned at enrolment).
    """

    def __init__(self, base_url: str, device_id: str, password: str | None, ca_pem: str | None = None,
                 timeout: float = 30.0) -> None:
        url = urlsplit(check_hub_url(base_url))
        self.base_url = base_url.rstrip("/")
        self.host, self.port, self.prefix = url.hostname, url.port, url.path.rstrip("/")
        self.timeout = timeout
        self._auth = "Basic " + base64.b64encode(f"{device_id}:{password or ''}".encode()).decode()
        self.https, self.ca_pem = url.scheme == "https", ca_pem
        self._ctx: ssl.SSLContext | None = None  # made at the first connection: the CA store costs ~1.5 MB
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def _new(self) -> http.client.HTTPConnection:
        if self.https:
            with self._lock:
                if self._ctx is None:
                    self._ctx = ssl.create_default_context()
                    if self.ca_pem:
                        self._ctx.load_verify_locations(cadata=self.ca_pem)
            return http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout, context=self._ctx)
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    @contextlib.contextmanager
    def get(self, path: str, headers: dict[str, str] | None = None) -> Iterator[http.client.HTTPResponse]:
        """GET ``path``; the caller reads the response inside the block (fully, or the connection is dropped)."""
        with self._lock:
            conn, pooled = (self._idle.pop(), True) if self._idle else (self._new(), False)
        hdrs = {"Authorization": self._auth, **(headers or {})}
        resp: http.client.HTTPResponse | None = None
        try:
            try:
                conn.request("GET", self.prefix + path, headers=hdrs)
                resp = conn.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                if not pooled:
                    raise
                conn.close()  # the hub closed an idle keep-alive connection: one fresh try
                conn = self._new()
                conn.request("GET", self.prefix + path, headers=hdrs)
                resp = conn.getresponse()
            yield resp
        except BaseException:
            _drop(conn, resp)
            raise
        if resp.isclosed() and not resp.will_close:
            with self._lock:
                self._idle.append(conn)
        else:
            _drop(conn, resp)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _drop(conn: http.client.HTTPConnection, resp: http.client.HTTPResponse | None) -> None:
    """Close both: an answer with ``Connection: close`` holds the socket itself, not the connection."""
    if resp is not None:
        resp.close()
    conn.close()


def _detail(body: bytes) -> str:
    """The hub's ``{"detail": ...}`` text, or the raw body."""
    try:
        detail = json.loads(body).get("detail")
        if isinstance(detail, str):
            return detail
    except (ValueError, AttributeError):
        pass
    return body.decode("utf-8", "replace")[:300]


def check_status(status: int, body: bytes, what: str) -> None:
    """Raise for an answer that is not 200/206: InstallError when asking again cannot help, Transient otherwise."""
    if status in (200, 206):
        return
    detail = _detail(body)
    if status in (401, 403):
        raise InstallError(f"hub refused the download of {what} (HTTP {status}): {detail}")
    if 400 <= status < 500 and status not in (408, 429):
        raise InstallError(f"hub has no {what} for this device (HTTP {status}): {detail}")
    raise Transient(f"hub answered HTTP {status} for {what}: {detail}")


class HttpBundleFetch(VerifiedFetch):
    """Fetches one bundle from the hub over HTTP(S); ``run()`` returns the verified release envelope."""

    def __init__(self, http: HubHttp, module: DesiredModule, root: Root, chunks: ContentStore, manifests_dir: Path,
                 partial_dir: Path, reject: Reject, progress: Progress | None = None, note: Note | None = None,
                 retry: float = 3.0, retry_cap: float = 30.0, clock: Callable[[], float] | None = None,
                 concurrency: int = CONCURRENCY, limits: DownloadLimits | None = None) -> None:
        super().__init__(module, root, chunks, manifests_dir, reject, progress, clock, limits)
        self.http = http
        self.partial_dir = partial_dir
        self.note = note
        self.retry, self.retry_cap = retry, retry_cap
        self.concurrency = concurrency
        self.fetched = 0  # chunks downloaded and stored by this fetch, for tests and logs
        self._trouble = ""

    def _url(self, path: str) -> str:
        return self.http.base_url + path

    def _set_trouble(self, text: str) -> None:
        if text != self._trouble:
            self._trouble = text
            if text:
                log.warning("bundle %s: %s (retrying)", self.module.bundle[:12], text)
            if self.note is not None:
                self.note(text)

    async def run(self) -> dict[str, Any]:
        self._load_cached_manifest()
        if self.manifest is None:
            await self._fetch_release()
        self.check_space()
        await self._fetch_chunks()
        self._set_trouble("")
        assert self.envelope is not None
        log.info("bundle %s: %d chunk bytes fetched in %d chunks", self.module.bundle[:12], self.fetched_bytes,
                 self.fetched)
        return self.envelope

    async def _retrying(self, step: Callable[[], Any]) -> Any:
        """Run the blocking ``step`` in a thread until it does not fail transiently (backoff up to retry_cap)."""
        delay = self.retry
        while True:
            try:
                return await asyncio.to_thread(step)
            except TRANSIENT as exc:
                if is_disk_full(exc):  # waiting will not make room: fail now, tried again after retry_s
                    raise disk_full(exc, "downloading") from None  # type: ignore[arg-type]
                self._set_trouble(f"download from {self.http.base_url} failed: {exc}")
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.retry_cap)

    async def _fetch_release(self) -> None:
        path = f"/api/v1/device/bundles/{self.module.bundle}/release"

        def get() -> bytes:
            with self.http.get(path) as resp:
                # Never read to the end: an endless answer is cut at the cap (the connection is dropped).
                body = self._read_capped(resp, MAX_ENVELOPE_BYTES, "release")
                check_status(resp.status, body, f"release {self.module.bundle[:12]}…")
                if len(body) > MAX_ENVELOPE_BYTES:
                    raise InstallError(f"release answer is more than {MAX_ENVELOPE_BYTES} bytes: refused unread")
                return body

        payload = await self._retrying(get)
        try:
            envelope = parse_envelope(payload)
            manifest = self._verify(envelope)
        except ProtocolError as exc:
            # It came from the authenticated hub: asking again gives the same answer.
            self.reject("manifest", self._url(path), str(exc))
            raise InstallError(f"manifest refused: {exc}") from None
        self._use_manifest(envelope, manifest)
        self._keep_manifest(payload)

    async def _fetch_chunks(self) -> None:
        todo = iter(sorted(self._missing))

        async def worker() -> None:
            for digest in todo:  # one shared iterator: each worker takes the next chunk
                await self._fetch_chunk(digest)

        tasks = [asyncio.create_task(worker()) for _ in range(min(self.concurrency, len(self._missing)))]
        if not tasks:
            return
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _fetch_chunk(self, digest: str) -> None:
        refusals = 0
        while True:
            problem = await self._retrying(lambda: self._download(digest))
            if not problem:
                break
            refusals += 1
            self.reject("blob", self._url(f"/api/v1/device/chunks/{digest}"), problem)
            if refusals >= MISMATCH_ATTEMPTS:
                raise InstallError(f"chunk {digest[:12]}… from the hub refused {refusals} times: {problem}")
        self.fetched += 1
        self.fetched_bytes += self._sizes[digest]
        self._missing.discard(digest)
        self._set_trouble("")
        self._report_progress()

    def _read_block(self, resp: http.client.HTTPResponse, watch: RateWatch, what: str) -> bytes:
        """The next bytes as they arrive (``read1``: a trickle returns each time), the rate judged after each."""
        try:
            block = resp.read1(BLOCK)
        except TimeoutError:  # nothing for the socket timeout (at most the window): as slow as it gets
            raise SlowDownload(f"{what}: no bytes for {self.http.timeout:g} s: aborted as a slow retrieval") from None
        watch.feed(len(block))
        if slow := watch.problem():
            raise SlowDownload(f"{what}: {slow}")
        return block

    def _read_capped(self, resp: http.client.HTTPResponse, cap: int, what: str) -> bytes:
        """At most ``cap + 1`` bytes of the answer (one more shows it is over the cap), at the minimum rate."""
        announced = _content_length(resp)
        if announced is not None and announced > cap:  # refused by its header: not one byte read
            raise InstallError(f"{what} answer announces {announced} bytes, more than {cap}: refused unread")
        watch = RateWatch(self.limits.min_bps, self.limits.window_s)
        body = bytearray()
        while len(body) <= cap and (block := self._read_block(resp, watch, what)):
            body += block
        return bytes(body[:cap + 1])

    def _download(self, digest: str, size: int | None = None) -> str:
        """Fetch one chunk into ``partial_dir`` (resuming a partial one), check it and store it; "" when stored,
        else why the bytes were refused. Runs in a worker thread."""
        size = self._sizes[digest] if size is None else size
        self.partial_dir.mkdir(parents=True, exist_ok=True)
        part = self.partial_dir / digest
        have = part.stat().st_size if part.exists() else 0
        if have >= size:
            part.unlink()
            have = 0
        with self.http.get(f"/api/v1/device/chunks/{digest}", {"Range": f"bytes={have}-"} if have else None) as resp:
            announced = _content_length(resp)
            if resp.status == 416:  # our partial copy is not a prefix the hub can continue: start over
                resp.read(MAX_ERROR_BODY)  # never to its end: a longer answer is dropped with the connection
                part.unlink(missing_ok=True)
                raise Transient(f"chunk {digest[:12]}…: range not satisfiable, starting it over")
            if resp.status not in (200, 206):
                check_status(resp.status, resp.read(MAX_ERROR_BODY), f"chunk {digest[:12]}…")
            resumed = resp.status == 206 and (resp.getheader("content-range") or "").startswith(f"bytes {have}-")
            if resp.status == 206 and not resumed:
                raise Transient(f"chunk {digest[:12]}…: the hub answered an unexpected range")
            written = have if resumed else 0
            if announced is not None and written + announced > size:  # refused before one byte is read
                return f"chunk answer announces {written + announced} bytes, the release lists {size}"
            watch = RateWatch(self.limits.min_bps, self.limits.window_s)
            with open(part, "ab" if resumed else "wb") as f:
                while block := self._read_block(resp, watch, f"chunk {digest[:12]}…"):
                    written += len(block)
                    if written > size:
                        break  # more than the release lists: refused below, connection dropped
                    f.write(block)
        if written > size:
            part.unlink(missing_ok=True)
            return f"chunk is more than the {size} bytes the release lists"
        # A dropped answer raised above and keeps its partial file for a Range request; one that ended
        # normally but short is what the hub holds: refused like bad bytes.
        data = part.read_bytes()
        if len(data) != size:
            part.unlink(missing_ok=True)
            return f"chunk is {len(data)} bytes, the release lists {size}"
        if sha256_hex(data) != digest:
            part.unlink(missing_ok=True)
            return "chunk bytes do not hash to the digest they were asked by (tampered or corrupt)"
        self.chunks.put(data, expected=digest)
        part.unlink(missing_ok=True)
        return ""
