"""A real PostgreSQL server for tests and benchmarks: ``initdb`` + ``pg_ctl`` on a free loopback port.

The server runs as the ``postgres`` user when the caller is root (PostgreSQL refuses to run as
root), with its data in a temporary directory, ``fsync`` off (a test server need not survive a
power cut) and the C locale (byte order, as SQLite sorts). One server per test session
(:func:`cluster`); every hub gets a database of its own, copied from a template that already has the
schema (:meth:`PgCluster.new_database`). ``EDGEFLEET_TEST_DB=postgres`` makes the shared hub fixtures
use it (:func:`hub_db`).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any

from edgefleet.broker import free_port

INSTALL_HINT = "PostgreSQL is not installed: run `apt-get install -y postgresql` (the README's test command does)"
TEMPLATE = "edgefleet_template"


def test_db_kind() -> str:
    """``sqlite`` (default) or ``postgres``: which store the shared hub fixtures run hubs on."""
    kind = os.environ.get("EDGEFLEET_TEST_DB", "sqlite").strip().lower() or "sqlite"
    if kind in ("pg", "postgresql"):
        kind = "postgres"
    if kind not in ("sqlite", "postgres"):
        raise ValueError(f"EDGEFLEET_TEST_DB={kind!r}: one of sqlite, postgres")
    return kind


def find_bindir() -> Path:
    """The directory of ``initdb``/``pg_ctl``; fails with what to install when there is none."""
    candidates: list[str] = []
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        candidates.append(out.stdout.strip())
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    if shutil.which("pg_ctl"):
        candidates.append(str(Path(shutil.which("pg_ctl")).resolve().parent))  # type: ignore[arg-type]
    for c in candidates:
        if c and (Path(c) / "initdb").is_file() and (Path(c) / "pg_ctl").is_file():
            return Path(c)
    raise RuntimeError(INSTALL_HINT)


class PgCluster:
    """One PostgreSQL server; ``url(db)`` to reach a database, ``new_database()`` for a fresh one with the schema."""

    def __init__(self, root: Path | None = None) -> None:
        self.bindir = find_bindir()
        self._own_root = root is None
        self.root = Path(root or tempfile.mkdtemp(prefix="edgefleet-pg-"))
        self.data = self.root / "data"
        self.port = 0
        self.as_postgres = os.geteuid() == 0
        self.user = "postgres"
        self._lock = threading.Lock()
        self._template_ready = False

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, check=check)

    def start(self) -> PgCluster:
        if self.as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
        else:
            self.user = os.environ.get("USER") or "postgres"
        self._run("initdb", "-D", str(self.data), "--no-locale", "-E", "UTF8", "-A", "trust", "-U", self.user)
        for attempt in range(5):
            self.port = free_port()
            opts = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off"
                    " -c synchronous_commit=off -c full_page_writes=off -c max_connections=500"
                    " -c shared_buffers=64MB")
            res = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-o", opts,
                            "-w", "-t", "60", "start", check=False)
            if res.returncode == 0:
                return self
            log = (self.root / "server.log").read_text(errors="replace") if (self.root / "server.log").exists() else ""
            if "could not bind" not in log or attempt == 4:
                raise RuntimeError(f"PostgreSQL did not start: {res.stderr.strip()}\n{log[-2000:]}")
        return self

    def stop(self) -> None:
        if self.data.exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{db}"

    def admin(self, sql: str) -> None:
        """Run one statement outside a transaction (CREATE/DROP DATABASE) as the superuser."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql)  # type: ignore[arg-type]

    def new_database(self, prefix: str = "hub") -> str:
        """A fresh, empty hub database (the schema already applied); returns its URL."""
        with self._lock:
            if not self._template_ready:
                from hub.store import open_database

                self.admin(f"CREATE DATABASE {TEMPLATE}")
                open_database(self.url(TEMPLATE)).close()  # migrate once; every copy starts at the latest schema
                self._template_ready = True
            name = f"{prefix}_{uuid.uuid4().hex[:12]}"
            self.admin(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
        return self.url(name)


_cluster: PgCluster | None = None
_cluster_lock = threading.Lock()


def cluster() -> PgCluster:
    """The session's server, started on first use (stopped by :func:`stop_cluster`, which conftest calls)."""
    global _cluster
    with _cluster_lock:
        if _cluster is None:
            _cluster = PgCluster().start()
        return _cluster


def stop_cluster() -> None:
    global _cluster
    with _cluster_lock:
        if _cluster is not None:
            _cluster.stop()
            _cluster = None


def hub_db(data_dir: Path | None = None) -> dict[str, str]:
    """``HubConfig`` settings for a hub under test: ``{"db_url": …}`` on PostgreSQL, nothing on SQLite.

    A data directory keeps its database: a hub restarted on the same ``data_dir`` finds its state again.
    """
    if test_db_kind() != "postgres":
        return {}
    if data_dir is not None:
        marker = Path(data_dir) / ".test-db-url"
        if marker.exists():
            return {"db_url": marker.read_text().strip()}
        url = cluster().new_database()
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        marker.write_text(url)
        return {"db_url": url}
    return {"db_url": cluster().new_database()}


def hub_env(data_dir: Path) -> dict[str, str]:
    """Environment for an ``edgefleet hub serve --data DATA`` child process: ``EDGEFLEET_DB`` (its ``--db``) on
    PostgreSQL, nothing on SQLite; the same database for the same ``data_dir``, as :func:`hub_db`."""
    db = hub_db(data_dir)
    return {"EDGEFLEET_DB": db["db_url"]} if db else {}


def hub_store(data_dir: Path) -> Any:
    """The hub's database for a test that uses the store without a hub: ``data_dir/hub.db``, or on PostgreSQL a
    fresh database (the same one again for the same ``data_dir``)."""
    from hub.store import open_database

    return open_database(hub_db(data_dir).get("db_url") or Path(data_dir) / "hub.db")
