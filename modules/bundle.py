"""The module bundle: build a manifest from files, sign it, lay it out and check it on disk.

A bundle directory holds ``release.json`` (the release-signed envelope around
the manifest) and ``files/<path>`` for each file the manifest lists.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from protocol.encoding import ProtocolError, canonical_json
from protocol.manifest import (
    CHUNK_SIZE,
    FileEntry,
    Manifest,
    Spans,
    TensorSpec,
    check_relative_path,
    release_document,
)
from protocol.schema import validate
from protocol.signing import Root, SignatureError, sign, update_root
from protocol.verify import accept_manifest

RELEASE_FILE = "release.json"
FILES_DIR = "files"


def read_blocks(path: Path, block: int = CHUNK_SIZE) -> Iterator[bytes]:
    with path.open("rb") as f:
        while data := f.read(block):
            yield data


def describe_path(bundle_path: str, path: Path) -> FileEntry:
    """Hash a file on disk into a FileEntry, holding at most two chunks in memory.

    The whole-file hash runs in a helper thread beside the per-chunk hashes
    (hashlib releases the GIL on large buffers), so describing a file costs
    about one sha256 pass of wall time rather than two.
    """
    whole = hashlib.sha256()
    chunks: list[str] = []
    size = 0
    pending: Future[None] | None = None
    with ThreadPoolExecutor(1, thread_name_prefix="sha256") as pool, path.open("rb") as f:
        while block := f.read(CHUNK_SIZE):
            if pending is not None:
                pending.result()
            pending = pool.submit(whole.update, block)
            chunks.append(hashlib.sha256(block).hexdigest())
            size += len(block)
        if pending is not None:
            pending.result()
    return FileEntry(path=bundle_path, sha256=whole.hexdigest(), size=size, chunks=chunks)


def build_manifest(
    name: str,
    version: int,
    runtime: str,
    files: dict[str, Path],
    model: str,
    entry: str = "",
    sample: str = "",
    inputs: list[TensorSpec] | None = None,
    outputs: list[TensorSpec] | None = None,
    collect_rate_ppm: int = 0,
) -> Manifest:
    """Describe ``files`` (bundle path -> file on disk). Same inputs, same digest: no timestamps, sorted paths."""
    entries: list[FileEntry] = []
    for path in sorted(files):
        entries.append(describe_path(path, files[path]))
    return Manifest(
        name=name, version=version, runtime=runtime, model=model, entry=entry, sample=sample,  # type: ignore[arg-type]
        inputs=inputs or [], outputs=outputs or [], files=entries, collect_rate_ppm=collect_rate_ppm,
    )


def sign_release(manifest: Manifest, keys: list[Any], expires: int, spans: Spans | None = None) -> dict[str, Any]:
    return sign(release_document(manifest, expires, spans), keys)


def write_bundle_dir(dest: Path, envelope: dict[str, Any], open_file: Callable[[FileEntry], Iterator[bytes]]) -> None:
    """Write a bundle directory; ``open_file`` yields a file's bytes. Written beside ``dest`` then renamed."""
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / FILES_DIR).mkdir(parents=True)
    manifest = validate(Manifest, envelope["signed"]["manifest"])
    for entry in manifest.files:
        target = tmp / FILES_DIR / check_relative_path(entry.path)  # checked on parse too; again at the filesystem
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("wb") as out:
            for block in open_file(entry):
                out.write(block)
    (tmp / RELEASE_FILE).write_bytes(canonical_json(envelope))
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)


def check_files(files_dir: Path, manifest: Manifest) -> None:
    """Every listed file exists with its exact length and hash, and nothing else is there."""
    listed = {e.path for e in manifest.files}
    for entry in manifest.files:
        path = files_dir / entry.path
        if not path.is_file():
            raise ProtocolError(f"bundle file {entry.path!r} is missing")
        size = path.stat().st_size
        if size != entry.size:
            kind = "truncated" if size < entry.size else "has extra bytes"
            raise ProtocolError(f"bundle file {entry.path!r} {kind}: {size} bytes, manifest says {entry.size}")
        digest = describe_path(entry.path, path)
        if digest.sha256 != entry.sha256:
            raise ProtocolError(f"bundle file {entry.path!r} hash mismatch: {digest.sha256[:12]}… != {entry.sha256[:12]}…")
    extra = sorted(str(p.relative_to(files_dir)) for p in files_dir.rglob("*") if p.is_file()) if files_dir.exists() else []
    unknown = [p for p in extra if p not in listed]
    if unknown:
        raise ProtocolError(f"bundle holds files its manifest does not list: {unknown[:5]}")


def verify_bundle_dir(bundle_dir: Path, root: Root, now: float | None = None) -> Manifest:
    """Check a bundle directory against the root of trust: signature, expiry, every file's hash and length."""
    release = bundle_dir / RELEASE_FILE
    if not release.is_file():
        raise ProtocolError(f"{bundle_dir} has no {RELEASE_FILE}")
    try:
        envelope = json.loads(release.read_bytes())
    except ValueError as exc:
        raise ProtocolError(f"{RELEASE_FILE} is not JSON: {exc}") from None
    signed = envelope.get("signed", {}) if isinstance(envelope, dict) else {}
    inner = signed.get("manifest") if isinstance(signed, dict) else None
    name = inner.get("name", "") if isinstance(inner, dict) else ""
    digest = signed.get("bundle", "") if isinstance(signed, dict) else ""
    manifest = accept_manifest(envelope, root, digest, name, now=now)
    check_files(bundle_dir / FILES_DIR, manifest)
    return manifest


# --- pulling and checking bundles outside the agent (CLI, tests) ------------------------------------

ROOT_FILE = "root.json"
ROOTS_DIR = "roots"  # roots/<version>.json: the chain a verifier walks from its pinned root


def installed_version(bundle_dir: Path, name: str) -> int:
    """The version of module ``name`` already in ``bundle_dir`` (0 if none): a pull must not go below it."""
    try:
        manifest = json.loads((bundle_dir / RELEASE_FILE).read_bytes())["signed"]["manifest"]
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    if not isinstance(manifest, dict) or manifest.get("name") != name or not isinstance(manifest.get("version"), int):
        return 0
    return manifest["version"]


def _write_checked(target: Path, entry: FileEntry, blocks: Iterator[bytes]) -> None:
    """Write a file, checking length and every chunk hash as bytes arrive: stop at the first byte too many."""
    whole = hashlib.sha256()
    size = index = 0
    buf = bytearray()

    def take(chunk: bytes) -> None:
        nonlocal index
        if index >= len(entry.chunks) or hashlib.sha256(chunk).hexdigest() != entry.chunks[index]:
            raise ProtocolError(f"bundle file {entry.path!r}: chunk {index} does not match its manifest hash")
        index += 1

    with target.open("wb") as out:
        for block in blocks:
            size += len(block)
            if size > entry.size:
                raise ProtocolError(f"bundle file {entry.path!r} is longer than the {entry.size} bytes its manifest "
                                    "lists (oversize or endless data)")
            whole.update(block)
            out.write(block)
            buf += block
            while len(buf) >= CHUNK_SIZE:
                take(bytes(buf[:CHUNK_SIZE]))
                del buf[:CHUNK_SIZE]
        if size < entry.size:  # before the last chunk's hash: say what is really wrong
            raise ProtocolError(f"bundle file {entry.path!r} is truncated: {size} of {entry.size} bytes")
        if buf:
            take(bytes(buf))
    if whole.hexdigest() != entry.sha256:
        raise ProtocolError(f"bundle file {entry.path!r} hash mismatch: {whole.hexdigest()[:12]}… != {entry.sha256[:12]}…")


def pull_bundle(dest: Path, envelope: Any, root: Root, fetch: Callable[[FileEntry], Iterator[bytes]], *,
                digest: str, name: str, version: int | None = None, extra: dict[str, bytes] | None = None,
                now: float | None = None) -> Manifest:
    """Verify a release, fetch its files into a scratch directory beside ``dest``, verify again, then swap it in.

    Any failure removes the scratch directory, so ``dest`` is either the complete,
    verified new bundle or exactly what it was before. ``extra`` holds further
    files for the bundle's top level (e.g. the hub's root chain).
    """
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or (any(dest.iterdir()) and not (dest / RELEASE_FILE).is_file())):
        raise ProtocolError(f"{dest} exists and is not a bundle directory: refusing to replace it")
    manifest = accept_manifest(envelope, root, digest, name, installed_version(dest, name), now)
    if version is not None and manifest.version != version:
        raise ProtocolError(f"release is {manifest.name}:{manifest.version}, not the requested {name}:{version} (mix-and-match)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        for entry in manifest.files:
            target = tmp / FILES_DIR / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            _write_checked(target, entry, fetch(entry))
        (tmp / RELEASE_FILE).write_bytes(canonical_json(envelope))
        for rel, data in (extra or {}).items():
            if rel == FILES_DIR or rel.startswith(FILES_DIR + "/") or rel == RELEASE_FILE:
                raise ProtocolError(f"extra file {rel!r} would shadow the bundle's own files")
            target = tmp / check_relative_path(rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        verify_bundle_dir(tmp, root, now)  # the on-disk result, as a device would check it
        old = dest.with_name(f".{dest.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
        if dest.exists():
            os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def root_chain(bundle_dir: Path) -> list[Any]:
    """Root envelopes shipped in a bundle directory (``roots/*.json`` and ``root.json``), oldest first."""
    found: dict[int, Any] = {}
    paths = sorted((bundle_dir / ROOTS_DIR).glob("*.json")) if (bundle_dir / ROOTS_DIR).is_dir() else []
    for path in [*paths, bundle_dir / ROOT_FILE]:
        if not path.is_file():
            continue
        try:
            envelope = json.loads(path.read_bytes())
            found[int(envelope["signed"]["version"])] = envelope
        except (ValueError, KeyError, TypeError) as exc:
            raise ProtocolError(f"{path.relative_to(bundle_dir)} is not a root document: {exc!r}") from None
    return [found[v] for v in sorted(found)]


def walk_roots(pinned: Root, chain: list[Any], now: float | None = None) -> tuple[Root, list[Root]]:
    """Move from the pinned root through each newer root in ``chain`` (each must be signed by the one before);
    the root reached must not have expired (the pinned and intermediate ones may have)."""
    current, seen = pinned, [pinned]
    for envelope in chain:
        version = envelope.get("signed", {}).get("version") if isinstance(envelope, dict) else None
        if not isinstance(version, int) or version <= current.version:
            continue
        try:
            current = update_root(current, envelope, now)
        except ProtocolError as exc:
            raise ProtocolError(f"root version {version} does not follow from trusted version {current.version}: {exc}") from None
        seen.append(current)
    if current.expired(now):  # judged once, on the root the chain reached (TUF §5.3.10)
        raise SignatureError(f"root version {current.version} expired at {current.expires} "
                             "(freeze attack or stale root: fetch a newer root)")
    return current, seen


def explain_revoked(exc: ProtocolError, envelope: Any, role: str, history: list[Root]) -> ProtocolError:
    """Name the rotation that revoked the signing key, when an older root trusted it for ``role``."""
    if not isinstance(exc, SignatureError) or len(history) < 2:
        return exc
    signers = {s.get("keyid") for s in envelope.get("signatures", []) if isinstance(s, dict)} if isinstance(envelope, dict) else set()
    current = set(history[-1].roles[role][0])
    for older, newer in zip(history, history[1:]):
        gone = (set(older.roles[role][0]) - set(newer.roles[role][0])) & signers
        if gone and not signers & current:
            kid = sorted(gone)[0]
            return SignatureError(f"{exc}: key {kid[:12]}… was revoked for role {role!r} by root version {newer.version}")
    return exc


def verify_pulled(bundle_dir: Path, pinned: Root, min_version: int = 0, now: float | None = None) -> Manifest:
    """Check a pulled bundle directory against a pinned root, following the root chain it ships, if any."""
    bundle_dir = Path(bundle_dir)
    root, history = walk_roots(pinned, root_chain(bundle_dir), now)
    try:
        manifest = verify_bundle_dir(bundle_dir, root, now)
    except ProtocolError as exc:
        try:
            envelope = json.loads((bundle_dir / RELEASE_FILE).read_bytes())
        except (OSError, ValueError):
            raise exc from None
        raise explain_revoked(exc, envelope, "release", history) from None
    if manifest.version < min_version:
        raise ProtocolError(f"bundle version {manifest.version} is older than {min_version} (rollback)")
    return manifest
