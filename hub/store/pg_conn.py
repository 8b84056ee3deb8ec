"""PostgreSQL connections for the hub's store: a small pool, the hub's type adaptations, results read to their end."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.adapt import Dumper, Loader

POOL_SIZE = 16
POOL_WAIT_S = 60.0
# a transaction idle this long is a hub process paused or gone: the server ends it and frees its locks
IDLE_IN_TX_MS = 30_000


class _NumericLoader(Loader):
    """``numeric`` (what SUM over integers gives) as int when whole, else float, as SQLite returns them."""

    def load(self, data: Any) -> int | float:
        text = bytes(data).decode()
        return float(text) if any(c in text for c in ".eEN") else int(text)


class _BoolDumper(Dumper):
    """Python bools as 0/1 integers, as SQLite stores them (the schema's flags are INTEGER columns)."""

    oid = psycopg.adapters.types["int8"].oid

    def dump(self, obj: Any) -> bytes:
        return b"1" if obj else b"0"


class Rows:
    """A statement's result read to its end (so its connection can go back to the pool): a cursor's reading methods."""

    def __init__(self, cur: psycopg.Cursor) -> None:
        self.description = cur.description
        self.rowcount = cur.rowcount
        self._rows: list[tuple[Any, ...]] = cur.fetchall() if cur.description is not None else []
        self._i = 0

    def fetchone(self) -> tuple[Any, ...] | None:
        if self._i >= len(self._rows):
            return None
        self._i += 1
        return self._rows[self._i - 1]

    def fetchmany(self, size: int = 1) -> list[tuple[Any, ...]]:
        out = self._rows[self._i:self._i + size]
        self._i += len(out)
        return out

    def fetchall(self) -> list[tuple[Any, ...]]:
        out = self._rows[self._i:]
        self._i = len(self._rows)
        return out

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return iter(self.fetchall())

    def close(self) -> None:
        self._rows = []


class Deferred(Rows):
    """An executemany queued in a pipeline: its row count is fetched (a round trip) only if someone asks."""

    def __init__(self, conn: psycopg.Connection, cur: psycopg.Cursor) -> None:
        self._conn, self._cur = conn, cur
        self._count: int | None = None
        self.description = None
        self._rows: list[tuple[Any, ...]] = []
        self._i = 0

    @property  # type: ignore[override]
    def rowcount(self) -> int:
        if self._count is None:
            with self._conn.pipeline():  # leaving it syncs
                pass
            self._count = self._cur.rowcount
        return self._count


class Pool:
    """At most ``size`` connections, made on demand; a broken one is dropped, an idle one kept for the next."""

    def __init__(self, url: str, size: int = POOL_SIZE, application: str = "edgefleet-hub") -> None:
        self.url, self.size, self.application = url, size, application
        self._idle: list[psycopg.Connection] = []
        self._open = 0
        self._cond = threading.Condition()
        self._closed = False

    def connect(self, autocommit: bool = True) -> psycopg.Connection:
        """A new connection with the hub's type adaptations (the pool's, a reader's, a lease keeper's)."""
        conn = psycopg.connect(self.url, autocommit=autocommit, application_name=self.application)
        conn.adapters.register_loader("numeric", _NumericLoader)
        conn.adapters.register_dumper(bool, _BoolDumper)
        conn.execute(f"SET idle_in_transaction_session_timeout = {IDLE_IN_TX_MS}")
        return conn

    @contextmanager
    def borrow(self) -> Iterator[psycopg.Connection]:
        conn = self.acquire()
        ok = False
        try:
            yield conn
            ok = True
        finally:
            self.release(conn, broken=not ok and conn.broken)

    def acquire(self) -> psycopg.Connection:
        deadline = time.monotonic() + POOL_WAIT_S
        with self._cond:
            while True:
                if self._closed:
                    raise psycopg.OperationalError("the hub's database is closed")
                if self._idle:
                    return self._idle.pop()
                if self._open < self.size:
                    self._open += 1
                    break
                if not self._cond.wait(deadline - time.monotonic()):
                    raise psycopg.OperationalError(f"no database connection free within {POOL_WAIT_S:.0f}s"
                                                   f" ({self.size} in use)")
        try:
            return self.connect()
        except BaseException:
            with self._cond:
                self._open -= 1
                self._cond.notify()
            raise

    def release(self, conn: psycopg.Connection, broken: bool = False) -> None:
        if not broken and not conn.closed and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            try:
                conn.rollback()
            except psycopg.Error:
                broken = True
        with self._cond:
            if broken or conn.closed or self._closed:
                self._open -= 1
                if not conn.closed:
                    conn.close()
            else:
                self._idle.append(conn)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._cond.notify_all()
        for conn in idle:
            try:
                conn.close()
            except psycopg.Error:
                pass
