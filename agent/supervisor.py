"""Supervised module workers: a child process per module, restarted with backoff, rolled back on a crash loop.

    starting -> serving -> (crash) -> backoff -> starting ...
                        \\-> crash_loop (``CRASH_LOOP`` crashes within ``CRASH_WINDOW`` s: stop, report, roll back)
                        \\-> stopped

A request that hangs past its deadline kills the worker (a hung health check or predict
cannot wedge the agent); the next request starts a fresh one. The agent and a worker talk over a
socketpair (the worker's stdin and stdout) with ``agent.worker``'s frames. JSON requests go to the worker
as they came (``predict_json``): the worker parses, checks and runs them, so the agent process
never loads NumPy for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.worker import pack, take_frame
from modules.errors import ModelError, from_kind
from protocol.manifest import Manifest, TensorSpec
from protocol.schema import validate

if TYPE_CHECKING:
    from modules.runners import Batch

log = logging.getLogger("edgefleet.agent.supervisor")

CRASH_LOOP = 3
CRASH_WINDOW = 60.0
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


class _Channel(asyncio.Protocol):
    """The agent's end of a worker's socket: requests go one at a time, each answer calls its request's ``done``.

    Plain callbacks, not a lock and a future per request: an answer is handed on inside the
    callback that read it, so the local API can reply without a task switch (``WorkerProcess.call``).
    """

    def __init__(self, on_timeout: Callable[[], None], on_push: OnPush | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.on_timeout, self.on_push = on_timeout, on_push
        self._queue: deque[tuple[bytes, Done, float | None]] = deque()
        self._inflight: tuple[Done, asyncio.TimerHandle | None] | None = None
        self._buf = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def call(self, frame: bytes, done: Done, timeout: float | None) -> None:
        if self.transport is None:
            done(None, ConnectionResetError("the worker's socket is closed"))
            return
        self._queue.append((frame, done, timeout))
        if self._inflight is None:
            self._next()

    def _next(self) -> None:
        if self._inflight is not None or not self._queue or self.transport is None:
            return
        frame, done, timeout = self._queue.popleft()
        # the deadline runs from the moment the worker has the request, not while it waits its turn
        timer = asyncio.get_running_loop().call_later(timeout, self._timed_out) if timeout is not None else None
        self._inflight = (done, timer)
        self.transport.write(frame)

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

    def data_received(self, data: bytes) -> None:
        self._buf += data
        try:
            while (frame := take_frame(self._buf)) is not None:
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


class WorkerProcess:
    """One child running ``agent.worker`` on a socketpair; one request at a time, in order."""

    def __init__(self, name: str, files: Path, manifest: Manifest, limits: dict[str, Any] | None = None) -> None:
        self.name, self.files, self.manifest = name, files, manifest
        self.limits = limits or {}
        self.proc: asyncio.subprocess.Process | None = None
        self.inputs: list[TensorSpec] = []
        self.outputs: list[TensorSpec] = []
        self._channel = _Channel(self._kill_now)
        self.direct_path: Path | None = None  # the socket file this worker listens on, and its inode
        self.direct_ino: int | None = None

    @property
    def on_push(self) -> OnPush | None:
        return self._channel.on_push

    @on_push.setter
    def on_push(self, handler: OnPush | None) -> None:
        self._channel.on_push = handler

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self, timeout: float) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [_SRC, os.environ.get("PYTHONPATH")]))}
        # A socketpair, not two pipes: one transport with a Protocol whose callbacks hand each answer
        # on (no stream reader, no task per request). It is the worker's stdin and stdout.
        parent, child = socket.socketpair()
        try:
            self.proc = await asyncio.create_subprocess_exec(sys.executable, _WORKER, stdin=child, stdout=child, env=env)
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        await asyncio.get_running_loop().connect_accepted_socket(lambda: self._channel, parent)
        header, _, _ = await self.request({"op": "load", "files": str(self.files), "manifest": self.manifest.to_dict(),
                                        "limits": self.limits}, timeout=timeout)
        self.inputs = [validate(TensorSpec, s) for s in header["inputs"]]
        self.outputs = [validate(TensorSpec, s) for s in header["outputs"]]

    def call(self, header: dict[str, Any], done: Callable[[Frame | None, Exception | None], None],
             arrays: Batch | None = None, blob: bytes = b"", timeout: float | None = None) -> None:
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

        self._channel.call(pack(header, arrays, blob), answered, timeout)

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
                                 limits: dict[str, Any] | None = None) -> WorkerProcess:
    """Load and health-check in a fresh worker; on success the warm worker is returned for serving.

    The whole check (load + sample inference) must finish within ``timeout``; a hung one is killed.
    """
    worker = WorkerProcess(name, files, manifest, limits)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        await worker.start(timeout)
        await worker.request({"op": "health"}, timeout=max(0.1, deadline - loop.time()))
    except BaseException:
        await worker.kill()
        raise
    return worker


CrashLoopHook = Callable[[str], None]


class ModuleWorker:
    """A supervised worker serving one module version: the agent's runner in process-isolation mode."""

    def __init__(self, name: str, files: Path, manifest: Manifest, *, limits: dict[str, Any] | None = None,
                 start_timeout: float = 60.0, request_timeout: float = 30.0, on_crash_loop: CrashLoopHook | None = None,
                 backoff_base: float = 0.5, backoff_cap: float = 30.0, socket_path: Path | None = None,
                 collect_rate_ppm: int = 0, push_every: float = 1.0) -> None:
        self.name, self.files, self.manifest, self.limits = name, files, manifest, limits
        # The direct socket each worker of this version serves once started (None: only the agent's API).
        self.socket_path, self.collect_rate_ppm, self.push_every = socket_path, collect_rate_ppm, push_every
        self.on_stats: OnPush | None = None  # the direct socket's pushed stats, for the agent's telemetry
        self.start_timeout, self.request_timeout = start_timeout, request_timeout
        self.on_crash_loop = on_crash_loop
        self.backoff_base, self.backoff_cap = backoff_base, backoff_cap
        self.inputs: list[TensorSpec] = manifest.inputs
        self.outputs: list[TensorSpec] = manifest.outputs
        self.state = "starting"
        self.restarts = 0
        self.crashes: list[float] = []
        self.last_crash = ""
        self._worker: WorkerProcess | None = None
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self._worker.pid if self._worker is not None and self._worker.alive else None

    async def start(self, warm: WorkerProcess | None = None) -> None:
        """Start serving (with an already health-checked worker if given); waits for the first start."""
        if warm is not None and warm.alive:
            await self._listen(warm)
            self._use(warm)
        else:
            await self._spawn()
        self._task = asyncio.create_task(self._watch(), name=f"worker-{self.name}")

    def _use(self, worker: WorkerProcess) -> None:
        self._worker = worker
        if worker.inputs:
            self.inputs, self.outputs = worker.inputs, worker.outputs
        self.state = "serving"
        self._ready.set()

    async def _spawn(self) -> None:
        worker = WorkerProcess(self.name, self.files, self.manifest, self.limits)
        try:
            await worker.start(self.start_timeout)
        except BaseException:
            await worker.kill()
            raise
        await self._listen(worker)
        self._use(worker)

    async def _listen(self, worker: WorkerProcess) -> None:
        """Point the direct socket at ``worker``; if it cannot listen, the module still serves through the agent."""
        worker.on_push = self._pushed
        if self.socket_path is None:
            return
        try:
            await worker.listen(self.socket_path, self.name, self.manifest.version, self.collect_rate_ppm,
                                self.push_every, self.start_timeout)
        except Exception as exc:
            log.error("module %s: direct socket %s not served: %s", self.name, self.socket_path, exc)

    def _pushed(self, header: dict[str, Any], blob: bytes) -> None:
        if self.on_stats is not None:
            self.on_stats(header, blob)

    def set_collect_rate(self, ppm: int) -> None:
        """The data-collection rate for the direct socket's inferences (the agent samples its own)."""
        if ppm == self.collect_rate_ppm:
            return
        self.collect_rate_ppm = ppm
        if self._worker is not None and self._worker.alive and self._worker.direct_ino is not None:
            self._worker.call({"op": "collect", "ppm": ppm}, lambda frame, exc: None, timeout=self.request_timeout)

    async def _watch(self) -> None:
        """Wait for the worker to die; restart it with backoff, or declare a crash loop."""
        while self.state != "stopped":
            worker = self._worker
            assert worker is not None and worker.proc is not None
            rc = await worker.proc.wait()
            if self.state == "stopped":
                return
            self._ready.clear()
            now = time.monotonic()
            self.crashes = [t for t in self.crashes if now - t < CRASH_WINDOW] + [now]
            self.last_crash = f"worker {worker._exit_text()}"
            log.warning("module %s worker exited (%s), crash %d in %.0fs", self.name, self.last_crash,
                        len(self.crashes), CRASH_WINDOW)
            while True:
                if len(self.crashes) >= CRASH_LOOP:
                    self.state = "crash_loop"
                    reason = f"crash loop: {len(self.crashes)} worker crashes within {CRASH_WINDOW:g}s (last: {self.last_crash})"
                    log.error("module %s: %s", self.name, reason)
                    if self.on_crash_loop is not None:
                        self.on_crash_loop(reason)
                    return
                self.state = "backoff"
                await asyncio.sleep(min(self.backoff_cap, self.backoff_base * 2 ** (len(self.crashes) - 1)))
                self.state = "starting"
                try:
                    await self._spawn()
                    self.restarts += 1
                    break
                except Exception as exc:  # a failed start counts as another crash
                    self.crashes.append(time.monotonic())
                    self.last_crash = f"restart failed: {exc}"
            _ = rc

    async def predict(self, batch: Batch) -> Batch:
        _, out, _ = await self._request({"op": "predict"}, arrays=batch)
        return out

    async def predict_json(self, body: bytes) -> bytes:
        """A JSON body ``{"inputs": {...}}`` in, the outputs object as JSON out; parsed and checked in the worker."""
        _, _, out = await self._request({"op": "predict_json"}, blob=body)
        return out

    def predict_json_now(self, body: bytes, done: Callable[[bytes | None, Exception | None], None]) -> bool:
        """:meth:`predict_json` with a callback, no task: sent if the worker is serving, else False (nothing sent).

        ``done(outputs_json, None)`` or ``done(None, error)`` with the errors :meth:`predict_json` raises.
        """
        if self.state != "serving" or not self._ready.is_set() or self._worker is None:
            return False

        def answered(frame: Frame | None, exc: Exception | None) -> None:
            if isinstance(exc, TimeoutError):
                exc = ModelError(f"module {self.name} did not answer within {self.request_timeout:g}s; worker killed")
            done(frame[2] if frame is not None else None, exc)

        self._worker.call({"op": "predict_json"}, answered, blob=body, timeout=self.request_timeout)
        return True

    async def _request(self, header: dict[str, Any], arrays: Batch | None = None,
                       blob: bytes = b"") -> tuple[dict[str, Any], Batch, bytes]:
        if self.state in ("crash_loop", "stopped"):
            raise ModelError(f"module {self.name} is not serving ({self.state}: {self.last_crash})")
        if not self._ready.is_set():
            try:
                await asyncio.wait_for(self._ready.wait(), self.request_timeout)
            except TimeoutError:
                raise ModelError(f"module {self.name} worker is restarting ({self.last_crash})") from None
        assert self._worker is not None
        try:
            return await self._worker.request(header, arrays, blob, timeout=self.request_timeout)
        except TimeoutError:
            raise ModelError(f"module {self.name} did not answer within {self.request_timeout:g}s; worker killed") from None

    async def stop(self) -> None:
        self.state = "stopped"
        self._ready.clear()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._worker is not None:
            await self._worker.stop()

