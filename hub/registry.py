"""The model registry: versioned model files in the content store, checked by loading them in their runtime."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from hub.db import Database, dumps, loads, now
from hub.errors import Invalid, NotFound
from modules.runners import ModelError, detect_runtime, load_model_file
from modules.store import ContentStore
from protocol.encoding import ProtocolError
from protocol.manifest import check_relative_path

log = logging.getLogger("edgefleet.hub.registry")


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


def model_row(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": row["name"], "version": row["version"], "framework": row["framework"],
        "files": loads(row["files"]), "inputs": loads(row["inputs"]), "outputs": loads(row["outputs"]),
        "tags": loads(row["tags"], {}), "description": row["description"],
        "created_at": row["created_at"], "created_by": row["created_by"],
    }


class ModelRegistry:
    def __init__(self, db: Database, store: ContentStore) -> None:
        self.db, self.store = db, store

    def register(self, name: str, uploads: list[Upload], tags: dict[str, str] | None = None,
                 description: str = "", created_by: str = "") -> dict[str, Any]:
        """Store the files, load the main one to check it, then record version max+1."""
        if not name or len(name) > 64 or "/" in name or ":" in name:
            raise Invalid(f"invalid model name {name!r}: 1-64 characters, no '/' or ':'")
        if not uploads:
            raise Invalid("a model needs at least one file")
        paths = []
        for up in uploads:
            try:
                paths.append(check_relative_path(Path(up.filename or "").name))
            except ProtocolError as exc:
                raise Invalid(str(exc)) from None
        if len(set(paths)) != len(paths):
            raise Invalid(f"file names repeat: {paths}")
        main = self._main_index(paths)
        stored: list[dict[str, Any]] = []
        new_blobs: list[str] = []
        try:
            for path, up in zip(paths, uploads):
                digest, size = self.store.put_stream(up.stream)
                if not self._referenced(digest):
                    new_blobs.append(digest)
                stored.append({"path": path, "sha256": digest, "size": size})
            # the main file first: modules take a model's first file as its entry point
            stored.insert(0, stored.pop(main))
            framework = detect_runtime(Path(stored[0]["path"]))
            inputs, outputs = self._describe(stored, framework)
        except ModelError as exc:
            self._discard(new_blobs)
            raise Invalid(str(exc)) from None
        except BaseException:
            self._discard(new_blobs)
            raise
        with self.db.transaction() as tx:
            version = (tx.execute("SELECT max(version) FROM models WHERE name = ?", (name,)).fetchone()[0] or 0) + 1
            tx.execute(
                "INSERT INTO models (name, version, framework, files, inputs, outputs, tags, description, created_at,"
                " created_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (name, version, framework, dumps(stored), dumps(inputs), dumps(outputs), dumps(tags or {}),
                 description, now(), created_by),
            )
        log.info("registered model %s:%d (%s)", name, version, framework)
        return self.get(name, version)

    @staticmethod
    def _main_index(paths: list[str]) -> int:
        for i, path in enumerate(paths):
            try:
                detect_runtime(Path(path))
                return i
            except ModelError:
                continue
        return 0  # detect_runtime on it later gives the precise refusal

    def _referenced(self, digest: str) -> bool:
        """Is this blob already used by a registered model or a bundle (so a failed upload must keep it)?"""
        if self.db.one("SELECT 1 FROM chunks WHERE blob = ? LIMIT 1", (digest,)):
            return True
        return self.db.one("SELECT 1 FROM models WHERE files LIKE ? LIMIT 1", (f"%{digest}%",)) is not None

    def _discard(self, digests: list[str]) -> None:
        for digest in digests:
            self.store.delete(digest)

    def _describe(self, files: list[dict[str, Any]], framework: str) -> tuple[list[Any], list[Any]]:
        """Load the main file under its real name beside its siblings (external weights, imports)."""
        with tempfile.TemporaryDirectory(prefix="edgefleet-model-") as tmp:
            for f in files:
                (Path(tmp) / f["path"]).symlink_to(self.store.path(f["sha256"]))
            runner = load_model_file(Path(tmp) / files[0]["path"], framework)
            return ([s.model_dump(mode="json") for s in runner.inputs],
                    [s.model_dump(mode="json") for s in runner.outputs])

    def get(self, name: str, version: int) -> dict[str, Any]:
        row = self.db.one("SELECT * FROM models WHERE name = ? AND version = ?", (name, version))
        if row is None:
            raise NotFound(f"model {name}:{version} does not exist")
        return model_row(row)

    def list(self, name: str | None = None, tags: dict[str, str] | None = None,
             framework: str | None = None) -> list[dict[str, Any]]:
        sql, params = "SELECT * FROM models WHERE 1=1", []
        if name:
            sql += " AND name = ?"
            params.append(name)
        if framework:
            sql += " AND framework = ?"
            params.append(framework)
        rows = [model_row(r) for r in self.db.query(sql + " ORDER BY created_at DESC, version DESC", params)]
        return [r for r in rows if all(r["tags"].get(k) == v for k, v in (tags or {}).items())]

    def file_path(self, name: str, version: int, path: str) -> Path:
        model = self.get(name, version)
        for f in model["files"]:
            if f["path"] == path:
                return self.store.path(f["sha256"])
        raise NotFound(f"model {name}:{version} has no file {path!r}")
