"""What the two stores share: the SQL helpers built on ``execute``, the reads and the migration loop.

:class:`SqlConnection` and :class:`SqlDatabase` are the bases of SQLite's (``db.py``) and PostgreSQL's
(``pg.py``) classes; each file keeps only its dialect's differences (how a statement runs, a transaction,
a bulk insert, the catalogue, a migration step).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

from hub.store import schema

log = logging.getLogger("edgefleet.hub.store")


class SqlConnection:
    """The SQL surface the hub's code may use; a subclass runs statements (``execute``) in its dialect."""

    kind = ""

    def execute(self, sql: str, params: Any = ()) -> Any:
        raise NotImplementedError

    def insert_many(self, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]], *,
                    ignore: bool = False) -> int:
        raise NotImplementedError

    def tables(self) -> set[str]:
        raise NotImplementedError

    def query(self, sql: str, params: Any = ()) -> list[dict[str, Any]]:
        rows = self.execute(sql, params)
        if rows.description is None:
            return []
        keys = [d[0] for d in rows.description]  # a DB-API description: the name first, in both drivers
        return [dict(zip(keys, r)) for r in rows.fetchall()]

    def one(self, sql: str, params: Any = ()) -> dict[str, Any] | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    def scalar(self, sql: str, params: Any = ()) -> Any:
        rows = self.execute(sql, params).fetchall()  # all: an INSERT … RETURNING must run to its end
        return rows[0][0] if rows else None

    def insert(self, table: str, row: Mapping[str, Any], *, ignore: bool = False) -> int:
        """Insert one row; with ``ignore`` a row whose key exists is skipped. Returns the rows inserted."""
        return self.insert_many(table, list(row), [tuple(row.values())], ignore=ignore)

    def upsert(self, table: str, row: Mapping[str, Any], key: Sequence[str]) -> None:
        """Insert ``row``, or overwrite its other columns where a row with the same ``key`` exists."""
        cols = list(row)
        sets = ", ".join(f"{c} = excluded.{c}" for c in cols if c not in key)
        self.execute(f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
                     f" ON CONFLICT ({', '.join(key)}) DO UPDATE SET {sets}", tuple(row.values()))


class SqlDatabase:
    """The reads and the migrations of both stores; a subclass gives ``db()`` and ``_migration()``."""

    kind = ""

    def db(self) -> Any:
        raise NotImplementedError

    def _migration(self) -> AbstractContextManager[Any]:
        """The transaction migrations run in: one process migrates, the others wait and then find nothing to do."""
        raise NotImplementedError

    def query(self, sql: str, params: Any = ()) -> list[dict[str, Any]]:
        return self.db().query(sql, params)

    def one(self, sql: str, params: Any = ()) -> dict[str, Any] | None:
        return self.db().one(sql, params)

    def scalar(self, sql: str, params: Any = ()) -> Any:
        return self.db().scalar(sql, params)

    @property
    def schema_version(self) -> int:
        c = self.db()
        if "schema_version" not in c.tables():
            return 0
        return int(c.scalar("SELECT version FROM schema_version") or 0)

    def migrate(self) -> int:
        """Apply the migrations this database lacks, in one transaction; returns how many were applied."""
        latest = len(schema.MIGRATIONS)
        if self.schema_version >= latest:
            return 0
        with self._migration() as tx:
            tx.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            have = int(tx.scalar("SELECT version FROM schema_version") or 0)
            for step in (s for steps in schema.MIGRATIONS[have:] for s in steps):
                tx.apply(step)
            tx.execute("DELETE FROM schema_version")
            tx.execute("INSERT INTO schema_version (version) VALUES (?)", (latest,))
        if have:
            log.info("%s database migrated from schema version %d to %d", self.kind, have, latest)
        return latest - have
