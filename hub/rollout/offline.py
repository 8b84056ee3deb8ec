"""Offline packages: one device's desired state and everything needed to install it, as a tar file.

For air-gapped devices (Mender's standalone mode): the director signs the device's desired state as it
would publish it (a fresh revision, stored and published retained like any other, so the hub's retained
state is never older than what the device installs from the package), and the package carries it with
every root version, the releases and the chunks of its bundles. The format is in
``protocol/offline.py`` and docs/protocol.md; the device verifies it with the online path's chain.
"""

from __future__ import annotations

import io
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from hub.errors import Conflict, NotFound
from hub.rollout.director import Director
from hub.store import Database, loads
from hub.store.blobs import BlobStore
from hub.trust.roots_publish import root_chain
from protocol.encoding import canonical_json
from protocol.manifest import Manifest, fixed_chunks
from protocol.offline import DESIRED, INDEX, OfflineIndex, chunk_member, encode_index, release_member, root_member
from protocol.schema import validate


@dataclass(frozen=True)
class OfflinePlan:
    """What one package holds: the members' bytes, and where each chunk lies in the blob store."""

    index: OfflineIndex
    json_members: dict[str, bytes]  # name -> bytes (index, roots, desired state, releases)
    chunks: dict[str, tuple[str, int, int]]  # digest -> (blob, offset, length)


def plan_package(db: Database, director: Director, keys_dir: Any, deployment: str, device: str) -> OfflinePlan:
    """Sign ``device``'s desired state afresh (a new issued revision) and list what its package holds.

    Refused (Conflict) when the device's desired state does not include ``deployment``: the package
    would not install it (the device is outside its target, or the rollout has not reached it).
    """
    if db.one("SELECT 1 FROM devices WHERE id = ?", (device,)) is None:
        raise NotFound(f"device {device!r} is not enrolled")
    if db.one("SELECT 1 FROM deployments WHERE name = ? AND active = 1", (deployment,)) is None:
        raise NotFound(f"no active deployment {deployment!r}")
    # renew_before in the future: re-signed whatever it holds, so the package gets a full lifetime
    if director.sync([device], renew_before=time.time() + director.ttl_s + 1) == 0 and not director.leader.is_leader():
        raise Conflict("this hub replica is not the leader: only the leader signs desired states; ask again")
    row = db.one("SELECT revision, desired_envelope FROM devices WHERE id = ?", (device,))
    assert row is not None and row["desired_envelope"]
    envelope = loads(row["desired_envelope"])
    modules = envelope["signed"]["modules"]
    if not any(m.get("deployment") == deployment for m in modules):
        raise Conflict(f"device {device!r} does not get deployment {deployment!r} (outside its target, or its"
                       f" rollout has not reached it): its desired state holds"
                       f" {', '.join(m['name'] + ':' + str(m['version']) for m in modules) or 'no module'}")
    members: dict[str, bytes] = {DESIRED: row["desired_envelope"].encode()}
    roots = root_chain(keys_dir)
    for version, root in sorted(roots.items()):
        members[root_member(version)] = canonical_json(root)
    chunks: dict[str, tuple[str, int, int]] = {}
    bundles = [b for m in modules for b in [m["bundle"], *([m["shadow"]["bundle"]] if m.get("shadow") else [])]]
    for bundle in dict.fromkeys(bundles):
        release = db.one("SELECT envelope FROM modules WHERE digest = ?", (bundle,))
        if release is None:
            raise NotFound(f"bundle {bundle[:12]}… of the desired state is not in the registry")
        members[release_member(bundle)] = release["envelope"].encode()
        manifest = validate(Manifest, loads(release["envelope"])["signed"]["manifest"])
        for f in manifest.files:  # the fixed-size chunks: the bundle digest covers them
            offset = 0
            for digest, size in fixed_chunks(f):
                chunks.setdefault(digest, (f.sha256, offset, size))
                offset += size
    index = OfflineIndex(device=device, revision=row["revision"], deployment=deployment, created=time.time(),
                         roots=sorted(roots), releases=list(dict.fromkeys(bundles)), chunks=sorted(chunks),
                         bytes=sum(c[2] for c in chunks.values()))
    return OfflinePlan(index, {INDEX: encode_index(index), **members}, chunks)


def _add(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(mtime), 0o644
    tar.addfile(info, io.BytesIO(data))


def stream_package(plan: OfflinePlan, store: BlobStore) -> Iterator[bytes]:
    """The package as blocks for an HTTP response (written into memory one member at a time)."""
    buf = _Drain()
    with tarfile.open(fileobj=buf, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for name, data in plan.json_members.items():
            _add(tar, name, data, plan.index.created)
            yield buf.take()
        for digest, (blob, offset, length) in sorted(plan.chunks.items()):
            _add(tar, chunk_member(digest), store.read_range(blob, offset, length), plan.index.created)
            yield buf.take()
    yield buf.take()


class _Drain(io.RawIOBase):
    """A write-only file whose bytes are taken out as they come (tarfile's stream mode writes into it)."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self._parts.append(bytes(b))
        return len(b)

    def take(self) -> bytes:
        out, self._parts = b"".join(self._parts), []
        return out
