"""Chunk garbage collection: the chunk store keeps only what a bundle kept on disk, or one still wanted, lists.

A bundle is kept when its version directory is on disk (the active version and the one before it, the
rollback target), or when the desired state still wants it and its verified release is cached in
``manifests/`` (an install under way or to be tried again). The chunks those releases list (fixed-size
chunks and spans) stay, so an update still fetches only what is new; every other chunk, cached release and
partial download goes: those of rolled-back, failed, superseded and removed versions.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from modules.bundle import RELEASE_FILE
from modules.store import ContentStore
from protocol.encoding import ProtocolError
from protocol.manifest import Manifest, parse_spans
from protocol.schema import validate
from protocol.topics import DIGEST_RE

log = logging.getLogger("edgefleet.agent.gc")


def listed_chunks(envelope: Any) -> set[str]:
    """Every chunk a release lists: its fixed-size chunks and, where it has them, its spans."""
    manifest = validate(Manifest, envelope["signed"]["manifest"])
    out = set(manifest.chunk_digests())
    try:
        out |= {d for chunks in parse_spans(envelope["signed"], manifest).values() for d, _ in chunks}
    except ProtocolError:
        pass  # spans the transfer refused: it fetched the fixed-size chunks
    return out


def collect_chunks(modules_dir: Path, manifests_dir: Path, partial_dir: Path, chunks: ContentStore,
                   wanted: Iterable[str]) -> tuple[int, int]:
    """Delete what no kept bundle lists; the number of chunks and bytes freed. Run between installs only."""
    releases: dict[str, Path] = {}
    for version in modules_dir.glob("*/*"):
        if DIGEST_RE.match(version.name) and (version / RELEASE_FILE).is_file():
            releases[version.name] = version / RELEASE_FILE
    for bundle in wanted:
        cached = manifests_dir / f"{bundle}.json"
        if bundle not in releases and cached.is_file():
            releases[bundle] = cached
    keep: set[str] = set()
    for bundle, path in releases.items():
        try:
            keep |= listed_chunks(json.loads(path.read_bytes()))
        except (OSError, ValueError, TypeError, KeyError, ProtocolError) as exc:
            # Unreadable: keep everything rather than guess (the version is checked again before it runs).
            log.warning("chunk collection skipped: the release of %s is unreadable (%s)", bundle[:12], exc)
            return 0, 0
    freed = count = 0
    for digest in list(chunks.digests()):
        if digest not in keep:
            freed += chunks.delete(digest)
            count += 1
    for cached in manifests_dir.glob("*.json"):
        if cached.stem not in releases:
            cached.unlink(missing_ok=True)
    for partial in partial_dir.glob("*") if partial_dir.is_dir() else ():
        if partial.name not in keep:
            partial.unlink(missing_ok=True)
    if count:
        log.info("chunk store: %d chunks (%.1f MB) no kept bundle lists deleted", count, freed / 2**20)
    return count, freed
