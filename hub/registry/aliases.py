"""Registry aliases (MLflow style): ``champion`` names one version of a model, and moves only when told to.

References a deployment, an endpoint or a module build may use:

* ``MODEL@ALIAS``: the version the alias names (``@latest``: the newest version, built in);
* ``MODULE@ALIAS`` (deploying): the newest version of MODULE built from the model version that the
  alias names on the model MODULE is built from. The deployment records the version it resolved to.

A version an alias names cannot be deleted; ``expect`` makes a move conditional (two pipelines
racing to promote: the one whose champion changed under it gets 409, not a silent overwrite).
"""

from __future__ import annotations

import re
from typing import Any

from hub.audit import record
from hub.errors import Conflict, Invalid, NotFound
from hub.registry.bundles import parse_ref
from hub.registry.models import ModelRegistry
from hub.store import Database, now

LATEST = "latest"
ALIAS_RE = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
VERSION_LIKE = re.compile(r"^v\d+$")


def check_alias(alias: str) -> str:
    if not ALIAS_RE.match(alias) or VERSION_LIKE.match(alias) or alias == LATEST:
        raise Invalid(f"alias {alias!r}: 1-64 lower-case letters, digits, '-' or '_', starting with a letter; "
                      f"not {LATEST!r} (built in) nor v<digits> (reads like a version)")
    return alias


class ModelAliases:
    def __init__(self, db: Database, registry: ModelRegistry) -> None:
        self.db, self.registry = db, registry
        registry.usage_checks.append(self._naming)  # a version an alias names is not deleted under it

    def _naming(self, name: str, version: int) -> list[str]:
        return [f"alias {name}@{a}" for a in self.of_version(name, version)]

    # --- read ------------------------------------------------------------------------------------

    def list(self, name: str) -> list[dict[str, Any]]:
        return self.db.query("SELECT alias, version, updated_at, updated_by FROM model_aliases WHERE name = ? "
                             "ORDER BY alias", (name,))

    def current(self, name: str, alias: str) -> int | None:
        return self.db.scalar("SELECT version FROM model_aliases WHERE name = ? AND alias = ?", (name, alias))

    def get(self, name: str, alias: str) -> int:
        if alias == LATEST:
            version = self.db.scalar("SELECT max(version) FROM models WHERE name = ?", (name,))
        else:
            version = self.current(name, alias)
        if version is None:
            raise NotFound(f"model {name!r} has no alias {alias!r}" if alias != LATEST else f"no model {name!r}")
        return int(version)

    def of_version(self, name: str, version: int) -> list[str]:
        return [r["alias"] for r in self.db.query("SELECT alias FROM model_aliases WHERE name = ? AND version = ? "
                                                  "ORDER BY alias", (name, version))]

    # --- move ------------------------------------------------------------------------------------

    def set(self, name: str, alias: str, version: int, actor: str = "", expect: int | None = None) -> dict[str, Any]:
        """Point ``name@alias`` at ``version``. ``expect``: only if it now names that version (0: only if unset)."""
        check_alias(alias)
        self.registry.get(name, version)  # 404 for a version that does not exist
        with self.db.transaction() as tx:
            previous = self.current(name, alias)
            self._check_expect(name, alias, previous, expect)
            if previous != version:
                tx.upsert("model_aliases", {"name": name, "alias": alias, "version": version, "updated_at": now(),
                                            "updated_by": actor}, key=["name", "alias"])
                record(self.db, actor, "alias.moved", f"{name}@{alias}", model=name, alias=alias, version=version,
                       previous=previous)
        return {"name": name, "alias": alias, "version": version, "previous": previous, "moved": previous != version}

    def delete(self, name: str, alias: str, actor: str = "", expect: int | None = None) -> dict[str, Any]:
        with self.db.transaction() as tx:
            previous = self.current(name, alias)
            if previous is None:
                raise NotFound(f"model {name!r} has no alias {alias!r}")
            self._check_expect(name, alias, previous, expect)
            tx.execute("DELETE FROM model_aliases WHERE name = ? AND alias = ?", (name, alias))
            record(self.db, actor, "alias.deleted", f"{name}@{alias}", model=name, alias=alias, previous=previous)
        return {"name": name, "alias": alias, "deleted": True, "previous": previous}

    @staticmethod
    def _check_expect(name: str, alias: str, previous: int | None, expect: int | None) -> None:
        if expect is None or (previous or 0) == expect:
            return
        now_names = f"names version {previous}" if previous else "is not set"
        raise Conflict(f"{name}@{alias} {now_names}, not {'unset' if expect == 0 else f'version {expect}'} as "
                       "expected: it moved since you looked (evaluate against the new one)")

    # --- resolve references ----------------------------------------------------------------------

    def model_ref(self, ref: str) -> tuple[str, int]:
        """``NAME:VERSION`` or ``NAME@ALIAS`` -> (name, version)."""
        if "@" not in ref:
            return parse_ref(ref)
        name, _, alias = ref.rpartition("@")
        if not name or not alias:
            raise Invalid(f"{ref!r} is not NAME@ALIAS")
        return name, self.get(name, alias)

    def model_refs(self, refs: list[str]) -> list[str]:
        return [":".join(map(str, self.model_ref(r))) for r in refs]

    def module_ref(self, ref: str) -> tuple[str, str | None]:
        """``MODULE:VERSION`` as is, or ``MODULE@ALIAS`` resolved: ("module:version", a note saying how)."""
        if "@" not in ref:
            return ref, None
        module, _, alias = ref.rpartition("@")
        if not module or not alias:
            raise Invalid(f"{ref!r} is not MODULE@ALIAS")
        if alias == LATEST:
            version = self.db.scalar("SELECT max(version) FROM modules WHERE name = ?", (module,))
            if version is None:
                raise NotFound(f"module {module!r} does not exist")
            return f"{module}:{version}", f"{ref} resolved to {module}:{version}"
        models = [r["model_name"] for r in self.db.query(
            "SELECT DISTINCT model_name FROM module_sources WHERE module_name = ? ORDER BY model_name", (module,))]
        if not models:
            raise NotFound(f"module {module!r} does not exist (or was built from no registered model)")
        named = [(m, v) for m in models if (v := self.current(m, alias)) is not None]
        if len(named) > 1:  # several source models carry the alias: the one named like the module decides
            named = [(m, v) for m, v in named if m == module] or named
        if not named:
            raise NotFound(f"no model module {module!r} is built from ({', '.join(models)}) has an alias {alias!r}")
        if len(named) > 1:
            raise Conflict(f"{ref} is ambiguous: {', '.join(f'{m}@{alias}' for m, _ in named)}; deploy MODULE:VERSION")
        model, version = named[0]
        built = self.db.scalar("SELECT max(module_version) FROM module_sources WHERE module_name = ? AND model_name = ?"
                               " AND model_version = ?", (module, model, version))
        if built is None:
            raise NotFound(f"{model}@{alias} is {model}:{version}, but no version of module {module!r} is built from "
                           f"it: build one first (edgefleet module build {module} --model {model}@{alias})")
        return f"{module}:{built}", f"{ref} resolved to {module}:{built} (built from {model}:{version})"
