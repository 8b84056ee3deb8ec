"""A real S3-compatible server for tests: moto's ``moto_server`` (PyPI ``moto[server]``) as a child process on a free
loopback port; boto3 reaches it through ``AWS_ENDPOINT_URL`` like any S3-compatible endpoint."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx

from edgefleet.broker import free_port
from hub.testing import wait_until

ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test-secret", "AWS_DEFAULT_REGION": "us-east-1"}


class S3Server:
    """``moto_server`` on 127.0.0.1; ``env`` is what a client (boto3, a hub process) needs to reach it."""

    def __init__(self, log: Path) -> None:
        exe = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
        if not Path(exe).exists():
            raise RuntimeError("moto_server is not installed: `pip install 'moto[server]'` (edgefleet[test] has it)")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**ENV, "AWS_ENDPOINT_URL": self.url}
        self._log = log.open("wb")
        self.proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(self.port)], stdout=self._log,
                                     stderr=subprocess.STDOUT, env={**os.environ, **self.env})
        wait_until(self._up, 30, 0.1, "moto_server answering")

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"moto_server exited ({self.proc.returncode})")
        try:
            return httpx.get(self.url + "/", timeout=1).status_code < 500
        except httpx.HTTPError:
            return False

    def client(self):  # noqa: ANN201 (boto3's client type is generated)
        import boto3

        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id=ENV["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=ENV["AWS_SECRET_ACCESS_KEY"], region_name=ENV["AWS_DEFAULT_REGION"])

    def bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self._log.close()
