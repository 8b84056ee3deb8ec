"""A bounded on-disk outbox (SQLite): store-and-forward for telemetry and data batches.

Rows leave in insertion order and are deleted only after the broker's PUBACK, so
a crash or an outage loses nothing but what the bound drops (oldest first,
counted). The same file keeps per-kind sequence numbers, so they survive restarts.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, payload BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class Outbox:
    def __init__(self, path: Path, max_rows: int = 10_000) -> None:
        self.path = Path(path)
        self.max_rows = max_rows
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None)  # autocommit; explicit BEGIN where needed
        # WAL + NORMAL: durable across process crashes and cheap enough for many simulated agents.
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        # Counts kept in memory (this object is the only writer), so snapshots never touch SQLite.
        self._count = int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        self._dropped = self._meta("dropped")

    def close(self) -> None:
        self._db.close()

    def _meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def _add_meta(self, key: str, delta: int) -> None:
        self._db.execute(
            "INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value = value + excluded.value",
            (key, delta),
        )

    @property
    def dropped(self) -> int:
        """Rows discarded by the bound, over the outbox's lifetime."""
        return self._dropped

    def next_seq(self, kind: str) -> int:
        """The next sequence number for ``kind``: strictly increasing, persisted."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._add_meta(f"seq:{kind}", 1)
            seq = self._meta(f"seq:{kind}")
            self._db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        return seq

    def _rollback(self) -> None:
        """End a failed transaction (a full disk): SQLite may have rolled it back already; the next one must start."""
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def last_seq(self, kind: str) -> int:
        """The sequence number ``next_seq`` handed out last for ``kind`` (0: none yet)."""
        return self._meta(f"seq:{kind}")

    def put(self, kind: str, payload: bytes) -> int:
        """Append a message; if over the bound, drop the oldest rows and count them. Returns the row id."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            rowid = int(self._db.execute("INSERT INTO outbox(kind, payload) VALUES(?, ?)", (kind, payload)).lastrowid or 0)
            excess = self._count + 1 - self.max_rows
            if excess > 0:
                self._db.execute("DELETE FROM outbox WHERE id IN (SELECT id FROM outbox ORDER BY id LIMIT ?)", (excess,))
                self._add_meta("dropped", excess)
            self._db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        self._count += 1 - max(excess, 0)
        self._dropped += max(excess, 0)
        return rowid

    def peek(self, limit: int = 100) -> list[tuple[int, str, bytes]]:
        """The oldest ``limit`` rows, in order."""
        return [(int(i), str(k), bytes(p)) for i, k, p in
                self._db.execute("SELECT id, kind, payload FROM outbox ORDER BY id LIMIT ?", (limit,))]

    def delete(self, rowid: int) -> None:
        self._count -= self._db.execute("DELETE FROM outbox WHERE id=?", (rowid,)).rowcount

    def __len__(self) -> int:
        return self._count
