"""Modules: build a registered model set into a signed bundle, and index its chunks for MQTT transfer."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Any

from msgspec.structs import replace

from hub.errors import Invalid, NotFound
from hub.registry.models import ModelRegistry
from hub.store import Database, dumps, loads, now
from hub.store.blobs import BlobStore
from hub.trust.keys import KeyRing
from modules.bundle import build_manifest, sign_release
from modules.chunking import bundle_spans, cut_files
from modules.errors import ModelError
from modules.pymodel import check_entry_source, declared_signature, defined_functions
from protocol.encoding import ProtocolError, canonical_json
from protocol.manifest import Manifest, Spans, TensorSpec, fixed_chunks, parse_manifest, parse_spans, release_document
from protocol.schema import validate
from protocol.signing import MAX_ENVELOPE_BYTES, sign
from protocol.trust import signed_by
from protocol.verify import accept_manifest

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
           "size": row["size"], "created_at": row["created_at"], "signed": bool(envelope["signatures"]),
           "collect_rate_ppm": envelope["signed"]["manifest"].get("collect_rate_ppm", 0)}
    if with_envelope:
        out["envelope"] = envelope
    return out


class ModuleBuilder:
    def __init__(self, db: Database, store: BlobStore, registry: ModelRegistry, keys: KeyRing,
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
        inputs, outputs = entry_signature(runtime or first["framework"], first, entry, entry_name)
        kwargs: dict[str, Any] = {
            "runtime": runtime or first["framework"], "files": files, "model": first["files"][0]["path"],
            "entry": entry_name if entry is not None else "",
            "sample": SAMPLE_PATH if sample is not None else "", "collect_rate_ppm": collect_rate_ppm,
            "inputs": inputs, "outputs": outputs,
        }
        # Hash and cut the files once, outside the write lock (only the version differs below); the cut runs
        # beside the hashing (both release the GIL): a build costs ~1.3 sha256 passes of wall time, not 2.
        with ThreadPoolExecutor(1, thread_name_prefix="cdc") as pool:
            cutting = pool.submit(cut_files, files)
            try:
                draft = build_manifest(name, 1, **kwargs)
                parse_manifest(draft.to_dict())  # the checks a device will make
            except (ValueError, ProtocolError) as exc:  # parse_manifest refuses a bad runtime, rate or name
                raise Invalid(f"cannot build module {name!r}: {exc}") from None
            spans = bundle_spans(draft, cutting.result())
        with self.db.transaction() as tx:
            latest = tx.execute("SELECT version, digest FROM modules WHERE name = ? ORDER BY version DESC LIMIT 1",
                                (name,)).fetchone()
            if latest is not None and replace(draft, version=latest[0]).digest() == latest[1]:
                self._record_sources(tx, name, latest[0], refs, resources)
                return self.get(name, latest[0])
            manifest = replace(draft, version=(latest[0] if latest else 0) + 1)
            envelope = self._sign(manifest, spans)
            tx.execute("INSERT INTO modules (name, version, digest, runtime, envelope, size, created_at)"
                       " VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (name, manifest.version, manifest.digest(), manifest.runtime, dumps(envelope), manifest.size,
                        now()))
            tx.insert_many("chunks", ("digest", "blob", "offset", "length"), chunk_rows(manifest, envelope["signed"]),
                           ignore=True)
            self._record_sources(tx, name, manifest.version, refs, resources)
        log.info("built module %s:%d bundle %s", name, manifest.version, manifest.digest()[:12])
        return self.get(name, manifest.version)

    def _sign(self, manifest: Manifest, spans: Spans | None) -> dict[str, Any]:
        """The release envelope, with the files' spans unless they would make it larger than a device accepts
        (bundles of more than ~600 MB): then devices fetch fixed chunks, as before spans existed."""
        expires = int(time.time()) + self.release_ttl_s
        if not self.keys.holds("release"):  # held elsewhere (CI): stored unsigned until a signed release is attached
            return {"signed": release_document(manifest, expires, spans), "signatures": []}
        envelope = sign_release(manifest, [self.keys.release_key], expires, spans)
        if spans is not None and len(canonical_json(envelope)) > MAX_ENVELOPE_BYTES:
            log.warning("module %s:%d: release with spans exceeds %d bytes; fixed-size chunks only",
                        manifest.name, manifest.version, MAX_ENVELOPE_BYTES)
            envelope = sign_release(manifest, [self.keys.release_key], expires)
        return envelope

    @staticmethod
    def _record_sources(tx: Any, name: str, version: int, refs: list[tuple[str, int]],
                        resources: dict[str, Any] | None) -> None:
        """Which model versions a module version was built from: deleting those is refused while it is deployed."""
        tx.insert_many("module_sources", ("module_name", "module_version", "model_name", "model_version"),
                       [(name, version, m, v) for m, v in refs], ignore=True)
        if resources is not None:
            tx.upsert("module_meta", {"module_name": name, "module_version": version, "resources": dumps(resources)},
                      key=["module_name", "module_version"])

    def resign(self, before: float | None = None) -> int:
        """Re-sign, with the current release key, the releases the current root no longer accepts (after a
        rotation) and, with ``before``, those expiring before it (renewal). Unsigned ones (awaiting an external
        signature) are left alone. The manifest, hence the bundle digest, is unchanged."""
        if not self.keys.holds("release"):
            stale = [f"{r['name']}:{r['version']}" for r in self.db.query("SELECT name, version, envelope FROM modules")
                     if self._needs_signing(loads(r["envelope"]), before)]
            if stale:
                log.warning("%d release(s) need signing (%s) but the release key is held elsewhere: sign them there "
                            "(edgefleet module sign)", len(stale), ", ".join(stale[:5]))
            return 0
        expires = int(time.time()) + self.release_ttl_s
        count = 0
        with self.db.transaction() as tx:
            for row in self.db.query("SELECT name, version, envelope FROM modules"):
                envelope = loads(row["envelope"])
                if not self._needs_signing(envelope, before):
                    continue
                # the stored document with a new expiry: its manifest bytes, hence the digest, stay identical
                fresh = sign({**envelope["signed"], "expires": expires}, [self.keys.key("release")])
                tx.execute("UPDATE modules SET envelope = ? WHERE name = ? AND version = ?",
                           (dumps(fresh), row["name"], row["version"]))
                count += 1
        return count

    def _needs_signing(self, envelope: dict[str, Any], before: float | None) -> bool:
        if not envelope["signatures"]:
            return False
        return not signed_by(self.keys.root, envelope, "release") or (
            before is not None and envelope["signed"]["expires"] < before)

    def attach_release(self, name: str, version: int, envelope: Any) -> dict[str, Any]:
        """Store a release signed outside the hub (the Uptane split: CI holds the release key), after the checks a
        device makes: release-role signatures, not expired, the very manifest this module version was built as."""
        row = self.db.one("SELECT digest, envelope FROM modules WHERE name = ? AND version = ?", (name, version))
        if row is None:
            raise NotFound(f"module {name}:{version} does not exist")
        try:
            accept_manifest(envelope, self.keys.root, row["digest"], name)
        except ProtocolError as exc:
            raise Invalid(f"release refused: {exc}") from None
        if envelope["signed"]["manifest"] != loads(row["envelope"])["signed"]["manifest"]:
            raise Invalid("release refused: its manifest differs from the one built for this version")
        with self.db.transaction() as tx:
            tx.execute("UPDATE modules SET envelope = ? WHERE name = ? AND version = ?", (dumps(envelope), name, version))
        log.info("attached an externally signed release to %s:%d", name, version)
        return self.get(name, version, with_envelope=False)

    def envelopes(self) -> list[dict[str, Any]]:
        """Every stored release envelope (signed or awaiting a signature)."""
        return [loads(r["envelope"]) for r in self.db.query("SELECT envelope FROM modules")]

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


def entry_signature(runtime: str, model: dict[str, Any], entry: str | None,
                    entry_name: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """What the module accepts and returns: the model's signature, except where the entry script changes it.

    A ``preprocess`` takes what the script declares as ``INPUTS`` (free, ``[]``, if it declares nothing: the
    model's own inputs are checked after it runs); a ``postprocess`` returns its declared ``OUTPUTS``.
    """
    inputs, outputs = model["inputs"], model["outputs"]
    if entry is not None:
        try:
            hooks, declared = defined_functions(entry, entry_name), declared_signature(entry, entry_name)
        except ModelError as exc:
            raise Invalid(str(exc)) from None
        if "preprocess" in hooks or runtime == "python":
            inputs = declared.get("INPUTS", [] if "preprocess" in hooks else inputs)
        if "postprocess" in hooks or runtime == "python":
            outputs = declared.get("OUTPUTS", [] if "postprocess" in hooks else outputs)
    try:
        return [validate(TensorSpec, s) for s in inputs], [validate(TensorSpec, s) for s in outputs]
    except ValueError as exc:
        raise Invalid(f"entry script {entry_name}: INPUTS/OUTPUTS: {exc}") from None


def release_envelope(db: Database, digest: str) -> dict[str, Any]:
    row = db.one("SELECT envelope FROM modules WHERE digest = ?", (digest,))
    if row is None:
        raise NotFound(f"no bundle {digest}")
    return loads(row["envelope"])


def chunk_rows(manifest: Manifest, release: dict[str, Any]) -> list[tuple[str, str, int, int]]:
    """(digest, blob, offset, length) of every chunk a device may ask for: fixed chunks and spans alike."""
    spans = parse_spans(release, manifest)
    rows = []
    for f in manifest.files:
        for chunks in [fixed_chunks(f), spans.get(f.path, [])]:
            offset = 0
            for digest, size in chunks:
                rows.append((digest, f.sha256, offset, size))
                offset += size
    return rows


@lru_cache(maxsize=256)
def _chunk_set(envelope_json: str) -> frozenset[str]:
    signed = loads(envelope_json)["signed"]
    return frozenset(row[0] for row in chunk_rows(validate(Manifest, signed["manifest"]), signed))


def bundle_chunks(db: Database, digest: str) -> frozenset[str]:
    """The chunk digests a bundle is made of (cached: bundles are immutable)."""
    row = db.one("SELECT envelope FROM modules WHERE digest = ?", (digest,))
    if row is None:
        raise NotFound(f"no bundle {digest}")
    return _chunk_set(row["envelope"])
