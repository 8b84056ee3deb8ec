"""The module bundle: build a manifest from files, sign it, lay it out and check it on disk.

A bundle directory holds ``release.json`` (the release-signed envelope around
the manifest) and ``files/<path>`` for each file the manifest lists.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from protocol.encoding import ProtocolError, canonical_json
from protocol.manifest import CHUNK_SIZE, FileEntry, Manifest, TensorSpec, describe_file, release_document
from protocol.signing import Root, sign
from protocol.verify import accept_manifest

RELEASE_FILE = "release.json"
FILES_DIR = "files"


def read_blocks(path: Path, block: int = CHUNK_SIZE) -> Iterator[bytes]:
    with path.open("rb") as f:
        while data := f.read(block):
            yield data


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
        described, _ = describe_file(path, read_blocks(files[path]))
        entries.append(described)
    return Manifest(
        name=name, version=version, runtime=runtime, model=model, entry=entry, sample=sample,  # type: ignore[arg-type]
        inputs=inputs or [], outputs=outputs or [], files=entries, collect_rate_ppm=collect_rate_ppm,
    )


def sign_release(manifest: Manifest, keys: list[Any], expires: int) -> dict[str, Any]:
    return sign(release_document(manifest, expires), keys)


def write_bundle_dir(dest: Path, envelope: dict[str, Any], open_file: Callable[[FileEntry], Iterator[bytes]]) -> None:
    """Write a bundle directory; ``open_file`` yields a file's bytes. Written beside ``dest`` then renamed."""
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / FILES_DIR).mkdir(parents=True)
    manifest = Manifest.model_validate(envelope["signed"]["manifest"])
    for entry in manifest.files:
        target = tmp / FILES_DIR / entry.path
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
        digest, _ = describe_file(entry.path, read_blocks(path))
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
