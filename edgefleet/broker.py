"""Start a local MQTT 5 broker: mosquitto when installed, else the embedded iotcore (rumqttd).

Used by ``edgefleet hub serve`` and ``edgefleet demo`` when no ``--mqtt`` URL is
given, and by the test fixtures. Why these two: docs/broker.md.

The broker never outlives the process that started it: on Linux it is tied to it with
``PR_SET_PDEATHSIG`` (SIGKILL when the parent dies, even by SIGKILL), and :meth:`LocalBroker.supervise`
restarts it on the same port with the same configuration if it dies on its own.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import errno
import logging
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


class BrokerPortInUse(RuntimeError):
    """The broker's port is held by another process."""


def port_free(host: str, port: int) -> bool:
    """Could a listener bind ``host:port`` now? (SO_REUSEADDR, as brokers bind: TIME_WAIT does not count.)"""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True


PR_SET_PDEATHSIG = 1


def _tie_to_parent() -> Callable[[], None]:
    """A ``preexec_fn``: lift the fd limit and have the kernel SIGKILL the child when its parent dies.

    ``PR_SET_PDEATHSIG`` fires when the *thread* that forked the child ends, so children are
    forked from one long-lived thread (:func:`spawn`). Linux only; elsewhere just the fd limit.
    """
    parent = os.getpid()
    prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None

    def setup() -> None:
        raise_fd_limit()
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != parent:  # the parent died before prctl took effect: nobody would signal us
                os._exit(1)

    return setup


_spawn_jobs: queue.Queue[tuple[concurrent.futures.Future[Any], list[str], dict[str, Any]]] = queue.Queue()
_spawn_thread: threading.Thread | None = None
_spawn_lock = threading.Lock()


def _spawn_loop() -> None:
    while True:
        future, cmd, kwargs = _spawn_jobs.get()
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(subprocess.Popen(cmd, preexec_fn=_tie_to_parent(), **kwargs))
            except BaseException as exc:
                future.set_exception(exc)


def spawn(cmd: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """``subprocess.Popen`` from this process's spawner thread, the child tied to this process's life."""
    global _spawn_thread
    with _spawn_lock:
        if _spawn_thread is None or not _spawn_thread.is_alive():
            _spawn_thread = threading.Thread(target=_spawn_loop, name="edgefleet-spawner", daemon=True)
            _spawn_thread.start()
    future: concurrent.futures.Future[subprocess.Popen[bytes]] = concurrent.futures.Future()
    _spawn_jobs.put((future, cmd, kwargs))
    return future.result()


class LocalBroker:
    """A broker child process on ``host:port``; ``kind`` is "mosquitto" or "iotcore"."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, kind: str | None = None,
                 password_file: Path | None = None, acl_file: Path | None = None,
                 tls: tuple[Path, Path] | None = None, pid_file: Path | None = None,
                 device_listener: tuple[str, int, tuple[Path, Path] | None] | None = None) -> None:
        """``tls``: (certificate chain, private key) PEM files; the listener then speaks mqtts (mosquitto only).

        ``pid_file``: where the live broker's pid is written at every (re)start (the hub reads it to
        send reload signals to the process that is running now).
        ``device_listener``: (bind address, port, tls files or None) of a second listener for devices beyond
        loopback (``hub serve --host 0.0.0.0``); the first stays for the hub itself.
        """
        self.host = host
        self.tls = tls
        self.device_listener = device_listener
        self.port = port or free_port(host)
        self.kind = kind or os.environ.get("EDGEFLEET_BROKER") or ("mosquitto" if find_mosquitto() else "iotcore")
        self.password_file, self.acl_file = password_file, acl_file
        self.pid_file = pid_file
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0  # how often supervise() brought it back
        self._dir = Path(tempfile.mkdtemp(prefix="edgefleet-broker-"))
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # a restart and stop() never interleave
        self._watcher: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0, port_wait: float = 0.0) -> LocalBroker:
        """Start and wait until it listens. A port held by another process is waited for up to
        ``port_wait`` seconds (the broker of a hub killed a moment ago is still going away), then refused."""
        self._stopping.clear()
        self._launch(timeout, port_wait)
        return self

    def _command(self) -> list[str]:
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
            return [binary, "-c", str(conf)]
        if self.kind == "iotcore":
            if self.tls or self.device_listener:
                raise RuntimeError("a TLS or a second (device) listener needs mosquitto (apt-get install -y mosquitto)")
            conf = self._dir / "rumqttd.toml"
            conf.write_text(RUMQTTD_CONF.format(host=self.host, port=self.port))
            return [sys.executable, "-m", "iotcore", "--config", str(conf), "--log-level", "WARNING"]
        raise RuntimeError(f"unknown broker kind {self.kind!r}: mosquitto or iotcore")

    def _launch(self, timeout: float, port_wait: float = 0.0) -> None:
        deadline = time.monotonic() + port_wait
        while not port_free(self.host, self.port):  # else the wait below would meet the other listener
            if time.monotonic() >= deadline:
                raise BrokerPortInUse(f"the broker's port {self.host}:{self.port} is in use by another process")
            time.sleep(0.1)
        with self._lock:
            if self._stopping.is_set():
                return
            # its own session: a Ctrl-C in the terminal reaches the hub, which stops the broker in order
            with open(self._dir / "broker.log", "ab") as log_file:
                proc = spawn(self._command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log_file,
                             start_new_session=True)
            self.proc = proc
            if self.pid_file is not None:
                tmp = self.pid_file.with_name(self.pid_file.name + ".tmp")
                tmp.write_text(f"{proc.pid}\n")
                os.replace(tmp, self.pid_file)
        try:
            wait_for_port(self.host, self.port, timeout, proc)
            if self.device_listener is not None:
                bind, port, _ = self.device_listener
                wait_for_port("127.0.0.1" if bind in ("0.0.0.0", "::") else bind, port, timeout, proc)
        except RuntimeError:
            self._terminate(proc)
            raise RuntimeError(f"{self.kind} failed to start: {self.log_tail()}") from None
        log.info("started %s broker at %s (pid %s)", self.kind, self.url, proc.pid)

    def supervise(self, max_backoff: float = 30.0) -> LocalBroker:
        """Restart the broker (same port, same configuration) whenever it exits, until :meth:`stop`."""
        if self._watcher is None or not self._watcher.is_alive():
            self._watcher = threading.Thread(target=self._watch, args=(max_backoff,), name="broker-supervisor",
                                             daemon=True)
            self._watcher.start()
        return self

    def _watch(self, max_backoff: float) -> None:
        backoff, started = 0.5, time.monotonic()
        while not self._stopping.is_set():
            proc = self.proc
            if proc is not None and proc.poll() is None:
                code = proc.wait()
                if self._stopping.is_set():
                    return
                log.error("the %s broker at %s exited (code %s); restarting it. Its log: %s", self.kind, self.url,
                          code, self.log_tail(300).strip())
                if time.monotonic() - started > 60:  # it had been up a while: not a crash loop
                    backoff = 0.5
            if self._stopping.wait(backoff):
                return
            backoff = min(backoff * 2, max_backoff)
            try:
                self._launch(15.0)
                self.restarts += 1
                started = time.monotonic()
            except RuntimeError as exc:
                log.error("restarting the broker failed (next try in %.0fs): %s", backoff, exc)

    def reload(self) -> None:
        """Re-read password and ACL files (mosquitto: SIGHUP)."""
        if self.proc is not None and self.kind == "mosquitto":
            self.proc.send_signal(signal.SIGHUP)

    def log_tail(self, n: int = 2000) -> str:
        path = self._dir / "broker.log"
        return path.read_text(errors="replace")[-n:] if path.exists() else ""

    def stop(self) -> None:
        with self._lock:
            self._stopping.set()
            proc, self.proc = self.proc, None
        if proc is not None:
            self._terminate(proc)
            log.info("stopped %s broker at %s", self.kind, self.url)
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(20)

    @staticmethod
    def _terminate(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

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
