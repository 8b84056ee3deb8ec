"""The hub's database on PostgreSQL (psycopg 3): the same API as the SQLite store, shared by many hub processes.

Connections come from a small pool: a statement outside a transaction borrows one and returns it with
its rows read; a transaction keeps one for the thread until it ends. Write transactions take one
database-wide advisory lock, so a read-modify-write ("next version = max + 1") is as atomic as under
SQLite's ``BEGIN IMMEDIATE``, across every hub replica; :meth:`PgDatabase.batch` is for the idempotent
bulk inserts of ingest (their rows are written in key order, so two writers never deadlock).
Telemetry and collected data are partitioned by day (:data:`~hub.store.schema.PARTITIONED`): partitions
are created a week ahead, rows outside them land in a default partition, and retention drops whole
partitions. Install with ``pip install 'edgefleet[postgres]'``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from itertools import chain, islice
from typing import Any

import psycopg
from psycopg import sql as psql

from hub.store import dialect
from hub.store.base import SqlConnection, SqlDatabase
from hub.store.pg_conn import POOL_SIZE, Deferred, Pool, Rows
from hub.store.schema import PARTITIONED, AddColumn, Step

log = logging.getLogger("edgefleet.hub.store.pg")

WRITE_LOCK = 0x6564676566  # pg_advisory_xact_lock key of "one write transaction at a time" ("edgef")
MIGRATE_LOCK = WRITE_LOCK + 1
PARTITIONS_AHEAD = 7  # periods created ahead of the clock
COPY_MIN_ROWS = 64  # below this an executemany (pipelined) is as quick as COPY through a temporary table


def _params(params: Any) -> tuple[bool, Any]:
    """(named, params): a mapping is ``:name`` style."""
    if isinstance(params, Mapping):
        return True, dict(params)
    return False, tuple(params) if params is not None else ()


class PgConnection(SqlConnection):
    """The SQL surface of :class:`~hub.store.base.SqlConnection`, on a pooled connection or a transaction's own."""

    kind = "postgres"

    def __init__(self, db: PgDatabase, conn: psycopg.Connection | None = None, pipelined: bool = False) -> None:
        self.database = db
        self.conn = conn  # the transaction's (or a reader's) connection; None: borrow per statement
        self.pipelined = pipelined  # a batch transaction in pipeline mode: read a result only when asked for

    def _result(self, c: psycopg.Connection, run: Any) -> Rows:
        if not self.pipelined:
            return Rows(run())
        with c.pipeline():  # leaving a nested pipeline syncs: what was queued (BEGIN too) goes in one round trip
            cur = run()
        return Rows(cur)

    def _run(self, fn: Any) -> Any:
        if self.conn is not None:
            return fn(self.conn)
        with self.database.pool.borrow() as conn:
            return fn(conn)

    def execute(self, sql: str, params: Any = ()) -> Rows:
        named, args = _params(params)
        if not args and not named:
            text = dialect.plain(sql)
            return self._run(lambda c: self._result(c, lambda: c.execute(text)))  # type: ignore[arg-type]
        text = dialect.dml(sql, named)
        return self._run(lambda c: self._result(c, lambda: c.execute(text, args)))  # type: ignore[arg-type]

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> Rows:
        text = dialect.dml(sql)
        rows = list(rows)

        def run(c: psycopg.Connection) -> Rows:
            cur = c.cursor()
            if rows:
                cur.executemany(text, rows)  # type: ignore[arg-type]  # pipelined: one round trip for all
            return Rows(cur) if not self.pipelined else Deferred(c, cur)
        return self._run(run)

    def insert_many(self, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]], *,
                    ignore: bool = False) -> int:
        it = iter(rows)
        head = list(islice(it, COPY_MIN_ROWS))
        if len(head) >= COPY_MIN_ROWS:  # streamed: a million rows are never all in memory
            return len(self._copy_insert(table, columns, chain(head, it), ignore=ignore, returning=()))
        sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
        return self.executemany(sql + (" ON CONFLICT DO NOTHING" if ignore else ""), head).rowcount

    def insert_new(self, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]],
                   key: Sequence[str]) -> set[tuple[Any, ...]]:
        """Insert rows whose key is not stored yet; returns the keys of those inserted.

        One statement: the rows travel as one array per column (``unnest``), so a batch of any size is
        one round trip with no temporary table (ingest commits many small batches).
        """
        rows = list(rows)
        if not rows:
            return set()
        types = self.database.column_types(table)
        arrays = psql.SQL(", ").join(psql.SQL("%s::{}[]").format(psql.SQL(types[c])) for c in columns)
        cols = psql.SQL(", ").join(psql.Identifier(c) for c in columns)
        q = psql.SQL("INSERT INTO {} ({}) SELECT * FROM unnest({}) ON CONFLICT DO NOTHING RETURNING {}").format(
            psql.Identifier(table), cols, arrays, psql.SQL(", ").join(psql.Identifier(k) for k in key))
        params = [list(col) for col in zip(*rows)]
        return set(self._run(lambda c: self._result(c, lambda: c.execute(q, params)).fetchall()))

    def _copy_insert(self, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]], *, ignore: bool,
                     returning: Sequence[str]) -> list[tuple[Any, ...]]:
        """COPY the rows into a temporary table, then one INSERT … SELECT from it (ON CONFLICT DO NOTHING)."""
        tmp = f"_copy_{table}"
        cols = psql.SQL(", ").join(psql.Identifier(c) for c in columns)

        def run(c: psycopg.Connection) -> list[tuple[Any, ...]]:
            with c.transaction():  # the temporary table lives for this transaction only
                c.execute(psql.SQL("CREATE TEMPORARY TABLE IF NOT EXISTS {} (LIKE {} INCLUDING DEFAULTS)"
                                   " ON COMMIT DROP").format(psql.Identifier(tmp), psql.Identifier(table)))
                c.execute(psql.SQL("TRUNCATE {}").format(psql.Identifier(tmp)))
                with c.cursor().copy(psql.SQL("COPY {} ({}) FROM STDIN").format(psql.Identifier(tmp), cols)) as cp:
                    for r in rows:
                        cp.write_row(r)
                q = psql.SQL("INSERT INTO {} ({}) SELECT {} FROM {}").format(
                    psql.Identifier(table), cols, cols, psql.Identifier(tmp))
                if ignore:
                    q += psql.SQL(" ON CONFLICT DO NOTHING")
                if returning:
                    q += psql.SQL(" RETURNING ") + psql.SQL(", ").join(psql.Identifier(k) for k in returning)
                    return list(c.execute(q).fetchall())
                cur = c.execute(q)
                return [()] * max(cur.rowcount, 0)
        return self._run(run)

    def tables(self) -> set[str]:
        """Tables (a partitioned table counts once, its partitions not at all)."""
        return {r[0] for r in self.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p') AND NOT c.relispartition").fetchall()}

    def columns(self, table: str) -> set[str]:
        return {r[0] for r in self.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema()"
            " AND table_name = ?", (table,)).fetchall()}

    def apply(self, step: Step) -> None:
        if isinstance(step, AddColumn):
            self.execute(f"ALTER TABLE {step.table} ADD COLUMN IF NOT EXISTS {step.column}"
                         f" {dialect.column_decl(step.decl)}")
            return
        for statement in dialect.statements(step):
            self.execute(dialect.ddl(statement))
            created = dialect._CREATE_TABLE.match(dialect.ddl(statement))
            if created and created.group(1) in PARTITIONED:
                self.execute(f"CREATE TABLE IF NOT EXISTS {created.group(1)}_default PARTITION OF"
                             f" {created.group(1)} DEFAULT")

    def clock(self) -> float:
        """The database server's clock (unix seconds): one clock for every replica's leases."""
        return float(self.scalar("SELECT extract(epoch FROM clock_timestamp())"))

    def delete_before(self, table: str, cutoff: float) -> int:
        """Delete the rows of a partitioned table older than ``cutoff``: whole partitions dropped, the rest deleted."""
        part = PARTITIONED[table]
        dropped = 0
        for name, hi in self._partitions(table):
            if hi <= cutoff:
                dropped += int(self.scalar(f"SELECT count(*) FROM {name}") or 0)
                self.execute(f"DROP TABLE {name}")
        return dropped + self.execute(f"DELETE FROM {table} WHERE {part.column} < ?", (cutoff,)).rowcount

    def _partitions(self, table: str) -> list[tuple[str, float]]:
        """(name, upper bound) of each range partition of ``table`` (not the default one)."""
        out = []
        for name, bound in self.execute(
                "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i JOIN pg_class c"
                " ON c.oid = i.inhrelid WHERE i.inhparent = ?::regclass", (table,)).fetchall():
            if "TO (" in bound:
                out.append((name, float(bound.split("TO (")[1].rstrip(")").strip("'"))))
        return out

    def ensure_partitions(self, now: float) -> int:
        """Create the partitions from the current period to :data:`PARTITIONS_AHEAD` ahead; returns how many."""
        made = 0
        for table, part in PARTITIONED.items():
            have = {name for name, _ in self._partitions(table)}
            first = math.floor(now / part.period_s) * part.period_s
            for k in range(PARTITIONS_AHEAD + 1):
                lo = first + k * part.period_s
                name = f"{table}_p{int(lo)}"
                if name in have:
                    continue
                self._add_partition(table, name, part.column, lo, lo + part.period_s)
                made += 1
        return made

    def _add_partition(self, table: str, name: str, column: str, lo: float, hi: float) -> None:
        default = f"{table}_default"
        stray = self.scalar(f"SELECT count(*) FROM {default} WHERE {column} >= ? AND {column} < ?", (lo, hi))
        if not stray:
            self.execute(f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF {table} FOR VALUES FROM ({lo!r}) TO ({hi!r})")
            return
        # rows that arrived before their partition existed (a device's clock far ahead): move them in with it
        self.execute(f"CREATE TABLE {name} (LIKE {table} INCLUDING DEFAULTS)")
        self.execute(f"WITH moved AS (DELETE FROM {default} WHERE {column} >= ? AND {column} < ? RETURNING *)"
                     f" INSERT INTO {name} SELECT * FROM moved", (lo, hi))
        self.execute(f"ALTER TABLE {table} ATTACH PARTITION {name} FOR VALUES FROM ({lo!r}) TO ({hi!r})")


class PgDatabase(SqlDatabase):
    """A hub database on a PostgreSQL server; opening it brings the schema up to date (once, whoever opens first)."""

    kind = "postgres"

    def __init__(self, url: str, pool_size: int = POOL_SIZE, application: str = "edgefleet-hub") -> None:
        self.location = url
        self.pool = Pool(url, pool_size, application)
        self._local = threading.local()
        self._types: dict[str, dict[str, str]] = {}
        self.migrate()
        self.maintain()

    # --- connections -------------------------------------------------------------------------------

    def column_types(self, table: str) -> dict[str, str]:
        """Each column's SQL type (for ``unnest`` arrays), read once per table."""
        types = self._types.get(table)
        if types is None:
            types = self._types[table] = {r[0]: r[1] for r in self.db().execute(
                "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a"
                " WHERE a.attrelid = ?::regclass AND a.attnum > 0 AND NOT a.attisdropped", (table,)).fetchall()}
        return types

    def db(self) -> PgConnection:
        """This thread's connection: its transaction's, or one borrowed per statement."""
        return getattr(self._local, "tx", None) or PgConnection(self)

    @contextmanager
    def reader(self) -> Iterator[PgConnection]:
        """A read-only connection of its own, usable from any thread (a streamed response's pages)."""
        conn = self.pool.connect()
        conn.execute("SET default_transaction_read_only = on")
        try:
            yield PgConnection(self, conn)
        finally:
            conn.close()

    # --- reads ---------------------------------------------------------------------------------------

    def clock(self) -> float:
        return self.db().clock()

    # --- writes --------------------------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[PgConnection]:
        """One write transaction, serialised with every other hub process's; nested calls join the outer one."""
        with self._transaction(WRITE_LOCK) as tx:
            yield tx

    @contextmanager
    def batch(self) -> Iterator[PgConnection]:
        """A transaction for idempotent bulk inserts (ingest): it runs beside other writers, not after them."""
        with self._transaction(None) as tx:
            yield tx

    @contextmanager
    def _transaction(self, lock: int | None) -> Iterator[PgConnection]:
        outer = getattr(self._local, "tx", None)
        if outer is not None:
            if lock is not None and not getattr(self._local, "locked", False):
                outer.execute("SELECT pg_advisory_xact_lock(?)", (lock,))
                self._local.locked = True
            yield outer
            return
        conn = self.pool.acquire()
        ok = False
        try:
            # a batch in pipeline mode: BEGIN goes with its first statement and COMMIT with its last, so an
            # ingest commit costs two round trips (its inserts' RETURNING, then the rollups and COMMIT)
            with conn.pipeline() if lock is None else nullcontext(), conn.transaction():
                tx = PgConnection(self, conn, pipelined=lock is None)
                if lock is not None:
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock,))
                self._local.tx, self._local.locked = tx, lock is not None
                try:
                    yield tx
                finally:
                    self._local.tx = None
            ok = True
        finally:
            self.pool.release(conn, broken=not ok and conn.broken)

    # --- schema --------------------------------------------------------------------------------------

    def _migration(self) -> AbstractContextManager[PgConnection]:
        return self._transaction(MIGRATE_LOCK)

    def maintain(self, now: float | None = None) -> int:
        """Create the time partitions the coming week needs; returns how many were made."""
        with self._transaction(MIGRATE_LOCK) as tx:
            return tx.ensure_partitions(time.time() if now is None else now)

    def close(self) -> None:
        self.pool.close()
