"""The hub's SQLite database (WAL): per-thread connections, serialised write transactions, migrations.

The FastAPI thread pool, the MQTT thread and the ingest writer all touch the
database. Each thread gets its own connection (WAL lets readers run beside a
writer); writers take one process-wide lock and ``BEGIN IMMEDIATE`` so a
read-modify-write (e.g. "next version = max + 1") is atomic.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, cast

from hub.store.base import SqlConnection, SqlDatabase
from hub.store.schema import PARTITIONED, AddColumn, Step

log = logging.getLogger("edgefleet.hub.store")

try:  # what a failed statement raises, for callers that survive a lost write
    import psycopg

    StoreError: tuple[type[Exception], ...] = (sqlite3.Error, psycopg.Error)
    # worth trying again: a lock or deadlock, a lost connection (not a record the database refuses)
    TransientStoreError: tuple[type[Exception], ...] = (sqlite3.OperationalError, psycopg.OperationalError)
except ImportError:  # the PostgreSQL store is an extra (edgefleet[postgres])
    StoreError = (sqlite3.Error,)
    TransientStoreError = (sqlite3.OperationalError,)


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True)


def loads(text: str | None, default: Any = None) -> Any:
    return default if text is None else json.loads(text)


def now() -> float:
    return time.time()


class Connection(SqlConnection):
    """One SQLite connection and the SQL the hub's code may use on it (:class:`~hub.store.base.SqlConnection`).

    ``conn`` is the driver's own connection: for this package (and tests that build old schemas).
    """

    kind = "sqlite"

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def execute(self, sql: str, params: Any = ()) -> sqlite3.Cursor:
        return self.conn.execute(sql, params)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> sqlite3.Cursor:
        return self.conn.executemany(sql, rows)

    def insert_many(self, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]], *,
                    ignore: bool = False) -> int:
        sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
        return self.conn.executemany(sql + (" ON CONFLICT DO NOTHING" if ignore else ""), rows).rowcount

    def insert_new(self, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]],
                   key: Sequence[str]) -> set[tuple[Any, ...]]:
        """Insert the rows whose key is not stored yet; returns the keys of those inserted."""
        sql = (f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
               " ON CONFLICT DO NOTHING")
        at = [list(columns).index(k) for k in key]
        return {tuple(r[i] for i in at) for r in rows if self.conn.execute(sql, r).rowcount == 1}

    def delete_before(self, table: str, cutoff: float) -> int:
        """Delete the rows of a time-partitioned table (schema.PARTITIONED) older than ``cutoff``."""
        return self.conn.execute(f"DELETE FROM {table} WHERE {PARTITIONED[table].column} < ?", (cutoff,)).rowcount

    def clock(self) -> float:
        return time.time()  # one hub per SQLite file: its own clock is the only one

    def tables(self) -> set[str]:
        return {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}

    def columns(self, table: str) -> set[str]:
        return {r[1] for r in self.conn.execute(f"PRAGMA table_info({table})").fetchall()}

    def apply(self, step: Step) -> None:
        """One migration step, inside the caller's transaction."""
        if isinstance(step, AddColumn):
            if step.column not in self.columns(step.table):
                self.conn.execute(f"ALTER TABLE {step.table} ADD COLUMN {step.column} {step.decl}")
            return
        statement = ""
        for piece in re.split("(;)", step):  # whole statements: a ';' in a comment or a string does not end one
            statement += piece
            if piece == ";" and sqlite3.complete_statement(statement):
                self.conn.execute(statement)
                statement = ""
        if any(ln.strip() and not ln.strip().startswith("--") for ln in statement.splitlines()):
            raise ValueError(f"incomplete SQL statement in a migration: {statement.strip()[:80]!r}")


def _connect(path: Path | str, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    else:  # autocommit: transactions are explicit (Database.transaction)
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
    conn.execute("PRAGMA busy_timeout = 30000")
    conn.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: durable across app crashes, fast commits
    return conn


class Database(SqlDatabase):
    """``data_dir/hub.db``; use :meth:`query`/:meth:`one` to read and :meth:`transaction` to write.

    Opening it brings the schema up to date (:mod:`hub.store.schema`), so every process that opens
    the file (hub, ingest workers, endpoint gateways) sees the same tables.
    """

    kind = "sqlite"

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.location = str(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # owner-only from the first byte (SQLite gives the -wal and -shm files the database file's mode);
        # an older hub's world-readable files are closed too
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        for p in (self.path, self.path.with_name(self.path.name + "-wal"), self.path.with_name(self.path.name + "-shm")):
            if p.exists():
                os.chmod(p, 0o600)
        self._local = threading.local()
        self._write_lock = threading.RLock()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        conn = self.db().conn
        if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            conn.execute("PRAGMA journal_mode = WAL")
        self.migrate()

    def _migration(self) -> AbstractContextManager[Connection]:
        return self.transaction()  # BEGIN IMMEDIATE: two processes starting at once migrate once

    def db(self) -> Connection:
        """This thread's connection (autocommit; transactions are explicit)."""
        db = getattr(self._local, "db", None)
        if db is None:
            conn = _connect(self.path)
            db = Connection(conn)
            self._local.db = db
            self._local.depth = 0
            with self._conns_lock:
                self._conns.append(conn)
        return db

    @contextmanager
    def reader(self) -> Iterator[Connection]:
        """A read-only connection of its own, usable from any thread (e.g. a streamed response's pages)."""
        conn = _connect(self.path, readonly=True)
        try:
            yield Connection(conn)
        finally:
            conn.close()

    def clock(self) -> float:
        return time.time()

    def maintain(self, now: float | None = None) -> int:
        """PostgreSQL creates time partitions ahead; one SQLite table needs nothing."""
        return 0

    @contextmanager
    def batch(self) -> Iterator[Connection]:
        """A transaction for idempotent bulk inserts (ingest); SQLite has one writer at a time anyway."""
        with self.transaction() as tx:
            yield tx

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """One write transaction; nested calls join the outer one."""
        with self._write_lock:
            db = self.db()
            if self._local.depth:
                self._local.depth += 1
                try:
                    yield db
                finally:
                    self._local.depth -= 1
                return
            db.execute("BEGIN IMMEDIATE")
            self._local.depth = 1
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            else:
                db.execute("COMMIT")
            finally:
                self._local.depth = 0

    def close(self) -> None:
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            try:
                conn.close()
            except sqlite3.Error:
                pass
        self._local = threading.local()


def is_postgres_url(location: str | Path) -> bool:
    return str(location).startswith(("postgresql://", "postgres://"))


def open_database(location: str | Path) -> Database:
    """The hub's database at ``location``: a ``postgresql://`` URL, or an SQLite file's path.

    Both stores have the same API (``PgDatabase`` is duck-typed as :class:`Database`; tests/test_store.py
    runs the same checks on both); only this package knows which it got.
    """
    if is_postgres_url(location):
        try:
            from hub.store.pg import PgDatabase
        except ImportError as exc:
            raise RuntimeError(f"{exc}: the PostgreSQL store needs `pip install 'edgefleet[postgres]'`") from None
        return cast(Database, PgDatabase(str(location)))
    return Database(location)
