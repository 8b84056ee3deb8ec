"""Storage: the one package that knows the database drivers and their dialects (tests/test_architecture.py checks it).

Two stores with one API: SQLite (``db.py``, the embedded default: one hub per data directory) and
PostgreSQL (``pg.py``, its connections in ``pg_conn.py``: many hub replicas on one database);
:func:`open_database` picks by the location (a path or a ``postgresql://`` URL). ``dialect.py``
translates the hub's SQL for PostgreSQL; ``lease.py`` elects the one leader among replicas;
``blobs.py`` is the blob store's interface.

Other code reaches the database only through :class:`Database` (per-thread connections, one write
transaction at a time, :meth:`Database.reader` for long reads) and :class:`Connection` (execute, query,
one, scalar, insert, upsert, tables, columns); it writes SQL in a portable subset (``?`` parameters,
``ON CONFLICT``, ``RETURNING``, no PRAGMA or ``sqlite_master``). The schema and its migrations are in
``schema.py``: one ordered list, applied once each, recorded in ``schema_version``.
"""

from hub.store.db import (
    Connection,
    Database,
    StoreError,
    TransientStoreError,
    dumps,
    is_postgres_url,
    loads,
    now,
    open_database,
)

__all__ = ["Connection", "Database", "StoreError", "TransientStoreError", "dumps", "is_postgres_url", "loads", "now",
           "open_database"]
