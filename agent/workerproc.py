"""A module worker process: one child running ``agent/worker.py``, and the agent's end of its socket.

The agent and a worker talk over a socketpair (the worker's stdin and stdout) with ``agent.worker``'s
frames, one request at a time, each with its own deadline: a request that hangs past it kills the worker
(a hung health check or predict cannot wedge the agent). ``agent.supervisor`` restarts workers and
declares crash loops; this file knows one process.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import os
import shutil
import socket
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modules.errors import ModelError, from_kind
from modules.framebuf import FrameReader
from modules.httpwire import enlarge
from modules.sandbox import Launch, Sandbox, SandboxUnavailable, bwrap_version, probe, scrubbed_env
from modules.workerwire import pack_parts
from protocol.manifest import Manifest, TensorSpec
from protocol.schema import validate

if TYPE_CHECKING:
    from modules.runners import Batch

log = logging.getLogger("edgefleet.agent.supervisor")

_SRC = str(Path(__file__).resolve().parents[1])  # so the worker imports this very code
# Run by path, not ``-m agent.worker``: that would import the agent package (MQTT, SQLite, ...) into every worker.
_WORKER = str(Path(__file__).resolve().with_name("worker.py"))


class WorkerCrashed(ModelError):
    """The worker process died or was killed mid-request."""


Frame = tuple[dict[str, Any], "Batch", bytes]
Done = Callable[[Frame | None, BaseException | None], None]
OnPush = Callable[[dict[str, Any], bytes], None]  # a worker's unasked frame (``{"push": "stats"}``): header, blob


def answer_error(answer: dict[str, Any]) -> Exception | None:
    """The request's failure a worker reported (it lives on), as the agent raises it; None if it succeeded."""
    if answer.get("ok"):
        return None
    return from_kind(str(answer.get("kind")), str(answer.get("error", "worker error")))


class _Channel(asyncio.BufferedProtocol):
    """The agent's end of a worker's socket: requests go one at a time, each answer calls its request's ``done``.

    Plain callbacks, not a lock and a future per request: an answer is handed on inside the
    callback that read it, so the local API can reply without a task switch (``WorkerProcess.call``).
    """

    def __init__(self, on_timeout: Callable[[], None], on_push: OnPush | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.on_timeout, self.on_push = on_timeout, on_push
        self._queue: deque[tuple[list[Any], Done, float | None, tuple[int, ...]]] = deque()
        self.sock: socket.socket | None = None  # the transport's socket: a frame passing descriptors goes on it
        self._inflight: tuple[Done, asyncio.TimerHandle | None] | None = None
        self._frames = FrameReader()  # a large answer lands in place

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def call(self, frame: list[Any], done: Done, timeout: float | None, fds: tuple[int, ...] = ()) -> None:
        if self.transport is None:
            done(None, ConnectionResetError("the worker's socket is closed"))
            return
        self._queue.append((frame, done, timeout, fds))
        if self._inflight is None:
            self._next()

    def _next(self) -> None:
        if self._inflight is not None or not self._queue or self.transport is None:
            return
        frame, done, timeout, fds = self._queue.popleft()
        # the deadline runs from the moment the worker has the request, not while it waits its turn
        timer = asyncio.get_running_loop().call_later(timeout, self._timed_out) if timeout is not None else None
        self._inflight = (done, timer)
        if fds:  # a small frame with descriptors (SCM_RIGHTS); nothing else is being written: answers come in turn
            try:
                assert self.sock is not None and not self.transport.get_write_buffer_size()
                self.sock.sendmsg([b"".join(frame)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
            except (OSError, AssertionError) as exc:
                self._finish(None, exc)
                self.transport.abort()
            return
        for part in frame:  # each part sent as it is (a camera frame is not joined to its header first)
            self.transport.write(part)

    def _finish(self, frame: Frame | None, exc: BaseException | None) -> None:
        if self._inflight is None:
            return  # an answer nobody asked for: dropped
        done, timer = self._inflight
        self._inflight = None
        if timer is not None:
            timer.cancel()
        try:
            done(frame, exc)
        except Exception:  # the caller's bug must not look like a broken worker
            log.exception("handling a worker's answer failed")

    def _timed_out(self) -> None:
        self._finish(None, TimeoutError())
        self.on_timeout()  # kills the worker: the queued requests fail with it

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._frames.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self._frames.buffer_updated(nbytes)
        try:
            while (frame := self._frames.take()) is not None:
                if frame[0].get("push"):
                    self._pushed(frame)
                    continue
                self._finish(frame, None)
                self._next()
        except (ValueError, KeyError) as exc:  # not our framing: the request fails, the worker is killed
            self._finish(None, exc)
            if self.transport is not None:
                self.transport.abort()

    def _pushed(self, frame: Frame) -> None:
        if self.on_push is None:
            return  # a worker nobody listens to yet (a health check's): it has nothing to report
        try:
            self.on_push(frame[0], frame[2])
        except Exception:  # a report the agent cannot take must not look like a broken worker
            log.exception("handling a worker's %s report failed", frame[0].get("push"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        lost = ConnectionResetError("the worker closed its socket")
        self._finish(None, lost)
        while self._queue:
            self._queue.popleft()[1](None, lost)


@dataclass(frozen=True)
class WorkerSandbox:
    """Where module workers run: bubblewrap seeing only the code, the module's files (read-only) and ``run_dir``
    (its direct socket); never the data directory's credentials, state or chunks."""

    sandbox: Sandbox
    run_dir: Path

    def launch(self, argv: list[str], files: Path) -> Launch:
        return self.sandbox.launch(argv, read_only=[files], writable=[self.run_dir])


def worker_sandbox(setting: str, data_dir: Path) -> WorkerSandbox | None:
    """``on``: bubblewrap or refuse (SandboxUnavailable); ``auto``: bubblewrap where it works, else none (warned);
    ``off``: none. The worker keeps the agent's uid (as root: without capabilities); the environment is scrubbed."""
    if setting == "off":
        return None
    hide = tuple(sorted({os.path.realpath(data_dir), os.path.abspath(data_dir)}))
    why = "bubblewrap (bwrap) is not installed"
    if shutil.which("bwrap") and shutil.which("prlimit"):
        box = Sandbox("bwrap", hide=hide, new_bwrap=bwrap_version() >= (0, 8))
        why = probe(box)
        if not why:
            return WorkerSandbox(box, Path(os.path.abspath(data_dir)) / "run")
    if setting == "on":
        raise SandboxUnavailable(f"module workers cannot be sandboxed: {why}")
    log.warning("module workers run without a sandbox (%s): a module can read the device's credentials", why)
    return None


def _leaf(pid: int) -> int:
    """The process a sandbox wraps (bwrap's grandchild), for its CPU and memory figures."""
    for _ in range(4):
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return pid
        if not children:
            return pid
        pid = int(children[-1])
    return pid


class WorkerProcess:
    """One child running ``agent.worker`` on a socketpair; one request at a time, in order."""

    def __init__(self, name: str, files: Path, manifest: Manifest, limits: dict[str, Any] | None = None,
                 sandbox: WorkerSandbox | None = None, options: dict[str, Any] | None = None) -> None:
        self.name, self.files, self.manifest = name, files, manifest
        self.limits = limits or {}
        self.sandbox = sandbox
        self._leaf: int | None = None
        self.options = options or {}  # config (the module's), facts (the device's): what load_runner is given
        self.accelerator = ""  # what the loaded model runs on (modules/accel.py), as the worker reported it
        self.proc: asyncio.subprocess.Process | None = None
        self.inputs: list[TensorSpec] = []
        self.outputs: list[TensorSpec] = []
        self._channel = _Channel(self._kill_now)
        self.direct_path: Path | None = None  # the socket file this worker listens on, and its inode
        self.direct_ino: int | None = None
        self.regions: set[tuple[str, str, int]] = set()  # shared memory regions passed to it (agent.shmem)

    @property
    def on_push(self) -> OnPush | None:
        return self._channel.on_push

    @on_push.setter
    def on_push(self, handler: OnPush | None) -> None:
        self._channel.on_push = handler

    @property
    def pid(self) -> int | None:
        """The worker's own process (inside a sandbox, not bwrap's)."""
        if self.proc is None:
            return None
        if self.sandbox is None:
            return self.proc.pid
        if self._leaf is None or self._leaf == self.proc.pid:
            self._leaf = _leaf(self.proc.pid)
        return self._leaf

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self, timeout: float) -> None:
        # An allow-listed environment: nothing the agent was started with (a password, a token) reaches module code.
        env = scrubbed_env({"PYTHONPATH": os.pathsep.join(filter(None, [_SRC, os.environ.get("PYTHONPATH")]))})
        argv = [sys.executable, _WORKER]
        if self.sandbox is not None:
            launch = self.sandbox.launch(argv, self.files)
            argv, env = launch.argv, launch.env or env
        # A socketpair, not two pipes: one transport with a Protocol whose callbacks hand each answer
        # on (no stream reader, no task per request). It is the worker's stdin and stdout.
        parent, child = socket.socketpair()
        enlarge(parent)
        enlarge(child)
        try:
            self.proc = await asyncio.create_subprocess_exec(*argv, stdin=child, stdout=child, env=env)
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        self._channel.sock = parent
        await asyncio.get_running_loop().connect_accepted_socket(lambda: self._channel, parent)
        header, _, _ = await self.request({"op": "load", "files": str(self.files), "manifest": self.manifest.to_dict(),
                                        "limits": self.limits, **self.options}, timeout=timeout)
        self.accelerator = str(header.get("accelerator", ""))
        self.inputs = [validate(TensorSpec, s) for s in header["inputs"]]
        self.outputs = [validate(TensorSpec, s) for s in header["outputs"]]

    def call(self, header: dict[str, Any], done: Callable[[Frame | None, Exception | None], None],
             arrays: Batch | None = None, blob: bytes = b"", timeout: float | None = None, fds: tuple[int, ...] = ()) -> None:
        """Send one request; ``done(answer, None)`` or ``done(None, error)`` from the callback that reads the answer.

        The error is the request's (BodyError, InputError, ModelError as the worker reported it), a
        TimeoutError (the worker is killed), or WorkerCrashed. Callers must not raise from ``done``.
        """
        if not self.alive:
            done(None, WorkerCrashed(f"module {self.name} worker is not running"))
            return

        def answered(frame: Frame | None, exc: BaseException | None) -> None:
            if frame is not None:
                error = answer_error(frame[0])
                done(None, error) if error is not None else done(frame, None)
            elif isinstance(exc, TimeoutError):
                done(None, exc)
            else:
                self._kill_now()
                done(None, WorkerCrashed(f"module {self.name} worker died ({self._exit_text()}): {exc!r}"))

        self._channel.call(pack_parts(header, arrays, blob), answered, timeout, fds)

    async def request(self, header: dict[str, Any], arrays: Batch | None = None, blob: bytes = b"",
                      timeout: float | None = None) -> Frame:
        """:meth:`call` awaited: the answer's header, arrays and blob, or its error raised."""
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()

        def done(frame: Frame | None, exc: Exception | None) -> None:
            if not future.done():  # the awaiting task may have been cancelled
                future.set_exception(exc) if exc is not None else future.set_result(frame)  # type: ignore[arg-type]

        self.call(header, done, arrays, blob, timeout)
        try:
            return await future
        except (TimeoutError, WorkerCrashed):
            await self.kill()  # reaped before the caller goes on (e.g. to start a fresh worker)
            raise

    def _kill_now(self) -> None:
        if self._channel.transport is not None:
            self._channel.transport.abort()
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()

    def _exit_text(self) -> str:
        rc = self.proc.returncode if self.proc is not None else None
        return "still running" if rc is None else f"signal {-rc}" if rc < 0 else f"exit code {rc}"

    async def kill(self) -> None:
        self._kill_now()
        if self.proc is not None:
            await self.proc.wait()

    async def listen(self, path: Path, name: str, version: int, ppm: int, push_every: float, timeout: float) -> None:
        """Have the worker serve ``path`` (bound aside, then renamed over the old file: atomic for clients)."""
        header, _, _ = await self.request({"op": "listen", "path": str(path), "name": name, "version": version,
                                           "ppm": ppm, "push_every": push_every}, timeout=timeout)
        self.direct_path, self.direct_ino = path, int(header["ino"])

    async def stop(self, grace: float = 2.0) -> None:
        """Drain the direct socket (its last stats come first), close ours (the worker exits on EOF); kill if it does not."""
        if self.direct_ino is not None and self.alive:
            with contextlib.suppress(Exception):  # a worker that cannot drain is killed below
                await self.request({"op": "drain"}, timeout=grace)
        if self._channel.transport is not None:
            self._channel.transport.close()
        try:
            if self.proc is not None and self.proc.returncode is None:
                await asyncio.wait_for(self.proc.wait(), grace)
        except TimeoutError:
            await self.kill()
        finally:
            self.unlink_direct()

    def unlink_direct(self) -> None:
        """Remove the socket file if it is still this worker's (one that died cannot do it itself)."""
        if self.direct_path is not None:
            with contextlib.suppress(OSError):
                if os.stat(self.direct_path).st_ino == self.direct_ino:
                    os.unlink(self.direct_path)


async def health_check_in_worker(name: str, files: Path, manifest: Manifest, timeout: float,
                                 limits: dict[str, Any] | None = None,
                                 sandbox: WorkerSandbox | None = None,
                                 options: dict[str, Any] | None = None) -> WorkerProcess:
    """Load and health-check in a fresh worker; on success the warm worker is returned for serving.

    The whole check (load + sample inference) must finish within ``timeout``; a hung one is killed.
    """
    worker = WorkerProcess(name, files, manifest, limits, sandbox, options)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        await worker.start(timeout)
        await worker.request({"op": "health"}, timeout=max(0.1, deadline - loop.time()))
    except BaseException:
        await worker.kill()
        raise
    return worker


def clear_run_dir(run: Path) -> None:
    """Sockets a killed agent's workers left behind: nobody answers on them; the workers started now bind afresh."""
    run.mkdir(mode=0o750, exist_ok=True)
    for stale in run.glob("*.sock"):
        stale.unlink(missing_ok=True)
