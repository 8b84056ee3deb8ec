"""A lease row in the hub's database: one holder at a time, and a fencing epoch that grows with each new holder.

Hub replicas elect their leader with it (``hub/leader.py``). Times are the database server's clock,
so replicas on machines whose clocks disagree still agree on who holds the lease. A holder renews
before ``expires_at``; anyone may take a lease that has expired, and taking it from another holder
bumps ``epoch``. A write that only the leader may make checks the epoch *in its own transaction*
(:meth:`Lease.fence`): a holder that was paused past its lease finds another epoch there, and its
transaction rolls back instead of committing.
"""

from __future__ import annotations

from typing import Any

from hub.store.db import Database

# the database clock as unix seconds, in each dialect (SQLite: one hub per file, so its clock is the only one)
CLOCK = {
    "sqlite": "((julianday('now') - 2440587.5) * 86400.0)",
    "postgres": "extract(epoch FROM clock_timestamp())",
}


class LeaseLost(Exception):
    """This process no longer holds the lease: the write that needed it must not happen."""


class Lease:
    def __init__(self, db: Database, holder: str, ttl_s: float, name: str = "leader") -> None:
        self.db, self.holder, self.ttl_s, self.name = db, holder, ttl_s, name
        self._now = CLOCK[db.kind]

    def acquire(self, steal: bool = False) -> int | None:
        """Take or renew the lease; its epoch while this process holds it, else None.

        ``steal`` takes it whoever holds it (SQLite: the data directory's lock already proves no other
        hub is alive).
        """
        free = "1 = 1" if steal else f"leases.holder = excluded.holder OR leases.expires_at < {self._now}"
        # not behind the write lock (a long write transaction must not let the lease run out); a fenced
        # transaction share-locks the row, so give up after a moment rather than queue behind it
        with self.db.batch() as tx:
            if self.db.kind == "postgres":
                tx.execute("SET LOCAL lock_timeout = '1s'")
            return tx.scalar(
                f"INSERT INTO leases (name, holder, epoch, expires_at) VALUES (?, ?, 1, {self._now} + ?)"
                " ON CONFLICT (name) DO UPDATE SET"
                " epoch = CASE WHEN leases.holder = excluded.holder THEN leases.epoch ELSE leases.epoch + 1 END,"
                f" holder = excluded.holder, expires_at = excluded.expires_at WHERE {free} RETURNING epoch",
                (self.name, self.holder, self.ttl_s))

    def release(self, epoch: int) -> None:
        """Give the lease up now (a clean stop): another replica takes it at its next try, not after the TTL."""
        with self.db.batch() as tx:
            tx.execute("UPDATE leases SET expires_at = 0 WHERE name = ? AND holder = ? AND epoch = ?",
                       (self.name, self.holder, epoch))

    def fence(self, tx: Any, epoch: int) -> None:
        """Inside a write transaction: raise :class:`LeaseLost` unless this holder still has ``epoch``, unexpired.

        On PostgreSQL the row stays share-locked until the transaction ends, so no one takes the lease
        between this check and the commit.
        """
        lock = " FOR SHARE" if self.db.kind == "postgres" else ""
        held = tx.scalar(f"SELECT epoch FROM leases WHERE name = ? AND holder = ? AND epoch = ?"
                         f" AND expires_at > {self._now}{lock}", (self.name, self.holder, epoch))
        if held is None:
            raise LeaseLost(f"lease {self.name!r} epoch {epoch} is no longer held by {self.holder}")

    def current(self) -> dict[str, Any] | None:
        """Who holds the lease, its epoch, and for how many more seconds (negative: expired)."""
        return self.db.one(f"SELECT holder, epoch, expires_at - {self._now} AS remaining_s FROM leases WHERE name = ?",
                           (self.name,))
