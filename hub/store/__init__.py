"""Storage: the one package that knows the database driver and its dialect (tests/test_architecture.py checks it).

Other code reaches the database only through :class:`Database` (per-thread connections, one write
transaction at a time, :meth:`Database.reader` for long reads) and :class:`Connection` (execute, query,
one, scalar, insert, upsert, tables, columns); it writes SQL in a portable subset (``?`` parameters,
``ON CONFLICT``, ``RETURNING``, no PRAGMA or ``sqlite_master``). The schema and its migrations are in
``schema.py``: one ordered list, applied once each, recorded in ``schema_version``.
"""

from hub.store.db import Connection, Database, StoreError, dumps, loads, now

__all__ = ["Connection", "Database", "StoreError", "dumps", "loads", "now"]
