"""One SQLite outbox file for a whole simulated fleet.

A real device's outbox (agent/outbox.py) is its own SQLite file in WAL mode: three open files
(database, -wal, -shm). Ten thousand agents in one process would hold 30,000 of them beside
10,000 sockets, past the usual hard limit on open files (20,000 here, and a container cannot
raise it). Here every simulated device keeps its rows and sequence numbers in one shared
database, keyed by device id: the same store-and-forward semantics (oldest first, bounded,
drops counted, sequence numbers persisted), one file and one connection for the fleet.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, device TEXT NOT NULL, kind TEXT NOT NULL,
                                   payload BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS outbox_device ON outbox (device, id);
CREATE TABLE IF NOT EXISTS meta (device TEXT NOT NULL, key TEXT NOT NULL, value INTEGER NOT NULL,
                                 PRIMARY KEY (device, key));
"""


class FleetOutboxes:
    """The shared database; :meth:`for_device` hands each agent its view."""

    def __init__(self, path: Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None)  # one event loop uses it: no threads
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)

    def for_device(self, device: str, max_rows: int = 10_000) -> DeviceOutbox:
        return DeviceOutbox(self.db, device, max_rows)

    def close(self) -> None:
        self.db.close()


class DeviceOutbox:
    """The agent's outbox interface (agent.outbox.Outbox) over the shared database."""

    def __init__(self, db: sqlite3.Connection, device: str, max_rows: int) -> None:
        self._db, self.device, self.max_rows = db, device, max_rows
        self._count = int(db.execute("SELECT count(*) FROM outbox WHERE device = ?", (device,)).fetchone()[0])
        self._dropped = self._meta("dropped")

    def close(self) -> None:
        """The fleet closes the shared connection."""

    def _meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE device = ? AND key = ?", (self.device, key)).fetchone()
        return int(row[0]) if row else 0

    def _add_meta(self, key: str, delta: int) -> None:
        self._db.execute("INSERT INTO meta (device, key, value) VALUES (?, ?, ?)"
                         " ON CONFLICT (device, key) DO UPDATE SET value = value + excluded.value",
                         (self.device, key, delta))

    @property
    def dropped(self) -> int:
        return self._dropped

    def next_seq(self, kind: str) -> int:
        self._add_meta(f"seq:{kind}", 1)  # autocommit: one statement, atomic
        return self._meta(f"seq:{kind}")

    def last_seq(self, kind: str) -> int:
        return self._meta(f"seq:{kind}")

    def put(self, kind: str, payload: bytes) -> int:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            rowid = int(self._db.execute("INSERT INTO outbox (device, kind, payload) VALUES (?, ?, ?)",
                                         (self.device, kind, payload)).lastrowid or 0)
            excess = self._count + 1 - self.max_rows
            if excess > 0:
                self._db.execute("DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE device = ?"
                                 " ORDER BY id LIMIT ?)", (self.device, excess))
                self._add_meta("dropped", excess)
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._count += 1 - max(excess, 0)
        self._dropped += max(excess, 0)
        return rowid

    def peek(self, limit: int = 100) -> list[tuple[int, str, bytes]]:
        return [(int(i), str(k), bytes(p)) for i, k, p in self._db.execute(
            "SELECT id, kind, payload FROM outbox WHERE device = ? ORDER BY id LIMIT ?", (self.device, limit))]

    def delete(self, rowid: int) -> None:
        self._count -= self._db.execute("DELETE FROM outbox WHERE id = ? AND device = ?", (rowid, self.device)).rowcount

    def __len__(self) -> int:
        return self._count
