"""Which hub process does the things there must be one of: the leader, elected by a lease in the database.

Every replica serves the API, enrolment, ingest and bundle downloads. Only the leader runs the
rollout controller, signs and publishes desired states, serves bundle parts over MQTT (the
carousel), evaluates alerts and applies retention; the others leave those loops idle and hand
desired-state syncs to it through the database (``director_requests``).

The lease (``hub/store/lease.py``) lasts ``ttl_s`` by the database's clock and is renewed every
``ttl_s / 5``. This process counts itself leader only until ``ttl_s - margin`` after it *sent* its last
successful renewal, by its own monotonic clock (which keeps running while the process is stopped):
a leader paused past its lease finds, once resumed, that it is not leader before it publishes
anything, and the transactions it had started fail their fence (the epoch is checked in the same
transaction). With SQLite there is one hub per data directory (:class:`DataDirLock`), so it is
always the leader.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Protocol

from hub.errors import HubError
from hub.store import Database, StoreError
from hub.store.lease import Lease, LeaseLost

log = logging.getLogger("edgefleet.hub.leader")

__all__ = ["SOLE_LEADER", "DataDirBusy", "DataDirLock", "Leader", "Leadership", "LeaseLost"]


class Leader(Protocol):
    """What leader-only code asks: am I leader (from memory), and, inside a write transaction, still so?"""

    def is_leader(self) -> bool: ...

    def fence(self, tx: Any) -> None: ...


class _Sole:
    """Leader always: for a service built alone (tests, tools) with no replicas to share with."""

    def is_leader(self) -> bool:
        return True

    def fence(self, tx: Any) -> None:
        return None


SOLE_LEADER: Leader = _Sole()


class DataDirBusy(HubError):
    status = 409


class DataDirLock:
    """An exclusive lock on ``data_dir/hub.lock`` for as long as this process runs a hub on it."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / "hub.lock"
        self._file: IO[str] | None = None

    def acquire(self) -> DataDirLock:
        # 0600 like every file in the data directory (its content names this host and pid)
        f = os.fdopen(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600), "a+")
        os.chmod(self.path, 0o600)  # one an older hub left 0644
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            owner = f.read().strip() or "another process"
            f.close()
            raise DataDirBusy(f"{self.path.parent} is in use by another hub ({owner}); with SQLite one hub serves"
                              " a data directory (for replicas use --db postgresql://…)") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


class Leadership:
    """Keeps trying for the lease on a thread; ``is_leader()`` answers from memory, ``fence(tx)`` from the database."""

    def __init__(self, db: Database, ttl_s: float = 5.0, *, sole: bool = False, name: str = "leader") -> None:
        self.db, self.ttl_s, self.sole = db, ttl_s, sole
        self.holder = f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        self.lease = Lease(db, self.holder, ttl_s, name)
        self.renew_s = ttl_s / 5
        self.margin_s = min(1.0, ttl_s / 4)  # this side of the database's expiry, for clock rates and latency
        self.epoch: int | None = None
        self._valid_until = 0.0  # monotonic
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.on_elected: list[Callable[[], Any]] = []  # run on this class's thread when this process becomes leader
        self.on_deposed: list[Callable[[], Any]] = []
        self.elections = 0  # times this process became leader

    def is_leader(self) -> bool:
        return self.epoch is not None and time.monotonic() < self._valid_until

    def check(self) -> None:
        """Raise :class:`LeaseLost` unless this process is leader now (before a publish only the leader makes)."""
        if not self.is_leader():
            raise LeaseLost(f"{self.holder} is not the leader")

    def fence(self, tx: Any) -> None:
        """Inside a write transaction: raise :class:`LeaseLost` unless this process still holds the lease."""
        epoch = self.epoch
        if epoch is None or not self.is_leader():
            raise LeaseLost(f"{self.holder} is not the leader")
        self.lease.fence(tx, epoch)

    def start(self) -> None:
        """Try once now (a lone hub leads from its first request), then keep trying on a thread."""
        self._stop.clear()
        self._try()
        self._thread = threading.Thread(target=self._run, name="hub-leader", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.ttl_s + 5)
        epoch, self.epoch, self._valid_until = self.epoch, None, 0.0
        if epoch is not None:
            try:  # hand over at once: the next replica need not wait for the lease to run out
                self.lease.release(epoch)
            except StoreError:
                log.warning("could not release the leader lease; it runs out in %.0fs", self.ttl_s)

    def _run(self) -> None:
        while not self._stop.wait(self.renew_s if self.epoch is not None else min(self.renew_s, 1.0)):
            self._try()

    def _try(self) -> None:
        sent = time.monotonic()
        try:
            epoch = self.lease.acquire(steal=self.sole and self.epoch is None)
        except StoreError as exc:  # the database is away: leadership lapses when the lease would
            log.warning("leader lease not renewed: %s", exc)
            return
        except Exception:
            log.exception("leader lease: unexpected error")
            return
        self._set(epoch, sent + self.ttl_s - self.margin_s if epoch is not None else 0.0)

    def _set(self, epoch: int | None, valid_until: float) -> None:
        with self._lock:
            # lapsed meanwhile (a pause, a slow database), or taken and taken back: a new term either way
            was = self.is_leader() and epoch == self.epoch
            self.epoch, self._valid_until = epoch, valid_until
            now = self.is_leader()
        if now and not was:
            self.elections += 1
            log.info("this hub (%s) is the leader, epoch %s", self.holder, epoch)
            self._call(self.on_elected)
        elif was and not now:
            log.warning("this hub (%s) is no longer the leader", self.holder)
            self._call(self.on_deposed)

    def _call(self, callbacks: list[Callable[[], Any]]) -> None:
        for cb in callbacks:
            try:
                cb()
            except Exception:
                log.exception("leadership callback %r failed", cb)

    def status(self) -> dict[str, Any]:
        cur = None
        try:
            cur = self.lease.current()
        except StoreError:
            pass
        return {"leader": self.is_leader(), "holder": self.holder, "epoch": self.epoch,
                "lease": cur}
