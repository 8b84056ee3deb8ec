"""Hub replicas as real processes (``edgefleet hub serve --db postgresql://…``) for the cluster tests and benchmarks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from edgefleet.broker import free_port
from hub.testing import wait_until

ROOT = Path(__file__).resolve().parents[1]


class HubProcess:
    """One replica: its own process, port and MQTT client id; the database, keys and blobs shared (``data``).

    An empty ``db_url`` runs the hub on SQLite in ``data`` (a baseline for the benchmarks).
    """

    def __init__(self, name: str, data: Path, db_url: str, mqtt_url: str, token: str, lease_s: float = 2.0,
                 adopt_s: float = 4.0, log_dir: Path | None = None, extra: tuple[str, ...] = ()) -> None:
        self.name, self.data, self.db_url, self.mqtt_url, self.token = name, data, db_url, mqtt_url, token
        self.lease_s, self.adopt_s, self.extra = lease_s, adopt_s, extra
        self.log_path = (log_dir or data.parent) / f"hub-{name}.log"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> HubProcess:
        env = {**os.environ, "EDGEFLEET_ADMIN_TOKEN": self.token, "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "edgefleet", "hub", "serve", "--data", str(self.data),
               *(["--db", self.db_url] if self.db_url else []),
               "--mqtt", self.mqtt_url, "--port", str(self.port), "--leader-lease", str(self.lease_s),
               "--ingest-adopt-after", str(self.adopt_s), "--mqtt-client-id", f"hub-{self.name}", *self.extra]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        return self

    def health(self) -> dict[str, Any] | None:
        try:
            r = httpx.get(self.url + "/healthz", timeout=2)
            return r.json() if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    def wait_ready(self, timeout: float = 60.0) -> HubProcess:
        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"hub {self.name} exited ({self.proc.returncode}): {self.log_tail()}")
            h = self.health()
            return bool(h and h["mqtt_connected"])
        wait_until(ready, timeout, 0.1, f"hub {self.name} ready")
        return self

    def is_leader(self) -> bool:
        h = self.health()
        return bool(h and h["leader"])

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=60)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """kill -9: no clean stop, the lease and the MQTT session left as they were."""
        self.signal(signal.SIGKILL)
        assert self.proc is not None
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGCONT)  # a stopped process cannot handle SIGTERM
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""


def leader_of(hubs: list[HubProcess], timeout: float = 30.0) -> HubProcess:
    """The one replica that says it leads (waits for an election)."""
    def one() -> HubProcess | None:
        leaders = [h for h in hubs if h.proc is not None and h.proc.poll() is None and h.is_leader()]
        return leaders[0] if len(leaders) == 1 else None
    return wait_until(one, timeout, 0.05, "one leader")


def stop_all(hubs: list[HubProcess]) -> None:
    for h in hubs:
        h.stop()


def since(t0: float) -> float:
    return time.monotonic() - t0
