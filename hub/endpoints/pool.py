"""One model version's worker processes, as the gateway drives them: start, batch, restart, drain.

Requests wait in the pool's queue; whenever a worker is idle it takes up to ``max_batch``
of them in one frame. With every worker idle a request goes at once (no added latency at
low load); while some worker is busy an idle one waits up to ``max_wait_ms`` for a fuller
batch. A worker that dies fails only its own in-flight requests (503, Retry-After) and is
restarted with backoff; queued requests wait for a live worker up to ``queue_timeout_s``.

Workers run operator code, so they start in the sandbox (modules/sandbox.py) on a staged copy of
the bundle, and what they send back is decoded as hostile input (wire.py): a malformed frame, or an
answer that does not fit the batch it claims to answer, ends the worker like a crash.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hub.endpoints import wire
from hub.endpoints.codec import JSON, dumps, read_manifest
from hub.endpoints.collect import Collector
from modules.httpwire import enlarge
from modules.sandbox import Limits, Sandbox

log = logging.getLogger("edgefleet.endpoint.pool")

REPO_ROOT = Path(__file__).resolve().parents[2]
RETRY_AFTER_S = 1
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0

Response = tuple[int, bytes, str, tuple[tuple[str, str], ...]]  # status, body, content type, extra headers


def unavailable(request_id: str, why: str) -> Response:
    return (503, dumps({"detail": why, "request_id": request_id}), JSON,
            (("retry-after", str(RETRY_AFTER_S)),))


class PoolError(RuntimeError):
    """A version's workers could not start (load failure, failed health check); the text says why."""


@dataclass
class Settings:
    replicas: int = 1
    max_batch: int = 64
    max_wait_ms: float = 2.0
    threads: int = 1
    queue_timeout_s: float = 30.0
    collect_db: str = ""
    collect_rate_ppm: int = -1  # -1: the module's own rate
    memory_mb: int = 0  # address-space cap per worker (0: none)


@dataclass
class Pending:
    item: tuple[Any, ...]
    future: asyncio.Future[Response]
    since: float = field(default_factory=time.monotonic)


class Worker(asyncio.BufferedProtocol):
    """The gateway's end of one worker process's socket."""

    def __init__(self, pool: Pool, index: int) -> None:
        self.pool, self.index = pool, index
        self.state = "starting"  # starting -> ready -> dead (-> starting again on restart)
        self.proc: asyncio.subprocess.Process | None = None
        self.transport: asyncio.Transport | None = None
        self.inflight: list[Pending] | None = None
        self.info: dict[str, Any] = {}
        self.restarts = 0
        self.started_at = 0.0
        self.served = 0
        self._reader = wire.FrameReader(wire.FromWorker)
        self._ready: asyncio.Future[dict[str, Any]] | None = None
        self._batch_ids = itertools.count(1)
        self._batch_id = 0

    async def start(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        parent, child = socket.socketpair()
        enlarge(parent)
        enlarge(child)
        s, pool = self.pool.settings, self.pool
        bundle = pool.staged or pool.bundle_dir
        args = [sys.executable, "-m", "hub.endpoints.worker", "--fd", str(child.fileno()),
                "--bundle", str(bundle), "--label", pool.label, "--endpoint", pool.endpoint,
                "--threads", str(s.threads), "--collect-rate-ppm", str(s.collect_rate_ppm)]
        if s.collect_db:
            args.append("--collect")
        fds: tuple[int, ...] = (child.fileno(),)
        if pool.arena_fd >= 0:
            fds, args = (*fds, pool.arena_fd), [*args, "--arena-fd", str(pool.arena_fd)]
        env = None
        if not pool.sandbox.active:  # as before the sandbox: the gateway's environment
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        launch = pool.sandbox.launch(args, read_only=[bundle], cwd=bundle, env=env, limits=Limits(memory_mb=s.memory_mb))
        self.state, self.inflight, self._reader = "starting", None, wire.FrameReader(wire.FromWorker)
        self._ready = loop.create_future()
        try:
            self.proc = await asyncio.create_subprocess_exec(*launch.argv, pass_fds=fds,
                                                             stdin=subprocess.DEVNULL, **launch.kwargs())
        except BaseException:
            launch.cleanup()
            raise
        finally:
            child.close()
        self._launch = launch
        self.started_at = time.monotonic()
        await loop.connect_accepted_socket(lambda: self, parent)
        loop.create_task(self._watch(self.proc))
        try:
            self.info = await asyncio.wait_for(self._ready, READY_TIMEOUT_S)
        except BaseException:
            self.kill()
            raise
        self.state = "ready"
        return self.info

    async def _watch(self, proc: asyncio.subprocess.Process) -> None:
        launch = self._launch
        await proc.wait()
        launch.cleanup()
        if proc is self.proc:
            self._dead(f"worker exited with code {proc.returncode}")

    # --- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._reader.get_buffer()  # a large answer lands in place

    def buffer_updated(self, nbytes: int) -> None:
        try:
            messages = self._reader.buffer_updated(nbytes)
        except ValueError as exc:  # includes msgspec's DecodeError: not a message a worker may send
            self._dead(f"worker sent a malformed frame ({exc})")
            return
        for msg in messages:
            if isinstance(msg, wire.Results):
                batch = self.inflight or []
                if msg.batch != self._batch_id or len(msg.results) != len(batch) or len(msg.samples) > len(batch):
                    self._dead(f"worker answered batch {msg.batch} with {len(msg.results)} result(s); "
                               f"expected batch {self._batch_id} with {len(batch)}")
                    return
                self.inflight = None
                for pending, (status, body, ctype, hlen) in zip(batch, msg.results):
                    if not pending.future.done():
                        extra = (("inference-header-content-length", str(hlen)),) if hlen >= 0 else ()
                        pending.future.set_result((status, body, ctype, extra))
                if self.pool.collector is not None:
                    for inputs, outputs, request_id in msg.samples:
                        self.pool.collector.add(inputs, outputs, request_id)
                self.served += len(batch)
                self.pool.kick()
            elif isinstance(msg, wire.Ready) and self._ready and not self._ready.done():
                self._ready.set_result({"pid": msg.pid, "batchable": msg.batchable,
                                        "inputs": [s.to_dict() for s in msg.inputs],
                                        "outputs": [s.to_dict() for s in msg.outputs]})
            elif isinstance(msg, wire.Fail) and self._ready and not self._ready.done():
                self._ready.set_exception(PoolError(f"{self.pool.label}: {msg.reason}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._dead("worker closed its connection")

    # --- work --------------------------------------------------------------------------------

    def send(self, batch: list[Pending]) -> None:
        self.inflight = batch
        self._batch_id = next(self._batch_ids)
        assert self.transport is not None
        self.transport.write(wire.encode(wire.Run(self._batch_id, [p.item for p in batch])))

    def _dead(self, why: str) -> None:
        if self.state == "dead":
            return
        was_ready = self.state == "ready"
        self.state = "dead"
        if self._ready and not self._ready.done():
            self._ready.set_exception(PoolError(f"{self.pool.label}: worker died while loading ({why})"))
        batch, self.inflight = self.inflight or [], None
        for p in batch:  # only the requests this worker held fail; the queue waits for a live worker
            if not p.future.done():
                p.future.set_result(unavailable(p.item[0], f"the worker serving {self.pool.label} crashed; retry"))
        if self.transport is not None:
            self.transport.close()
        self.kill()
        if was_ready:
            log.warning("%s worker %d died (%s); %d request(s) in flight got 503", self.pool.label, self.index, why,
                        len(batch))
            self.pool.on_worker_dead(self)

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass

    async def stop(self) -> None:
        """Close the socket (the worker exits at EOF); kill it if it lingers."""
        proc = self.proc
        self.state = "dead"
        if self.transport is not None:
            self.transport.close()
        if proc is not None:
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                self.kill()
                await proc.wait()

    def status(self) -> dict[str, Any]:
        return {"index": self.index, "pid": self.proc.pid if self.proc else None, "state": self.state,
                "busy": self.inflight is not None, "restarts": self.restarts, "served": self.served}


class Pool:
    def __init__(self, endpoint: str, label: str, bundle_dir: Path, settings: Settings,
                 sandbox: Sandbox | None = None, arena_fd: int = -1) -> None:
        self.arena_fd = arena_fd  # the gateway's body arena, read-only (arena.py); -1: bodies come inline
        self.endpoint, self.label, self.bundle_dir, self.settings = endpoint, label, Path(bundle_dir), settings
        self.sandbox = sandbox or Sandbox()
        self.staged: Path | None = None  # the copy of the bundle the sandboxed workers read
        self.collector: Collector | None = None
        self.workers: list[Worker] = []
        self.queue: deque[Pending] = deque()
        self.info: dict[str, Any] = {}
        self.stopping = False
        self.batches = 0
        self.batched_requests = 0
        self._timer: asyncio.TimerHandle | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start every replica and wait for all to pass the health check; PoolError if any cannot."""
        if self.sandbox.active:
            self.staged = await asyncio.to_thread(self.sandbox.stage, self.bundle_dir)
        if self.settings.collect_db:
            manifest = read_manifest(self.bundle_dir)
            self.collector = Collector(self.settings.collect_db, self.endpoint, manifest.name, manifest.version)
        try:
            await self.scale(self.settings.replicas)
        except BaseException:
            self._release()
            raise
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    def _release(self) -> None:
        if self.collector is not None:
            self.collector.close()
            self.collector = None
        if self.staged is not None:
            shutil.rmtree(self.staged, ignore_errors=True)
            self.staged = None

    async def scale(self, replicas: int) -> None:
        replicas = max(1, replicas)
        self.settings.replicas = replicas
        new = [Worker(self, i) for i in range(len(self.workers), replicas)]
        if new:
            results = await asyncio.gather(*(w.start() for w in new), return_exceptions=True)
            failed = [r for r in results if isinstance(r, BaseException)]
            if failed:
                await asyncio.gather(*(w.stop() for w in new))
                raise failed[0] if isinstance(failed[0], PoolError) else PoolError(f"{self.label}: {failed[0]!r}")
            self.info = new[0].info
            self.workers += new
        extra, self.workers = self.workers[replicas:], self.workers[:replicas]
        for w in extra:
            w.state = "retiring"
        await asyncio.gather(*(self._retire(w) for w in extra))
        self.kick()

    async def _retire(self, w: Worker) -> None:
        while w.inflight is not None:
            await asyncio.sleep(0.01)
        await w.stop()

    def submit(self, item: tuple[Any, ...]) -> asyncio.Future[Response]:
        fut: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self.queue.append(Pending(item, fut))
        self.kick()
        return fut

    def kick(self) -> None:
        """Hand queued requests to idle workers, batching as described in the module docstring."""
        queue, s = self.queue, self.settings
        while queue:
            idle = next((w for w in self.workers if w.state == "ready" and w.inflight is None), None)
            if idle is None:
                return
            if len(queue) < s.max_batch and s.max_wait_ms > 0 and any(w.inflight is not None for w in self.workers):
                wait = s.max_wait_ms / 1000 - (time.monotonic() - queue[0].since)
                if wait > 0:
                    if self._timer is None:
                        self._timer = asyncio.get_running_loop().call_later(wait, self._on_timer)
                    return
            n = min(s.max_batch, len(queue))
            batch = [queue.popleft() for _ in range(n)]
            self.batches += 1
            self.batched_requests += n
            idle.send(batch)

    def _on_timer(self) -> None:
        self._timer = None
        self.kick()

    def on_worker_dead(self, worker: Worker) -> None:
        if self.stopping or worker not in self.workers:
            return
        asyncio.get_running_loop().create_task(self._restart(worker))

    async def _restart(self, worker: Worker) -> None:
        # back off when a worker keeps dying young (a crash loop), not after one crash in a long life
        young = time.monotonic() - worker.started_at < 30
        worker.restarts += 1
        delay = min(10.0, 0.1 * 2 ** min(worker.restarts, 7)) if young else 0.1
        while not self.stopping and worker in self.workers:
            await asyncio.sleep(delay)
            try:
                await worker.start()
                log.info("%s worker %d restarted (pid %s)", self.label, worker.index, worker.info.get("pid"))
                self.kick()
                return
            except (PoolError, OSError, TimeoutError) as exc:
                log.error("%s worker %d could not restart: %s", self.label, worker.index, exc)
                delay = min(10.0, delay * 2)

    async def _sweep(self) -> None:
        """Fail requests that waited too long for a live worker (all workers down), with 503."""
        while not self.stopping:
            await asyncio.sleep(0.25)
            limit = time.monotonic() - self.settings.queue_timeout_s
            while self.queue and self.queue[0].since < limit:
                p = self.queue.popleft()
                if not p.future.done():
                    p.future.set_result(unavailable(p.item[0], f"no worker of {self.label} is available; retry"))

    @property
    def ready(self) -> bool:
        return any(w.state == "ready" for w in self.workers)

    async def drain_and_stop(self, timeout: float = 60.0) -> None:
        """Serve what is queued and in flight, then stop the workers (traffic was moved away first)."""
        deadline = time.monotonic() + timeout
        while (self.queue or any(w.inflight for w in self.workers)) and time.monotonic() < deadline and self.ready:
            await asyncio.sleep(0.01)
        self.stopping = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for p in self.queue:
            if not p.future.done():
                p.future.set_result(unavailable(p.item[0], f"{self.label} is shutting down; retry"))
        self.queue.clear()
        await asyncio.gather(*(w.stop() for w in self.workers))
        self._release()

    def status(self) -> dict[str, Any]:
        return {"label": self.label, "ready": self.ready, "queued": len(self.queue),
                "workers": [w.status() for w in self.workers], "batches": self.batches,
                "mean_batch": round(self.batched_requests / self.batches, 2) if self.batches else 0.0}
