"""The hub's SQLite database (WAL): schema, per-thread connections and serialised write transactions.

The FastAPI thread pool, the MQTT thread and the ingest writer all touch the
database. Each thread gets its own connection (WAL lets readers run beside a
writer); writers take one process-wide lock and ``BEGIN IMMEDIATE`` so a
read-modify-write (e.g. "next version = max + 1") is atomic.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlite_utils

from hub import telemetry

SCHEMA = """
CREATE TABLE IF NOT EXISTS api_tokens (
    token_hash TEXT PRIMARY KEY, name TEXT NOT NULL, role TEXT NOT NULL, created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS enrollment_tokens (
    token_hash TEXT PRIMARY KEY, labels TEXT NOT NULL DEFAULT '{}', expires_at REAL NOT NULL, used_by TEXT
);
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY,
    labels TEXT NOT NULL DEFAULT '{}',
    facts TEXT NOT NULL DEFAULT '{}',
    online INTEGER NOT NULL DEFAULT 0,
    last_seen REAL,
    revision INTEGER NOT NULL DEFAULT 0,
    reported TEXT,
    created_at REAL NOT NULL,
    mqtt_password_hash TEXT,
    desired TEXT,           -- the module list last published, to publish only on change
    desired_envelope TEXT,  -- the signed envelope last published, re-sent after a broker restart
    desired_expires INTEGER
);
CREATE TABLE IF NOT EXISTS models (
    name TEXT NOT NULL, version INTEGER NOT NULL, framework TEXT NOT NULL,
    files TEXT NOT NULL, inputs TEXT NOT NULL, outputs TEXT NOT NULL, tags TEXT NOT NULL DEFAULT '{}',
    description TEXT NOT NULL DEFAULT '', created_at REAL NOT NULL, created_by TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS modules (
    name TEXT NOT NULL, version INTEGER NOT NULL, digest TEXT NOT NULL UNIQUE, runtime TEXT NOT NULL,
    envelope TEXT NOT NULL, size INTEGER NOT NULL, created_at REAL NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS chunks (
    digest TEXT PRIMARY KEY, blob TEXT NOT NULL, offset INTEGER NOT NULL, length INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS deployments (
    name TEXT PRIMARY KEY, module_name TEXT NOT NULL, module_version INTEGER NOT NULL, digest TEXT NOT NULL,
    target TEXT NOT NULL, priority INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL,
    active INTEGER NOT NULL DEFAULT 1
);
-- every revision of a deployment stays, so a rollout can go back to any of them
CREATE TABLE IF NOT EXISTS deployment_revisions (
    deployment TEXT NOT NULL, revision INTEGER NOT NULL, module_name TEXT NOT NULL, module_version INTEGER NOT NULL,
    digest TEXT NOT NULL, target TEXT NOT NULL, priority INTEGER NOT NULL DEFAULT 0, collect_rate_ppm INTEGER,
    created_at REAL NOT NULL, created_by TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (deployment, revision)
);
-- one row per rollout of a revision; state machine in hub/rollout_states.py
CREATE TABLE IF NOT EXISTS rollouts (
    id INTEGER PRIMARY KEY AUTOINCREMENT, deployment TEXT NOT NULL, revision INTEGER NOT NULL,
    from_revision INTEGER, strategy TEXT NOT NULL, gates TEXT NOT NULL, on_failure TEXT NOT NULL,
    bake_s REAL NOT NULL, wave_timeout_s REAL NOT NULL, state TEXT NOT NULL, wave INTEGER NOT NULL DEFAULT 0,
    paused_from TEXT, phase_started_at REAL, everyone INTEGER NOT NULL DEFAULT 0, reason TEXT NOT NULL DEFAULT '',
    last_gate TEXT, created_at REAL NOT NULL, created_by TEXT NOT NULL DEFAULT '', updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS rollouts_deployment ON rollouts (deployment, id);
-- the devices a rollout has moved to its revision (the rest keep the deployment's stable revision)
CREATE TABLE IF NOT EXISTS rollout_devices (
    rollout INTEGER NOT NULL, device TEXT NOT NULL, wave INTEGER NOT NULL, admitted_at REAL NOT NULL,
    PRIMARY KEY (rollout, device)
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL,
    subject TEXT NOT NULL, detail TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS data_records (
    device TEXT NOT NULL, seq INTEGER NOT NULL, idx INTEGER NOT NULL, ts REAL NOT NULL,
    module TEXT NOT NULL, version INTEGER NOT NULL, input TEXT, output TEXT,
    PRIMARY KEY (device, seq, idx)
);
"""


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True)


def loads(text: str | None, default: Any = None) -> Any:
    return default if text is None else json.loads(text)


class Database:
    """``data_dir/hub.db``; use :meth:`query`/:meth:`one` to read and :meth:`transaction` to write."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
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
        db = self.db()
        db.enable_wal()
        db.conn.executescript(SCHEMA)
        db.conn.executescript(telemetry.SCHEMA)
        self._add_columns(db)

    # columns added after a table first shipped: (table, column, declaration); SQLite has no ADD COLUMN IF NOT EXISTS
    ADDED_COLUMNS = (
        ("devices", "mqtt_password_mosq", "TEXT"),  # mosquitto $7$ hash of the device's broker password
        ("deployments", "revision", "INTEGER NOT NULL DEFAULT 1"),
        ("deployments", "stable_revision", "INTEGER"),  # what devices outside a rollout get; NULL: nothing yet
        ("deployment_revisions", "device_bake", "TEXT"),  # JSON BakePolicy for devices (protocol); NULL: none
        ("enrollment_tokens", "uses", "INTEGER NOT NULL DEFAULT 1"),  # >1: a fleet-provisioning (group) token
        ("enrollment_tokens", "used", "INTEGER NOT NULL DEFAULT 0"),
    )

    def _add_columns(self, db: sqlite_utils.Database) -> None:
        for table, column, decl in self.ADDED_COLUMNS:
            have = {r[1] for r in db.execute(f"PRAGMA table_info({table})").fetchall()}
            if column not in have:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")

    def db(self) -> sqlite_utils.Database:
        """This thread's connection (autocommit; transactions are explicit)."""
        db = getattr(self._local, "db", None)
        if db is None:
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            conn.execute("PRAGMA busy_timeout = 30000")
            conn.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: durable across app crashes, fast commits
            db = sqlite_utils.Database(conn, execute_plugins=False)
            self._local.db = db
            self._local.depth = 0
            with self._conns_lock:
                self._conns.append(conn)
        return db

    def apply_schema(self, script: str) -> None:
        """Run idempotent DDL (``CREATE … IF NOT EXISTS``) for a service's own tables and indexes."""
        with self._write_lock:
            self.db().conn.executescript(script)  # executescript commits by itself: never inside transaction()

    def query(self, sql: str, params: Any = ()) -> list[dict[str, Any]]:
        return list(self.db().query(sql, params))

    def one(self, sql: str, params: Any = ()) -> dict[str, Any] | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    def scalar(self, sql: str, params: Any = ()) -> Any:
        row = self.db().execute(sql, params).fetchone()
        return row[0] if row else None

    @contextmanager
    def transaction(self) -> Iterator[sqlite_utils.Database]:
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


def now() -> float:
    return time.time()
