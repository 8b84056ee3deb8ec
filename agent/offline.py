"""Offline install: an offline package (``protocol/offline.py``) verified and installed by the running agent.

The package goes through the online path's checks and installer, nothing of its own: its roots through
:meth:`agent.reconcile.Trust.on_root` (rotations walked in order), its desired state through
:meth:`Trust.on_desired` (director signature, expiry, device, a newer revision), its releases through
:class:`agent.transfer.VerifiedFetch` (release signature, digest, version, size) and every chunk by its
digest. All of it is judged first on a copy of the device's trust, so a refused package changes nothing;
an accepted one is applied as a desired state from the hub would be, and the executor installs it
(journal, health check, bake, rollback) reading the chunks from the package instead of the broker.

The running agent takes packages from ``DATA/inbox/*.tar`` (``python -m agent install-offline`` puts them
there) and answers each in ``DATA/inbox/<name>.result.json``. ``DATA/offline.json`` records the last
revision installed this way: the reported state says ``source: offline`` while that revision is applied.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import InstallError
from agent.journal import atomic_write_json
from agent.limits import DownloadLimits
from agent.reconcile import Accepted, Refused, Trust, TrustEvent
from agent.transfer import Reject, VerifiedFetch
from modules.store import ContentStore
from protocol.encoding import ProtocolError, digest_of, sha256_hex
from protocol.manifest import Manifest, fixed_chunks
from protocol.messages import DesiredModule, DesiredState
from protocol.offline import (
    DESIRED,
    INDEX,
    MAX_JSON_BYTES,
    MAX_PACKAGE_MEMBERS,
    OfflineIndex,
    check_member,
    chunk_member,
    release_member,
)
from protocol.schema import validate
from protocol.signing import Root, parse_envelope

log = logging.getLogger("edgefleet.agent.offline")

INBOX = "inbox"
MARKER = "offline.json"
RESULT_SUFFIX = ".result.json"
# exit codes of `install-offline`, also in each result file
OK, USAGE, REFUSED, FAILED, TIMEOUT = 0, 2, 3, 4, 5
FINAL = {"running": OK, "failed": FAILED, "rolled_back": FAILED}


class PackageRefused(Exception):
    """The package is refused; nothing was applied. The text says why."""


@dataclass
class Package:
    """An opened package: its JSON members read (bounded), its chunks left in the tar until installed."""

    path: Path
    index: OfflineIndex
    members: dict[str, tarfile.TarInfo]
    json: dict[str, bytes] = field(default_factory=dict)

    @classmethod
    def open(cls, path: Path) -> Package:
        try:
            with tarfile.open(path, "r:") as tar:
                members: dict[str, tarfile.TarInfo] = {}
                json_bytes = 0
                for info in tar:
                    if len(members) >= MAX_PACKAGE_MEMBERS:
                        raise PackageRefused(f"more than {MAX_PACKAGE_MEMBERS} members")
                    check_member(info.name, info.size, info.isfile())
                    if info.name in members:
                        raise PackageRefused(f"member {info.name} appears twice")
                    members[info.name] = info
                    json_bytes += 0 if info.name.startswith("chunks/") else info.size
                    if json_bytes > MAX_JSON_BYTES:
                        raise PackageRefused(f"its signed documents exceed {MAX_JSON_BYTES} bytes together")
                json_members = {n: _read(tar, i) for n, i in members.items() if not n.startswith("chunks/")}
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise PackageRefused(f"not a readable tar file: {exc}") from None
        except ProtocolError as exc:
            raise PackageRefused(str(exc)) from None
        if INDEX not in json_members or DESIRED not in json_members:
            raise PackageRefused(f"not an offline package: {INDEX} or {DESIRED} is missing")
        try:
            index = validate(OfflineIndex, json.loads(json_members[INDEX]))
        except (ValueError, ProtocolError) as exc:
            raise PackageRefused(f"{INDEX}: {exc}") from None
        return cls(path, index, members, json_members)

    def chunk(self, digest: str) -> bytes | None:
        """A chunk's bytes as the package holds them (unchecked), or None when it holds none."""
        info = self.members.get(chunk_member(digest))
        if info is None:
            return None
        try:
            with tarfile.open(self.path, "r:") as tar:
                return _read(tar, info)
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise PackageRefused(f"chunk {digest[:12]}… unreadable: {exc}") from None


def _read(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    f = tar.extractfile(info)
    if f is None:
        raise PackageRefused(f"member {info.name} is not a regular file")
    return f.read()


@dataclass(frozen=True)
class Verdict:
    """A package judged against a copy of the device's trust: what to apply to the real one."""

    state: DesiredState | None  # None: the package's state is the one already applied
    roots: list[tuple[int, bytes]]
    desired: bytes
    releases: dict[str, tuple[dict[str, Any], Manifest]]


def judge(pkg: Package, device_id: str, root_envelope: Any, applied: Any, policy: Any, chunks: ContentStore,
          now: float) -> Verdict:
    """Everything the online path checks, on a copy of the device's trust; PackageRefused says what failed."""
    if pkg.index.device != device_id:
        raise PackageRefused(f"package is for device {pkg.index.device!r}, this is {device_id!r}")
    trust = Trust(device_id, root_envelope, applied, policy)
    roots = sorted((int(n[6:-5]), b) for n, b in pkg.json.items() if n.startswith("roots/"))
    own = trust.root.version
    for version, payload in roots:
        if version == own and digest_of(_parse(payload, f"root {version}")) != digest_of(root_envelope):
            raise PackageRefused(f"package comes from another root of trust: its root version {version} is not the"
                                 f" one this device trusts")
    events = [e for v, p in roots for e in trust.on_root(v, p, now)]
    events += trust.on_desired(pkg.json[DESIRED], now)
    if refused := [e for e in events if isinstance(e, Refused)]:
        what = "root" if refused[0].kind == "root" else "desired state"
        raise PackageRefused(f"{what} refused: {refused[0].reason}")
    state = next((e.state for e in events if isinstance(e, Accepted)), None)
    current = state or trust.desired
    if current is None or trust.desired_digest != digest_of(_parse(pkg.json[DESIRED], "desired state")):
        raise PackageRefused("desired state not accepted")  # e.g. held for a root the package does not carry
    releases = {}
    for m in wanted(current):
        payload = pkg.json.get(release_member(m.bundle))
        if payload is None:
            raise PackageRefused(f"package lacks the release of {m.name} v{m.version} ({m.bundle[:12]}…)")
        fetch = VerifiedFetch(m, trust.root, chunks, Path("."), reject=lambda *a: None, clock=lambda: now)
        try:
            envelope = _parse(payload, f"release {m.bundle[:12]}…")
            manifest = fetch._verify(envelope)
        except ProtocolError as exc:
            raise PackageRefused(f"release of {m.name} v{m.version} refused: {exc}") from None
        for f in manifest.files:
            for digest, size in fixed_chunks(f):
                if chunks.has(digest):
                    continue
                data = pkg.chunk(digest)
                if data is None:
                    raise PackageRefused(f"package lacks chunk {digest[:12]}… of {m.name}/{f.path}")
                if len(data) != size or sha256_hex(data) != digest:
                    raise PackageRefused(f"chunk {digest[:12]}… of {m.name}/{f.path} does not match its digest"
                                         f" (tampered or corrupt)")
        releases[m.bundle] = (envelope, manifest)
    return Verdict(state, roots, pkg.json[DESIRED], releases)


def _parse(payload: bytes, what: str) -> Any:
    try:
        return parse_envelope(payload)
    except ProtocolError as exc:
        raise PackageRefused(f"{what}: {exc}") from None


def wanted(state: DesiredState) -> list[DesiredModule]:
    """The bundles a desired state installs: each module's, and a shadow's candidate."""
    return [x for m in state.modules for x in (m, m.candidate()) if x is not None]


class PackageFetch(VerifiedFetch):
    """The executor's transfer for a bundle an offline package carries: its verified release and chunks."""

    def __init__(self, pkg: Package, module: DesiredModule, root: Root, chunks: ContentStore, manifests_dir: Path,
                 reject: Reject, progress: Callable[[float], None], clock: Callable[[], float],
                 limits: DownloadLimits) -> None:
        super().__init__(module, root, chunks, manifests_dir, reject, progress, clock, limits)
        self.pkg = pkg

    async def run(self) -> dict[str, Any]:
        payload = self.pkg.json.get(release_member(self.module.bundle))
        if payload is None:
            raise InstallError(f"the offline package lacks the release of {self.module.bundle[:12]}…")
        try:
            envelope = parse_envelope(payload)
            self._use_manifest(envelope, self._verify(envelope))
        except ProtocolError as exc:
            raise InstallError(f"release refused: {exc}") from None
        self._keep_manifest(payload)
        self.check_space()
        await asyncio.to_thread(self._store_chunks)
        assert self.envelope is not None
        return self.envelope

    def _store_chunks(self) -> None:
        for digest in sorted(self._missing):
            try:
                data = self.pkg.chunk(digest)
            except PackageRefused as exc:
                raise InstallError(f"the offline package: {exc}") from None
            if data is None or len(data) != self._sizes[digest]:
                raise InstallError(f"the offline package lacks chunk {digest[:12]}… (or it has another size)")
            try:
                self.chunks.put(data, expected=digest)
            except ValueError:
                raise InstallError(f"chunk {digest[:12]}… of the offline package does not match its digest") from None
            self._missing.discard(digest)
            self._report_progress()


def offline_revision(data_dir: Path) -> int:
    """The revision last installed from an offline package (0: none)."""
    try:
        return int(json.loads((data_dir / MARKER).read_text())["revision"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


class OfflineInbox:
    """Takes packages from ``DATA/inbox`` while the agent runs; one at a time, each answered in a result file."""

    def __init__(self, agent: Any, interval: float = 1.0, install_timeout: float = 600.0) -> None:
        """``agent``: an :class:`agent.core.Agent` (not imported: the core imports the executor, which imports this)."""
        self.agent, self.interval, self.install_timeout = agent, interval, install_timeout
        self.dir = agent.data_dir / INBOX

    async def loop(self) -> None:
        await self.agent.started.wait()
        self.dir.mkdir(mode=0o700, exist_ok=True)
        while True:
            for path in sorted(self.dir.glob("*.tar")):
                try:
                    result = await self.install(path)
                except Exception as exc:  # answer it whatever went wrong, and keep taking packages
                    log.exception("%s: offline package %s", self.agent.device_id, path.name)
                    result = {"code": FAILED, "reason": f"install failed: {exc!r}", "revision": self.agent.revision}
                atomic_write_json(result_path(path), result)
                path.unlink(missing_ok=True)
            await asyncio.sleep(self.interval)  # a directory to watch without inotify: polled

    async def install(self, path: Path) -> dict[str, Any]:
        """Judge, apply and install one package; the result as written to its result file."""
        a = self.agent
        try:
            pkg = await asyncio.to_thread(Package.open, path)
            verdict = await asyncio.to_thread(judge, pkg, a.device_id, a.identity.root, a.trust.state.applied,
                                              a.trust.state.policy_envelope, a.chunks, a.clock())
        except PackageRefused as exc:
            a.rejected["offline"] += 1
            log.error("%s: offline package %s refused: %s", a.device_id, path.name, exc)
            return {"code": REFUSED, "reason": f"refused: {exc}", "revision": a.trust.revision}
        for bundle in verdict.releases:
            a.executor.packages[bundle] = pkg
        try:
            if verdict.state is None:  # e.g. again after a restart interrupted its install: the next pass uses it
                a.executor.wake.set()
                return await self._outcome(path, "already applied")
            # the real trust, as a message from the hub would: judged on the copy, so accepted here too
            atomic_write_json(a.data_dir / MARKER, {"revision": verdict.state.revision, "file": path.name,
                                                    "installed_at": time.time()})
            a.reporter.offline_revision = verdict.state.revision
            topic = f"offline:{path.name}"
            events: list[TrustEvent] = [e for v, p in verdict.roots for e in a.trust.on_root(v, p, a.clock())]
            events += a.trust.on_desired(verdict.desired, a.clock())
            a._apply(topic, events)
            if a.trust.revision != verdict.state.revision:
                return {"code": REFUSED, "reason": f"refused: {a.desired_error or 'not accepted'}",
                        "revision": a.trust.revision}
            log.warning("%s: offline package %s: desired revision %d accepted, installing", a.device_id, path.name,
                        verdict.state.revision)
            return await self._outcome(path, "installed")
        finally:
            for bundle in verdict.releases:
                a.executor.packages.pop(bundle, None)

    async def _outcome(self, path: Path, what: str) -> dict[str, Any]:
        """Wait until every desired module is running, or failed; then say so."""
        a = self.agent
        deadline = asyncio.get_running_loop().time() + self.install_timeout
        while True:
            report = a.reported()
            states = {m.name: m for m in report.modules}
            if all(m.state in FINAL for m in states.values()):
                break
            if asyncio.get_running_loop().time() > deadline:
                return {"code": TIMEOUT, "reason": f"still installing after {self.install_timeout:g}s: " + ", ".join(
                    f"{m.name} {m.state}" for m in states.values()), "revision": report.revision}
            await asyncio.sleep(0.2)  # the reporter's changes are not a queue this can wait on
        failed = [m for m in states.values() if m.state != "running"]
        modules = [{"name": m.name, "version": m.version, "state": m.state, "error": m.error}
                   for m in states.values()]
        if failed:
            return {"code": FAILED, "reason": "install failed: " + "; ".join(
                f"{m.name} v{m.version} {m.state}: {m.error}" for m in failed), "revision": report.revision,
                "modules": modules}
        return {"code": OK, "reason": f"{what}: desired revision {report.revision} (" + ", ".join(
            f"{m.name} v{m.version}" for m in states.values()) + ")", "revision": report.revision, "modules": modules}


def result_path(tar: Path) -> Path:
    return tar.with_name(tar.stem + RESULT_SUFFIX)

