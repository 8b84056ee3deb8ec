"""Deployments: a module version aimed at a target; every change re-derives the desired states."""

from __future__ import annotations

import logging
from typing import Any

from hub.bundles import parse_ref
from hub.db import Database, loads, now
from hub.director import Director
from hub.errors import Invalid, NotFound
from hub.fleet import module_views
from hub.targeting import parse_target

log = logging.getLogger("edgefleet.hub.deployments")


def deployment_row(row: dict[str, Any]) -> dict[str, Any]:
    return {"name": row["name"], "module": f"{row['module_name']}:{row['module_version']}",
            "module_name": row["module_name"], "module_version": row["module_version"], "bundle": row["digest"],
            "target": row["target"], "priority": row["priority"], "created_at": row["created_at"],
            "active": bool(row["active"])}


class Deployments:
    def __init__(self, db: Database, director: Director) -> None:
        self.db, self.director = db, director

    def put(self, name: str, module: str, target: str, priority: int = 0) -> dict[str, Any]:
        """Create or replace deployment ``name`` and publish the desired states that change."""
        if not name or len(name) > 64:
            raise Invalid("deployment name must be 1-64 characters")
        parse_target(target)
        module_name, version = parse_ref(module)
        row = self.db.one("SELECT digest FROM modules WHERE name = ? AND version = ?", (module_name, version))
        if row is None:
            raise Invalid(f"module {module} does not exist: build it first (POST /api/v1/modules)")
        with self.db.transaction() as tx:
            tx.execute(
                "INSERT INTO deployments (name, module_name, module_version, digest, target, priority, created_at, active)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, 1) ON CONFLICT (name) DO UPDATE SET module_name = excluded.module_name,"
                " module_version = excluded.module_version, digest = excluded.digest, target = excluded.target,"
                " priority = excluded.priority, created_at = excluded.created_at, active = 1",
                (name, module_name, version, row["digest"], target, priority, now()))
        published = self.director.sync()
        log.info("deployment %s -> %s on %r: %d device(s) updated", name, module, target, published)
        return self.get(name) | {"published": published}

    def delete(self, name: str) -> dict[str, Any]:
        """Deactivate: devices drop the module unless another deployment provides it."""
        with self.db.transaction() as tx:
            if tx.execute("UPDATE deployments SET active = 0 WHERE name = ?", (name,)).rowcount == 0:
                raise NotFound(f"deployment {name!r} does not exist")
        return self.get(name) | {"published": self.director.sync()}

    def list(self) -> list[dict[str, Any]]:
        return [deployment_row(r) for r in self.db.query("SELECT * FROM deployments ORDER BY created_at DESC")]

    def get(self, name: str) -> dict[str, Any]:
        row = self.db.one("SELECT * FROM deployments WHERE name = ?", (name,))
        if row is None:
            raise NotFound(f"deployment {name!r} does not exist")
        out = deployment_row(row)
        counts: dict[str, int] = {}
        devices = []
        for dev in self.db.query("SELECT id, desired, reported FROM devices"):
            for view in module_views(loads(dev["desired"], []), loads(dev["reported"])):
                if view["deployment"] == name:
                    counts[view["state"]] = counts.get(view["state"], 0) + 1
                    devices.append(dev["id"])
        return out | {"devices": len(devices), "counts": counts}
