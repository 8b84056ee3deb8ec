"""``edgefleet hub serve`` run the documented way (its own broker, no ``--mqtt``) as a child process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from edgefleet.broker import free_port
from hub.testing import wait_until
from tests.pg import hub_env

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "service-admin-token-0123456789abcdef"


class ServedHub:
    """``edgefleet hub serve --data DATA --port PORT [args]``; ``start()`` again after a kill is the documented restart."""

    def __init__(self, data: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.data, self.args = data, list(args)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "EDGEFLEET_ADMIN_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1", **hub_env(data),
                    **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data.parent / f"{data.name}-hub.log"

    def start(self, timeout: float = 90) -> ServedHub:
        self.launch()
        try:
            wait_until(self._ready, timeout, 0.1, "hub serve answering /healthz, connected to its broker")
        except BaseException:
            self.close()  # never leave a hub (and its broker) behind a failed test
            raise
        return self

    def launch(self) -> subprocess.Popen[bytes]:
        """Start the process without waiting for it."""
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "edgefleet", "hub", "serve", "--data", str(self.data),
                                      "--port", str(self.port), *self.args], cwd=ROOT, env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT)
        log.close()
        return self.proc

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"hub serve exited ({self.proc.returncode}): {self.log()[-3000:]}")
        try:
            return bool(httpx.get(self.url + "/healthz", timeout=1).json().get("mqtt_connected"))
        except httpx.HTTPError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)

    @property
    def broker_port(self) -> int:
        return int(json.loads((self.data / "broker" / "address.json").read_text())["port"])

    @property
    def broker_pid(self) -> int:
        return int((self.data / "broker" / "broker.pid").read_text())

    def descendants(self) -> list[psutil.Process]:
        assert self.proc is not None
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def signal(self, sig: int, timeout: float = 60) -> int:
        """Send ``sig`` and wait for the hub process to end; its exit code."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            children = self.descendants()
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            for p in psutil.wait_procs(children, timeout=10)[1]:
                p.kill()


def running(p: psutil.Process) -> bool:
    """Still running: a zombie (ended, not yet reaped by whoever inherited it) counts as gone."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def alive(procs: list[psutil.Process], timeout: float) -> list[str]:
    """The command lines of those of ``procs`` still running after waiting up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while (left := [p for p in procs if running(p)]) and time.monotonic() < deadline:
        psutil.wait_procs(left, timeout=0.2)
    return [" ".join(p.cmdline()) for p in procs if running(p)]
