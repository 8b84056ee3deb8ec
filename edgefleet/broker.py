"""Start a local MQTT 5 broker: mosquitto when installed, else the embedded iotcore (rumqttd).

Used by ``edgefleet hub serve`` and ``edgefleet demo`` when no ``--mqtt`` URL is
given, and by the test fixtures. Why these two: docs/broker.md.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("edgefleet.broker")

MOSQUITTO_CONF = """\
listener {port} {host}
{tls_lines}
max_connections -1
{listener_lines}
allow_anonymous {anonymous}
{password_line}
persistence false
max_queued_messages 100000
max_inflight_messages 100
message_size_limit 2097152
max_keepalive 600
log_dest stderr
log_type error
log_type warning
{user_line}
{device_listener}
"""

RUMQTTD_CONF = """\
id = 0
[router]
id = 0
max_connections = 20010
max_outgoing_packet_count = 1000
max_segment_size = 104857600
max_segment_count = 10

[v5.1]
name = "v5-1"
listen = "{host}:{port}"
next_connection_delay_ms = 0
    [v5.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = 2097152
    max_inflight_count = 500
"""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"broker exited with code {proc.returncode} before listening on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"broker did not listen on {host}:{port} within {timeout}s")


class LocalBroker:
    """A broker child process on ``host:port``; ``kind`` is "mosquitto" or "iotcore"."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, kind: str | None = None,
                 password_file: Path | None = None, acl_file: Path | None = None,
                 tls: tuple[Path, Path] | None = None,
                 device_listener: tuple[str, int, tuple[Path, Path] | None] | None = None) -> None:
        """``tls``: (certificate chain, private key) PEM files; the listener then speaks mqtts (mosquitto only).
        ``device_listener``: (bind address, port, tls files or None) of a second listener for devices beyond
        loopback (``hub serve --host 0.0.0.0``); the first stays for the hub itself."""
        self.host = host
        self.tls = tls
        self.device_listener = device_listener
        self.port = port or free_port(host)
        self.kind = kind or os.environ.get("EDGEFLEET_BROKER") or ("mosquitto" if find_mosquitto() else "iotcore")
        self.password_file, self.acl_file = password_file, acl_file
        self.proc: subprocess.Popen[bytes] | None = None
        self._dir = Path(tempfile.mkdtemp(prefix="edgefleet-broker-"))

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> LocalBroker:
        if self.kind == "mosquitto":
            binary = find_mosquitto()
            if binary is None:
                raise RuntimeError("mosquitto is not installed: apt-get install -y mosquitto (or use EDGEFLEET_BROKER=iotcore)")
            lines = [f"password_file {self.password_file}" if self.password_file else ""]
            if self.acl_file:
                lines.append(f"acl_file {self.acl_file}")
            conf = self._dir / "mosquitto.conf"
            # with logins, a client id is its login: nobody can evict the hub or another device by using theirs
            listener_lines = "use_username_as_clientid true" if self.password_file else ""
            device = ""
            if self.device_listener is not None:
                bind, port, tls = self.device_listener
                device = "\n".join([f"listener {port} {bind}", _tls_lines(tls), "max_connections -1", listener_lines])
            conf.write_text(MOSQUITTO_CONF.format(
                port=self.port, host=self.host, anonymous="false" if self.password_file else "true",
                tls_lines=_tls_lines(self.tls), password_line="\n".join(lines), listener_lines=listener_lines,
                # started as root, mosquitto drops to user "mosquitto", which cannot read a private password file
                user_line="user root" if hasattr(os, "geteuid") and os.geteuid() == 0 else "",
                device_listener=device))
            cmd = [binary, "-c", str(conf)]
        elif self.kind == "iotcore":
            if self.tls or self.device_listener:
                raise RuntimeError("a TLS or a second (device) listener needs mosquitto (apt-get install -y mosquitto)")
            conf = self._dir / "rumqttd.toml"
            conf.write_text(RUMQTTD_CONF.format(host=self.host, port=self.port))
            cmd = [sys.executable, "-m", "iotcore", "--config", str(conf), "--log-level", "WARNING"]
        else:
            raise RuntimeError(f"unknown broker kind {self.kind!r}: mosquitto or iotcore")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=open(self._dir / "broker.log", "wb"), start_new_session=True,
                                     preexec_fn=raise_fd_limit)
        try:
            wait_for_port(self.host, self.port, timeout, self.proc)
            if self.device_listener is not None:
                bind, port, _ = self.device_listener
                wait_for_port("127.0.0.1" if bind in ("0.0.0.0", "::") else bind, port, timeout, self.proc)
        except RuntimeError:
            self.stop()
            raise RuntimeError(f"{self.kind} failed to start: {self.log_tail()}") from None
        log.info("started %s broker at %s (pid %s)", self.kind, self.url, self.proc.pid)
        return self

    def reload(self) -> None:
        """Re-read password and ACL files (mosquitto: SIGHUP)."""
        if self.proc is not None and self.kind == "mosquitto":
            self.proc.send_signal(1)

    def log_tail(self, n: int = 2000) -> str:
        path = self._dir / "broker.log"
        return path.read_text(errors="replace")[-n:] if path.exists() else ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        log.info("stopped %s broker at %s", self.kind, self.url)

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _tls_lines(tls: tuple[Path, Path] | None) -> str:
    return f"certfile {tls[0]}\nkeyfile {tls[1]}" if tls else ""


def raise_fd_limit() -> int:
    """Lift this process's open-file limit to the hard limit (a broker or fleet of 10k devices needs > 10k fds)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    except (ImportError, ValueError, OSError):
        return -1


def find_mosquitto() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)), None)
