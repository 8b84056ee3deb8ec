"""The model registry: versioned model files in the content store, checked by loading them in their runtime.

Uploads stream into the content store (hashed as they pass); the main file is
then loaded in a short-lived child process (modules.loadcheck), so a huge or
hostile model can neither bloat nor crash the hub.
A Python model (pickle, joblib, a model directory, an entry script) is never
loaded here: its entry script is parsed, not run (modules.pymodel).
"""

from __future__ import annotations

import logging
import tempfile
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from hub.audit import record
from hub.bounds import check_api_name, check_labels
from hub.errors import Conflict, Invalid, NotFound
from hub.store import Database, dumps, loads, now
from hub.store.blobs import BlobStore
from modules.loadcheck import inspect_model
from modules.pymodel import check_entry_source, main_file
from modules.runners import ModelError
from modules.sandbox import Sandbox
from protocol.encoding import ProtocolError
from protocol.manifest import MAX_BUNDLE_FILES, check_relative_path

log = logging.getLogger("edgefleet.hub.registry")

LINEAGE_KEYS = ("parent", "dataset", "training_run")
MAX_LIMIT = 1000

UsageCheck = Callable[[str, int], list[str]]  # (model name, version) -> what still uses it, human-readable


@dataclass
class Upload:
    filename: str
    stream: BinaryIO


def parse_tags(pairs: list[str]) -> dict[str, str]:
    tags: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise Invalid(f"tag {pair!r} is not key=value")
        tags[key] = value
    return tags


ALL_ROWS = 2**62  # "no limit" as a number both SQLite and PostgreSQL take (PostgreSQL refuses LIMIT -1)


def model_row(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": row["name"], "version": row["version"], "framework": row["framework"],
        "files": loads(row["files"]), "inputs": loads(row["inputs"]), "outputs": loads(row["outputs"]),
        "tags": loads(row["tags"], {}), "description": row["description"],
        "properties": loads(row.get("properties"), {}), "lineage": loads(row.get("lineage"), {}),
        "baseline": loads(row.get("baseline")),
        "created_at": row["created_at"], "created_by": row["created_by"],
    }


def deployments_using(db: Database, name: str, version: int) -> list[str]:
    """Active edge deployments whose module was built from model ``name:version``."""
    rows = db.query(
        "SELECT d.name, d.module_name, d.module_version FROM deployments d JOIN module_sources s"
        " ON s.module_name = d.module_name AND s.module_version = d.module_version"
        " WHERE d.active = 1 AND s.model_name = ? AND s.model_version = ? ORDER BY d.name", (name, version))
    return [f"edge deployment {r['name']!r} (module {r['module_name']}:{r['module_version']})" for r in rows]


class ModelRegistry:
    """Register, describe, search, edit and delete model versions.

    ``usage_checks`` decide whether a version may be deleted; the hub adds one
    per kind of consumer (edge deployments now; web endpoints can add theirs).
    """

    def __init__(self, db: Database, store: BlobStore, load_timeout_s: float = 120.0,
                 load_memory_mb: int = 0, sandbox: Sandbox | None = None) -> None:
        self.db, self.store = db, store
        self.load_timeout_s, self.load_memory_mb = load_timeout_s, load_memory_mb
        self.sandbox = sandbox  # where load checks run: never in the hub's trust domain (modules/sandbox.py)
        self.usage_checks: list[UsageCheck] = [lambda n, v: deployments_using(self.db, n, v)]
        # blobs stored by uploads still in flight: garbage collection must not take them
        self._pending: Counter[str] = Counter()
        self._pending_lock = threading.Lock()

    # --- register ------------------------------------------------------------------------------

    def register(self, name: str, uploads: list[Upload], tags: dict[str, str] | None = None,
                 description: str = "", created_by: str = "", *, properties: dict[str, Any] | None = None,
                 lineage: dict[str, Any] | None = None, baseline: BinaryIO | None = None) -> dict[str, Any]:
        """Store the files, load the main one to check it, then record version max+1."""
        check_api_name(name, "model name")
        check_labels(tags or {}, "tags")
        if not 1 <= len(uploads) <= MAX_BUNDLE_FILES:
            raise Invalid(f"a model needs 1..{MAX_BUNDLE_FILES} files, not {len(uploads)}")
        lineage = self._check_lineage(name, lineage or {})
        paths = []
        for up in uploads:
            try:  # a relative path keeps its folders (a model directory); an absolute one keeps only its name
                name_ = up.filename or ""
                paths.append(check_relative_path(Path(name_).name if name_.startswith("/") else name_))
            except ProtocolError as exc:
                raise Invalid(str(exc)) from None
        if len(set(paths)) != len(paths):
            raise Invalid(f"file names repeat: {paths}")
        main, framework = main_file(paths)
        stored: list[dict[str, Any]] = []
        held: list[str] = []  # every blob this upload put, protected from GC until the row exists
        baseline_ref: dict[str, Any] | None = None
        try:
            for path, up in zip(paths, uploads):
                digest, size = self.store.put_stream(up.stream)
                self._hold(held, digest)
                stored.append({"path": path, "sha256": digest, "size": size})
            if baseline is not None:
                digest, size = self.store.put_stream(baseline)
                self._hold(held, digest)
                baseline_ref = {"sha256": digest, "size": size}
            # the main file first: modules take a model's first file as its entry point
            stored.insert(0, stored.pop(main))
            inputs, outputs = self._check_python(stored) if framework == "python" else self._describe(stored, framework)
            with self.db.transaction() as tx:
                missing = [d for d in held if not self.store.has(d)]
                if missing:  # a delete's GC ran between our put and this insert
                    raise Conflict(f"a concurrent delete removed blob {missing[0][:12]}… of this upload: retry")
                version = 1 + max(
                    tx.execute("SELECT max(version) FROM models WHERE name = ?", (name,)).fetchone()[0] or 0,
                    tx.execute("SELECT max(version) FROM model_deletions WHERE name = ?", (name,)).fetchone()[0] or 0)
                tx.execute(
                    "INSERT INTO models (name, version, framework, files, inputs, outputs, tags, description,"
                    " created_at, created_by, properties, lineage, baseline) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (name, version, framework, dumps(stored), dumps(inputs), dumps(outputs), dumps(tags or {}),
                     description, now(), created_by, dumps(properties or {}), dumps(lineage),
                     dumps(baseline_ref) if baseline_ref else None),
                )
                record(self.db, created_by, "model.registered", f"{name}:{version}", model=name, version=version,
                       framework=framework, files=[f["path"] for f in stored], tags=tags or {})
        except BaseException as exc:
            self._release(held, discard=True)
            if isinstance(exc, ModelError):
                raise Invalid(str(exc)) from None
            raise
        self._release(held, discard=False)
        log.info("registered model %s:%d (%s)", name, version, framework)
        return self.get(name, version)

    def _check_lineage(self, name: str, lineage: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(lineage) - set(LINEAGE_KEYS))
        if unknown:
            raise Invalid(f"unknown lineage field(s) {unknown}: allowed {list(LINEAGE_KEYS)}")
        out = {k: str(v) for k, v in lineage.items() if v not in (None, "")}
        parent = out.get("parent")
        if parent:  # "name:version", or a bare version of this model
            pname, _, pversion = parent.rpartition(":") if ":" in parent else (name, ":", parent)
            if not pversion.isdigit():
                raise Invalid(f"lineage parent {parent!r} is not NAME:VERSION or VERSION")
            self.get(pname, int(pversion))  # 404 if the parent does not exist
            out["parent"] = f"{pname}:{int(pversion)}"
        return out

    def _hold(self, held: list[str], digest: str) -> None:
        with self._pending_lock:
            self._pending[digest] += 1
        held.append(digest)

    def _release(self, held: list[str], discard: bool) -> None:
        with self._pending_lock:
            for digest in held:
                self._pending[digest] -= 1
                if self._pending[digest] <= 0:
                    del self._pending[digest]
        if discard:
            self.collect_garbage(held)

    def _check_python(self, files: list[dict[str, Any]]) -> tuple[list[Any], list[Any]]:
        """A Python model is never loaded by the hub: its entry script, if it has one, is parsed, not run.

        Pickles, joblib files and model directories are recorded as they are; only a device,
        an endpoint worker or a batch worker loads them (modules.pymodel).
        """
        main = files[0]["path"]
        if main.endswith(".py"):
            if files[0]["size"] > 1024 * 1024:
                raise ModelError(f"entry script {main} is larger than 1 MiB")
            source = self.store.get(files[0]["sha256"]).decode("utf-8", errors="replace")
            check_entry_source(source, main, "python")
        return [], []

    def _describe(self, files: list[dict[str, Any]], framework: str) -> tuple[list[Any], list[Any]]:
        """Load the main file under its real name beside its siblings (external weights, imports), in a child."""
        with tempfile.TemporaryDirectory(prefix="edgefleet-model-") as tmp:
            for f in files:
                (Path(tmp) / f["path"]).parent.mkdir(parents=True, exist_ok=True)
                (Path(tmp) / f["path"]).symlink_to(self.store.path(f["sha256"]))
            described = inspect_model(Path(tmp) / files[0]["path"], framework, self.load_timeout_s,
                                      self.load_memory_mb, self.sandbox)
            return described["inputs"], described["outputs"]

    # --- read ----------------------------------------------------------------------------------

    def get(self, name: str, version: int) -> dict[str, Any]:
        """One version, with the aliases naming it and its latest recorded metrics (newest value of each)."""
        row = self.db.one("SELECT * FROM models WHERE name = ? AND version = ?", (name, version))
        if row is None:
            raise NotFound(f"model {name}:{version} does not exist")
        metrics: dict[str, float] = {}
        for e in self.db.query("SELECT metrics FROM model_evaluations WHERE name = ? AND version = ? ORDER BY id",
                               (name, version)):
            metrics |= loads(e["metrics"], {})
        return model_row(row) | {"aliases": self._aliases([row])[(name, version)], "metrics": metrics}

    def _aliases(self, rows: list[dict[str, Any]]) -> dict[tuple[str, int], list[str]]:
        out: dict[tuple[str, int], list[str]] = {(r["name"], r["version"]): [] for r in rows}
        names = sorted({r["name"] for r in rows})
        if names:
            for a in self.db.query(f"SELECT name, alias, version FROM model_aliases WHERE name IN "
                                   f"({','.join('?' * len(names))}) ORDER BY alias", names):
                out.get((a["name"], a["version"]), []).append(a["alias"])
        return out

    def search(self, name: str | None = None, tags: dict[str, str] | None = None, framework: str | None = None,
               limit: int | None = None, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
        """Newest first; every tag must match (AND). Returns (page, total matching)."""
        where, params = ["1=1"], []
        if name:
            where.append("name = ?")
            params.append(name)
        if framework:
            where.append("framework = ?")
            params.append(framework)
        for key, value in (tags or {}).items():
            where.append("EXISTS (SELECT 1 FROM json_each(models.tags) t WHERE t.key = ? AND t.value = ?)")
            params += [key, value]
        clause = " WHERE " + " AND ".join(where)
        total = self.db.scalar("SELECT count(*) FROM models" + clause, params) or 0
        sql = "SELECT * FROM models" + clause + " ORDER BY created_at DESC, version DESC LIMIT ? OFFSET ?"
        rows = self.db.query(sql, [*params, ALL_ROWS if limit is None else limit, offset])
        aliases = self._aliases(rows)
        return [model_row(r) | {"aliases": aliases[(r["name"], r["version"])]} for r in rows], total

    def list(self, name: str | None = None, tags: dict[str, str] | None = None,
             framework: str | None = None) -> list[dict[str, Any]]:
        return self.search(name, tags, framework)[0]

    def file_path(self, name: str, version: int, path: str) -> Path:
        model = self.get(name, version)
        for f in model["files"]:
            if f["path"] == path:
                return self.store.path(f["sha256"])
        raise NotFound(f"model {name}:{version} has no file {path!r}")

    def baseline_path(self, name: str, version: int) -> Path:
        baseline = self.get(name, version)["baseline"]
        if not baseline:
            raise NotFound(f"model {name}:{version} has no baseline")
        return self.store.path(baseline["sha256"])

    # --- edit and delete -----------------------------------------------------------------------

    def update(self, name: str, version: int, set_tags: dict[str, str] | None = None,
               remove_tags: list[str] | None = None, description: str | None = None,
               properties: dict[str, Any] | None = None) -> dict[str, Any]:
        """Edit metadata; the files, signature and lineage of a version never change.

        ``properties`` merges into the stored ones; a key set to None is removed.
        """
        with self.db.transaction():
            model = self.get(name, version)
            tags = {k: v for k, v in model["tags"].items() if k not in set(remove_tags or [])}
            tags.update(set_tags or {})
            check_labels(tags, "tags")
            props = dict(model["properties"])
            for key, value in (properties or {}).items():
                if value is None:
                    props.pop(key, None)
                else:
                    props[key] = value
            self.db.db().execute(
                "UPDATE models SET tags = ?, properties = ?, description = ? WHERE name = ? AND version = ?",
                (dumps(tags), dumps(props), model["description"] if description is None else description, name, version))
        return self.get(name, version)

    def users(self, name: str, version: int) -> list[str]:
        return [u for check in self.usage_checks for u in check(name, version)]

    def delete(self, name: str, version: int, deleted_by: str = "") -> dict[str, Any]:
        """Delete a version no active deployment uses; then drop the blobs nothing references any more."""
        model = self.get(name, version)
        users = self.users(name, version)
        if users:
            raise Conflict(f"model {name}:{version} is in use by {'; '.join(users)}: remove or change those first")
        digests = [f["sha256"] for f in model["files"]] + ([model["baseline"]["sha256"]] if model["baseline"] else [])
        with self.db.transaction() as tx:
            tx.execute("DELETE FROM models WHERE name = ? AND version = ?", (name, version))
            tx.upsert("model_deletions", {"name": name, "version": version, "deleted_at": now(),
                                          "deleted_by": deleted_by}, key=["name", "version"])
            removed = self.collect_garbage(digests)
        log.info("deleted model %s:%d; %d blob(s) collected", name, version, len(removed))
        return {"name": name, "version": version, "deleted": True, "blobs_removed": removed}

    def _referenced(self, digest: str) -> bool:
        """Is this blob used by a model version (file or baseline) or a module bundle?"""
        pattern = f"%{digest}%"
        return (self.db.one("SELECT 1 FROM models WHERE files LIKE ? OR baseline LIKE ? LIMIT 1", (pattern, pattern))
                is not None or self.db.one("SELECT 1 FROM modules WHERE envelope LIKE ? LIMIT 1", (pattern,)) is not None)

    def collect_garbage(self, candidates: list[str]) -> list[str]:
        """Delete those of ``candidates`` that nothing references and no upload in flight holds."""
        removed = []
        with self.db.transaction():  # the write lock: no row can start referencing a blob while we decide
            for digest in dict.fromkeys(candidates):
                with self._pending_lock:
                    if self._pending.get(digest):
                        continue
                if not self._referenced(digest) and self.store.has(digest):
                    self.store.delete(digest)
                    removed.append(digest)
        return removed
