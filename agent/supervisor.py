"""Supervised module workers: a child process per module, restarted with backoff, rolled back on a crash loop.

    starting -> serving -> (crash) -> backoff -> starting ...
                        \\-> crash_loop (``CRASH_LOOP`` crashes within ``CRASH_WINDOW`` s: stop, report, roll back)
                        \\-> stopped

A request that hangs past its deadline kills the worker (a hung health check or predict
cannot wedge the agent); the next request starts a fresh one. One worker process and its socket are
``agent.workerproc``'s. JSON requests go to the worker as they came (``predict_json``): the worker
parses, checks and runs them, so the agent process never loads NumPy for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.workerproc import Frame, OnPush, WorkerProcess, WorkerSandbox
from modules.errors import ModelError
from protocol.manifest import Manifest, TensorSpec

if TYPE_CHECKING:
    from modules.runners import Batch

log = logging.getLogger("edgefleet.agent.supervisor")

CRASH_LOOP = 3
CRASH_WINDOW = 60.0

CrashLoopHook = Callable[[str], None]
Reply = tuple[str, int, bytes, bytes]  # an ``infer`` answer: content type, OIP header length or -1, body, sample JSON


def _reply(frame: Frame) -> Reply:
    header, _, blob = frame
    n = int(header["body"])
    if n == len(blob):  # no sample after it: the answer's buffer as it came (no copy)
        return str(header["ctype"]), int(header["hlen"]), blob, b""
    return str(header["ctype"]), int(header["hlen"]), blob[:n], blob[n:]


class ModuleWorker:
    """A supervised worker serving one module version: the agent's runner in process-isolation mode."""

    def __init__(self, name: str, files: Path, manifest: Manifest, *, limits: dict[str, Any] | None = None,
                 start_timeout: float = 60.0, request_timeout: float = 30.0, on_crash_loop: CrashLoopHook | None = None,
                 backoff_base: float = 0.5, backoff_cap: float = 30.0, socket_path: Path | None = None,
                 collect_rate_ppm: int = 0, push_every: float = 1.0, sandbox: WorkerSandbox | None = None,
                 options: dict[str, Any] | None = None, on_listen: Callable[[WorkerProcess], None] | None = None) -> None:
        self.name, self.files, self.manifest, self.limits = name, files, manifest, limits
        self.on_listen = on_listen  # each worker taking the direct socket: the apps' shared memory regions go to it
        self.sandbox = sandbox
        self.options = options  # the module's config and the device's facts, for every worker started
        self.accelerator = ""
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
    def process(self) -> WorkerProcess | None:
        """The worker serving now (None between restarts)."""
        return self._worker if self._worker is not None and self._worker.alive else None

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
        self.accelerator = worker.accelerator
        if worker.inputs:
            self.inputs, self.outputs = worker.inputs, worker.outputs
        self.state = "serving"
        self._ready.set()

    async def _spawn(self) -> None:
        worker = WorkerProcess(self.name, self.files, self.manifest, self.limits, self.sandbox, self.options)
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
        if self.on_listen is not None:  # before: the worker takes the regions before its first client (frames in order)
            self.on_listen(worker)
        try:
            await worker.listen(self.socket_path, self.name, self.manifest.version, self.collect_rate_ppm,
                                self.push_every, self.start_timeout)
        except Exception as exc:
            log.error("module %s: direct socket %s not served: %s", self.name, self.socket_path, exc)
        if self.on_listen is not None:  # and after: those registered while it was asked (it is not listed before)
            self.on_listen(worker)

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
        return self._call_now({"op": "predict_json"}, body, lambda f, exc: done(f[2] if f is not None else None, exc))

    async def infer(self, form: dict[str, Any], body: bytes, sample: bool) -> Reply:
        """A request in any form (``.npy``, OIP v2; ``modules.tensors``): decoded, run and encoded in the worker."""
        return _reply(await self._request({"op": "infer", "form": form, "sample": sample}, blob=body))

    def infer_now(self, form: dict[str, Any], body: bytes, sample: bool,
                  done: Callable[[Reply | None, Exception | None], None]) -> bool:
        """:meth:`infer` with a callback, no task, as :meth:`predict_json_now`."""
        return self._call_now({"op": "infer", "form": form, "sample": sample}, body,
                              lambda f, exc: done(_reply(f) if f is not None else None, exc))

    def _call_now(self, header: dict[str, Any], body: bytes, done: Callable[[Frame | None, Exception | None], None]) -> bool:
        if self.state != "serving" or not self._ready.is_set() or self._worker is None:
            return False

        def answered(frame: Frame | None, exc: Exception | None) -> None:
            if isinstance(exc, TimeoutError):
                exc = ModelError(f"module {self.name} did not answer within {self.request_timeout:g}s; worker killed")
            done(frame, exc)

        self._worker.call(header, answered, blob=body, timeout=self.request_timeout)
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

