"""Bundle transfer over MQTT: ask for the manifest, then for the chunks the local store lacks.

Each file is fetched by whichever of its chunk lists (content-defined spans, when the release lists
them, or fixed-size chunks) has fewer bytes missing from the store (``protocol.manifest.choose_chunks``).

The hub publishes each requested part once per coalescing window on the
bundle's blob topic, so many devices share one copy. Everything received is
checked before it is stored: the manifest against the root of trust and the
desired digest, each chunk against the digest in its topic and the manifest's
list. What is still missing after a timeout is asked for again, with backoff.
The chunk store persists, so a restart or an update moves only what is new.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from agent.errors import InstallError, RetryLater, SlowDownload
from agent.limits import DownloadLimits, RateWatch, check_free, disk_full, is_disk_full
from modules.store import ContentStore
from protocol.encoding import ProtocolError, sha256_hex
from protocol.manifest import MAX_SPAN_BYTES, Chunk, Manifest, choose_chunks, parse_spans
from protocol.messages import BlobRequest, DesiredModule
from protocol.signing import Root, parse_envelope
from protocol.topics import MANIFEST_PART, Channel, blob_topic, blob_wildcard, device_topic
from protocol.verify import accept_manifest

log = logging.getLogger("edgefleet.agent.transfer")

MAX_CHUNKS_PER_REQUEST = 64
MANIFESTS_DIR = "manifests"

Publish = Callable[[str, bytes], Awaitable[None]]
Subscribe = Callable[[str], Awaitable[None]]
Reject = Callable[[str, str, str], None]  # (counter key, topic, reason)
Progress = Callable[[float], None]


def release_spans(envelope: dict[str, Any], manifest: Manifest, reject: Reject | None = None,
                  where: str = "") -> dict[str, list[Chunk]]:
    """The verified release's spans; spans that contradict the manifest are refused (counted, with the reason)
    and the fixed-size chunks, which the bundle digest covers, serve instead."""
    try:
        return parse_spans(envelope.get("signed"), manifest)
    except ProtocolError as exc:
        if reject is not None:
            reject("manifest", where, f"spans refused, using fixed-size chunks: {exc}")
        return {}


class VerifiedFetch:
    """What every transfer shares: the release envelope checked against the root and the desired state,
    kept on disk for a restart, and the set of chunks the local store still lacks."""

    def __init__(self, module: DesiredModule, root: Root, chunks: ContentStore, manifests_dir: Path, reject: Reject,
                 progress: Progress | None = None, clock: Callable[[], float] | None = None,
                 limits: DownloadLimits | None = None) -> None:
        self.module = module
        self.limits = limits or DownloadLimits()
        self.failure: InstallError | None = None  # what stopped the transfer from a callback (a full disk)
        self.root = root
        self.chunks = chunks
        self.manifests_dir = manifests_dir
        self.reject = reject
        self.progress = progress
        self.clock = clock
        self.fatal = ""  # set when the genuine manifest contradicts the desired state
        self.envelope: dict[str, Any] | None = None
        self.manifest: Manifest | None = None
        self._sizes: dict[str, int] = {}  # the chunks of the lists chosen to fetch -> their sizes
        self._listed: set[str] = set()  # every chunk the release lists (devices on the same topic may choose others)
        self._missing: set[str] = set()
        self.fetched_bytes = 0  # chunk bytes this fetch received and stored, for tests and logs

    def _verify(self, envelope: Any) -> Manifest:
        manifest = self._verify_signed(envelope)
        self._check_desired(manifest)
        return manifest

    def _verify_signed(self, envelope: Any) -> Manifest:
        now = self.clock() if self.clock is not None else None
        return accept_manifest(envelope, self.root, self.module.bundle, self.module.name, now=now)

    def _check_desired(self, manifest: Manifest) -> None:
        if manifest.version != self.module.version:
            raise ProtocolError(f"bundle is version {manifest.version}, the desired state says {self.module.version}")
        if manifest.size != self.module.size:
            raise ProtocolError(f"bundle holds {manifest.size} bytes, the desired state says {self.module.size}")

    def _use_manifest(self, envelope: dict[str, Any], manifest: Manifest) -> None:
        self.envelope, self.manifest = envelope, manifest
        spans = release_spans(envelope, manifest, self.reject, f"release {self.module.bundle}")
        chosen = choose_chunks(manifest, spans, self.chunks.has)
        self._sizes = {digest: size for chunks in chosen.values() for digest, size in chunks}
        self._listed = set(manifest.chunk_digests()) | {d for chunks in spans.values() for d, _ in chunks}
        self._missing = {d for d in self._sizes if not self.chunks.has(d)}
        self._report_progress()

    def _keep_manifest(self, payload: bytes) -> None:
        """Keep the verified envelope's bytes, so a restart resumes without asking again."""
        path = self.manifests_dir / f"{self.module.bundle}.json"
        tmp = path.with_name(path.name + ".tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(payload)
            tmp.replace(path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if not is_disk_full(exc):
                raise
            raise disk_full(exc, "keeping the release") from None

    def check_space(self) -> None:
        """Before fetching: the missing chunks plus the unpacked bundle must fit, with the reserve kept free."""
        assert self.manifest is not None
        missing = sum(self._sizes[d] for d in self._missing)
        check_free(self.chunks.root, missing + self.manifest.size, self.limits.reserve_bytes,
                   f"download {self.module.name} v{self.module.version} ({len(self._missing)} chunks missing)")

    def _load_cached_manifest(self) -> None:
        path = self.manifests_dir / f"{self.module.bundle}.json"
        if not path.exists():
            return
        try:
            envelope = json.loads(path.read_bytes())
            self._use_manifest(envelope, self._verify(envelope))
        except (ValueError, TypeError, ProtocolError) as exc:
            log.info("cached manifest %s unusable (%s): asking again", path.name, exc)
            path.unlink(missing_ok=True)

    def _report_progress(self) -> None:
        if self.progress is None or not self._sizes:
            return
        total = sum(self._sizes.values()) or 1
        missing = sum(self._sizes[d] for d in self._missing)
        self.progress((total - missing) / total)


class BundleFetch(VerifiedFetch):
    """Fetches one bundle over MQTT; the agent routes that bundle's blob-topic messages to :meth:`on_part`."""

    def __init__(
        self,
        device_id: str,
        module: DesiredModule,
        root: Root,
        chunks: ContentStore,
        manifests_dir: Path,
        publish: Publish,
        reject: Reject,
        progress: Progress | None = None,
        retry: float = 3.0,
        retry_cap: float = 30.0,
        clock: Callable[[], float] | None = None,
        limits: DownloadLimits | None = None,
    ) -> None:
        super().__init__(module, root, chunks, manifests_dir, reject, progress, clock, limits)
        self.watch = RateWatch(self.limits.min_bps, self.limits.window_s)  # chunk bytes stored, judged per round
        self.device_id = device_id
        self.publish = publish
        self.retry, self.retry_cap = retry, retry_cap
        self._changed = asyncio.Event()
        self.requests = 0  # BlobRequests sent, for tests and telemetry

    @property
    def topic(self) -> str:
        return blob_wildcard(self.module.bundle)

    # --- inbound -----------------------------------------------------------------------------

    def on_part(self, part: str, payload: bytes) -> None:
        topic = blob_topic(self.module.bundle, part)
        if part == MANIFEST_PART:
            if self.manifest is None:
                self._accept_manifest(topic, payload)
            return
        if self.manifest is None:
            # Not judgeable against the manifest yet, but it must at least be what its topic names.
            if len(payload) > MAX_SPAN_BYTES or sha256_hex(payload) != part:
                self.reject("blob", topic, f"{len(payload)} bytes that are not the chunk its topic names")
            return
        if part not in self._listed:
            self.reject("blob", topic, "chunk is not listed in the bundle's release")
            return
        if part not in self._missing:
            return  # a duplicate, or a chunk of a list this device did not choose: the topic serves many devices
        if len(payload) != self._sizes[part]:
            self.reject("blob", topic, f"chunk is {len(payload)} bytes, the release lists {self._sizes[part]}")
            return
        if sha256_hex(payload) != part:
            self.reject("blob", topic, "chunk bytes do not hash to the digest in its topic (tampered or corrupt)")
            return
        try:
            self.chunks.put(payload, expected=part)
        except OSError as exc:  # on the MQTT callback: run() raises it
            self.failure = disk_full(exc, "storing a chunk") if is_disk_full(exc) else RetryLater(
                f"cannot store a chunk: {exc}")
            self._changed.set()
            return
        self.watch.feed(len(payload))
        self.fetched_bytes += len(payload)
        self._missing.discard(part)
        self._report_progress()
        self._changed.set()

    def _accept_manifest(self, topic: str, payload: bytes) -> None:
        try:
            envelope = parse_envelope(payload)
            manifest = self._verify_signed(envelope)
        except ProtocolError as exc:
            # Anyone may publish on a blob topic: refuse this copy and keep waiting for a genuine one.
            self.reject("manifest", topic, str(exc))
            return
        try:
            self._check_desired(manifest)
        except ProtocolError as exc:
            # Genuinely signed but not what the desired state describes: waiting will not fix it.
            self.reject("manifest", topic, str(exc))
            self.fatal = str(exc)
            self._changed.set()
            return
        self._use_manifest(envelope, manifest)
        try:
            self._keep_manifest(payload)
        except InstallError as exc:
            self.failure = exc
        self._changed.set()

    # --- the transfer ------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        """Return the verified release envelope once every chunk is in the store."""
        self._load_cached_manifest()
        delay = self.retry
        while self.manifest is None:
            if self.fatal:
                raise InstallError(f"manifest refused: {self.fatal}")
            self._raise_failure()
            await self._request(manifest=True)
            await self._wait(delay)
            delay = min(delay * 2, self.retry_cap)
        self._raise_failure()
        self.check_space()
        delay = self.retry
        self.watch.restart()
        while self._missing:
            self._raise_failure()
            if slow := self.watch.problem():
                raise SlowDownload(f"{slow} ({len(self._missing)} chunks still missing)")
            before = len(self._missing)
            for i, group in enumerate(_groups(sorted(self._missing), MAX_CHUNKS_PER_REQUEST)):
                await self._request(chunks=group)
                if i % 8 == 7:
                    await asyncio.sleep(0)  # let replies in between large batches of requests
            await self._wait_progress(delay)
            # Back off only while nothing arrives: a slow but moving transfer keeps the short timeout.
            delay = self.retry if len(self._missing) < before else min(delay * 2, self.retry_cap)
        assert self.envelope is not None
        log.info("bundle %s: %d chunk bytes fetched", self.module.bundle[:12], self.fetched_bytes)
        return self.envelope

    async def _request(self, manifest: bool = False, chunks: list[str] | None = None) -> None:
        req = BlobRequest(device=self.device_id, bundle=self.module.bundle, manifest=manifest, chunks=chunks or [])
        self.requests += 1
        try:
            await self.publish(device_topic(self.device_id, Channel.BLOB_REQ), req.encode())
        except ConnectionError:  # offline: the next round asks again, and the rate is judged from then
            self.watch.restart()

    def _raise_failure(self) -> None:
        if self.failure is not None:
            raise self.failure

    async def _wait(self, timeout: float) -> None:
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    async def _wait_progress(self, timeout: float) -> None:
        """Wait until all chunks are in, or ``timeout`` passes without any arriving."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._missing:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
                deadline = loop.time() + timeout
            except TimeoutError:
                return


def _groups(items: list[str], size: int) -> list[list[str]]:
    return [items[i:i + size] for i in range(0, len(items), size)]
