"""The hub as a user runs it: ``edgefleet hub serve`` in a child process, with RealHub's enrol and deploy helpers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import httpx

from hub.testing import wait_until
from tests.hubside import RealHub, clear_hub_retained
from tests.pg import hub_env

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ProcessHub(RealHub):
    """``edgefleet hub serve --data DATA --mqtt BROKER`` as a child process; its log goes to ``workdir/hub.log``."""

    def __init__(self, broker_url: str, workdir: Path, data: Path) -> None:  # noqa: D107 (RealHub's helpers, own start)
        from edgefleet.client import HubClient

        self.workdir, self.broker_url = workdir, broker_url
        self.token = self.admin_token = f"test-admin-{uuid.uuid4().hex}"
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = (workdir / "hub.log").open("w")
        env = {**os.environ, "EDGEFLEET_ADMIN_TOKEN": self.token, **hub_env(data)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgefleet", "hub", "serve", "--data", str(data), "--mqtt", broker_url,
             "--port", self.url.rsplit(":", 1)[1]], cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_until(self._ready, 60, 0.1, "the hub process to answer /healthz connected to the broker")
        except BaseException:
            self.close()
            raise
        self.api = HubClient(self.url, self.token)
        self._models = 0

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the hub process exited ({self.proc.returncode}): {(self.workdir / 'hub.log').read_text()}")
        try:
            return bool(httpx.get(self.url + "/healthz", timeout=1).json().get("mqtt_connected"))
        except httpx.HTTPError:
            return False

    def close(self) -> None:
        if getattr(self, "api", None) is not None:
            self.api.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
        clear_hub_retained(self.broker_url)
