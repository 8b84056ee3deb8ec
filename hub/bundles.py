"""Modules: build a registered model set into a signed bundle, and index its chunks for MQTT transfer."""

from __future__ import annotations

import logging
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

from msgspec.structs import replace

from hub.db import Database, dumps, loads, now
from hub.errors import Invalid, NotFound
from hub.keys import KeyRing
from hub.registry import ModelRegistry
from modules.bundle import build_manifest, sign_release
from modules.errors import ModelError
from modules.pymodel import check_entry_source
from modules.store import ContentStore
from protocol.encoding import ProtocolError, canonical_json
from protocol.manifest import CHUNK_SIZE, Manifest, TensorSpec, parse_manifest
from protocol.schema import validate
from protocol.signing import sign

log = logging.getLogger("edgefleet.hub.bundles")

SAMPLE_PATH = "sample.json"
ENTRY_PATH = "entry.py"
MAX_ENTRY_BYTES = 1024 * 1024


def parse_ref(ref: str) -> tuple[str, int]:
    """``"name:version"`` -> (name, version)."""
    name, sep, version = ref.rpartition(":")
    if not sep or not name or not version.isdigit() or int(version) < 1:
        raise Invalid(f"{ref!r} is not name:version")
    return name, int(version)


def module_row(row: dict[str, Any], with_envelope: bool = False) -> dict[str, Any]:
    envelope = loads(row["envelope"])
    out = {"name": row["name"], "version": row["version"], "digest": row["digest"], "runtime": row["runtime"],
           "size": row["size"], "created_at": row["created_at"],
           "collect_rate_ppm": envelope["signed"]["manifest"].get("collect_rate_ppm", 0)}
    if with_envelope:
        out["envelope"] = envelope
    return out


class ModuleBuilder:
    def __init__(self, db: Database, store: ContentStore, registry: ModelRegistry, keys: KeyRing,
                 release_ttl_s: int) -> None:
        self.db, self.store, self.registry, self.keys = db, store, registry, keys
        self.release_ttl_s = release_ttl_s

    def build(self, name: str, model_refs: list[str], runtime: str | None = None,
              sample: dict[str, Any] | None = None, collect_rate_ppm: int = 0, *,
              entry: str | None = None, entry_name: str = ENTRY_PATH,
              resources: dict[str, Any] | None = None) -> dict[str, Any]:
        """Build version N+1 of module ``name``; rebuilding unchanged inputs returns the latest version instead.

        ``entry`` is the text of a pre/post-processing script (``preprocess``/``postprocess``,
        or ``init``/``run`` for the python runtime); it travels in the bundle as ``entry_name``.
        """
        if not model_refs:
            raise Invalid("a module needs at least one model")
        refs = [parse_ref(ref) for ref in model_refs]
        models = [self.registry.get(*ref) for ref in refs]
        files: dict[str, Path] = {}
        for model in models:
            for f in model["files"]:
                if f["path"] in files:
                    raise Invalid(f"two models both hold a file named {f['path']!r}")
                files[f["path"]] = self.store.path(f["sha256"])
        if sample is not None:
            if not isinstance(sample.get("inputs"), dict) or SAMPLE_PATH in files:
                raise Invalid('sample must be {"inputs": {name: values}} and no model file may be named sample.json')
            digest, _ = self.store.put_blocks([canonical_json(sample)])
            files[SAMPLE_PATH] = self.store.path(digest)
        if entry is not None:
            data = entry.encode()
            if len(data) > MAX_ENTRY_BYTES or not entry_name.endswith(".py") or "/" in entry_name or entry_name in files:
                raise Invalid(f"entry script must be a .py file name not used by a model file (got {entry_name!r}) "
                              f"and at most {MAX_ENTRY_BYTES} bytes")
            digest, _ = self.store.put_blocks([data])
            files[entry_name] = self.store.path(digest)
        first = models[0]
        check_entry(runtime or first["framework"], first, entry, entry_name)
        kwargs: dict[str, Any] = {
            "runtime": runtime or first["framework"], "files": files, "model": first["files"][0]["path"],
            "entry": entry_name if entry is not None else "",
            "sample": SAMPLE_PATH if sample is not None else "", "collect_rate_ppm": collect_rate_ppm,
            "inputs": [validate(TensorSpec, s) for s in first["inputs"]],
            "outputs": [validate(TensorSpec, s) for s in first["outputs"]],
        }
        try:  # hash the files once, outside the write lock; only the version differs below
            draft = build_manifest(name, 1, **kwargs)
            parse_manifest(draft.to_dict())  # the checks a device will make
        except (ValueError, ProtocolError) as exc:  # parse_manifest refuses a bad runtime, rate or name
            raise Invalid(f"cannot build module {name!r}: {exc}") from None
        with self.db.transaction() as tx:
            latest = tx.execute("SELECT version, digest FROM modules WHERE name = ? ORDER BY version DESC LIMIT 1",
                                (name,)).fetchone()
            if latest is not None and replace(draft, version=latest[0]).digest() == latest[1]:
                self._record_sources(tx, name, latest[0], refs, resources)
                return self.get(name, latest[0])
            manifest = replace(draft, version=(latest[0] if latest else 0) + 1)
            envelope = sign_release(manifest, [self.keys.release_key], int(time.time()) + self.release_ttl_s)
            tx.execute("INSERT INTO modules (name, version, digest, runtime, envelope, size, created_at)"
                       " VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (name, manifest.version, manifest.digest(), manifest.runtime, dumps(envelope), manifest.size,
                        now()))
            tx.conn.executemany("INSERT OR IGNORE INTO chunks (digest, blob, offset, length) VALUES (?, ?, ?, ?)",
                           [(c, f.sha256, i * CHUNK_SIZE, min(CHUNK_SIZE, f.size - i * CHUNK_SIZE))
                            for f in manifest.files for i, c in enumerate(f.chunks)])
            self._record_sources(tx, name, manifest.version, refs, resources)
        log.info("built module %s:%d bundle %s", name, manifest.version, manifest.digest()[:12])
        return self.get(name, manifest.version)

    @staticmethod
    def _record_sources(tx: Any, name: str, version: int, refs: list[tuple[str, int]],
                        resources: dict[str, Any] | None) -> None:
        """Which model versions a module version was built from: deleting those is refused while it is deployed."""
        tx.conn.executemany("INSERT OR IGNORE INTO module_sources (module_name, module_version, model_name, model_version)"
                            " VALUES (?, ?, ?, ?)", [(name, version, m, v) for m, v in refs])
        if resources is not None:
            tx.execute("INSERT OR REPLACE INTO module_meta (module_name, module_version, resources) VALUES (?, ?, ?)",
                       (name, version, dumps(resources)))

    def resign(self, before: float | None = None) -> int:
        """Re-sign release envelopes with the current release key (after a rotation), or only those expiring
        before ``before`` (renewal). The manifest, hence the bundle digest, is unchanged."""
        expires = int(time.time()) + self.release_ttl_s
        count = 0
        with self.db.transaction() as tx:
            for row in self.db.query("SELECT name, version, envelope FROM modules"):
                envelope = loads(row["envelope"])
                if before is not None and envelope["signed"]["expires"] >= before:
                    continue
                # the stored document with a new expiry: its manifest bytes, hence the digest, stay identical
                fresh = sign({**envelope["signed"], "expires": expires}, [self.keys.release_key])
                tx.execute("UPDATE modules SET envelope = ? WHERE name = ? AND version = ?",
                           (dumps(fresh), row["name"], row["version"]))
                count += 1
        return count

    def resources(self, name: str, version: int) -> dict[str, Any]:
        row = self.db.one("SELECT resources FROM module_meta WHERE module_name = ? AND module_version = ?", (name, version))
        return loads(row["resources"]) if row else {}

    def sources(self, name: str, version: int) -> list[str]:
        rows = self.db.query("SELECT model_name, model_version FROM module_sources WHERE module_name = ?"
                             " AND module_version = ? ORDER BY model_name, model_version", (name, version))
        return [f"{r['model_name']}:{r['model_version']}" for r in rows]

    def get(self, name: str, version: int, with_envelope: bool = True) -> dict[str, Any]:
        row = self.db.one("SELECT * FROM modules WHERE name = ? AND version = ?", (name, version))
        if row is None:
            raise NotFound(f"module {name}:{version} does not exist")
        return module_row(row, with_envelope)

    def list(self, name: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM modules" + (" WHERE name = ?" if name else "") + " ORDER BY created_at DESC, version DESC"
        return [module_row(r) for r in self.db.query(sql, (name,) if name else ())]

    def release(self, digest: str) -> dict[str, Any]:
        """The release envelope of a bundle."""
        return release_envelope(self.db, digest)

    def file_path(self, digest: str, path: str) -> Path:
        manifest = validate(Manifest, self.release(digest)["signed"]["manifest"])
        for f in manifest.files:
            if f.path == path:
                return self.store.path(f.sha256)
        raise NotFound(f"bundle {digest[:12]}… has no file {path!r}")


def check_entry(runtime: str, model: dict[str, Any], entry: str | None, entry_name: str) -> None:
    """A python module needs a script with init()/run() (the entry, else the model's own .py); parsed, never run."""
    try:
        if entry is not None:
            check_entry_source(entry, entry_name, runtime)
        elif runtime == "python" and not model["files"][0]["path"].endswith(".py"):
            raise ModelError(f"model {model['name']}:{model['version']} ({model['files'][0]['path']}) needs an entry "
                             "script to run in the python runtime: give --entry SCRIPT with init() and run(inputs)")
    except ModelError as exc:
        raise Invalid(str(exc)) from None


def release_envelope(db: Database, digest: str) -> dict[str, Any]:
    row = db.one("SELECT envelope FROM modules WHERE digest = ?", (digest,))
    if row is None:
        raise NotFound(f"no bundle {digest}")
    return loads(row["envelope"])


@lru_cache(maxsize=256)
def _chunk_set(envelope_json: str) -> frozenset[str]:
    return frozenset(validate(Manifest, loads(envelope_json)["signed"]["manifest"]).chunk_digests())


def bundle_chunks(db: Database, digest: str) -> frozenset[str]:
    """The chunk digests a bundle is made of (cached: bundles are immutable)."""
    row = db.one("SELECT envelope FROM modules WHERE digest = ?", (digest,))
    if row is None:
        raise NotFound(f"no bundle {digest}")
    return _chunk_set(row["envelope"])
