"""Serving the installed versions: one supervised worker per module (or a runner in process), warm workers
handed over by health checks, and the rollback of a committed version whose worker crash-loops.

A part of :class:`agent.executor.Executor` (which inherits it), kept apart so each file stays readable; it
uses the executor's installer, inference front and settings.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.inference import ActiveModule, InferenceFront
from agent.install import Installed, Installer
from agent.supervisor import ModuleWorker
from agent.workerproc import WorkerProcess, WorkerSandbox, health_check_in_worker

if TYPE_CHECKING:
    from modules.runners import Runner

log = logging.getLogger("edgefleet.agent")

RUN_DIR = "run"  # each module's direct socket, <module>.sock, served by its worker (process isolation)


class Serving:
    """Activation, deactivation, warm workers and crash-loop rollback (the executor's serving half)."""

    # set by Executor.__init__
    identity: Any
    trust: Any
    data_dir: Path
    front: InferenceFront
    installer: Installer
    isolation: str
    module_limits: dict[str, int]
    health_timeout: float
    telemetry_interval: float
    sandbox: WorkerSandbox | None
    load_errors: dict[str, str]
    _warm: dict[str, WorkerProcess]
    spawn: Callable[[Coroutine[Any, Any, Any]], None]
    changed: Callable[[], None]
    on_listen: Callable[[WorkerProcess], None] | None  # the agent's: a worker takes its direct socket (shared memory)

    async def activate(self, name: str) -> None:
        """Load the active version of ``name`` and start serving it (replacing an older one)."""
        try:
            inst: Installed = await asyncio.to_thread(self.installer.load_installed, name)
            ppm = inst.manifest.collect_rate_ppm
            if self.trust.desired is not None:
                ppm = next((m.collect_rate_ppm for m in self.trust.desired.modules if m.name == name), ppm)
            runner: Runner | ModuleWorker
            if self.isolation == "process":
                # A committed version, or one starting its bake (it serves on probation): its worker takes the
                # direct socket over (rename) on start, as the TCP API switches to it.
                runner = ModuleWorker(name, inst.files, inst.manifest, limits=self.module_limits,
                                      options=self._options(inst),
                                      start_timeout=self.health_timeout,
                                      on_crash_loop=lambda reason: self.spawn(self._crash_loop(name, inst.bundle, reason)),
                                      socket_path=self.data_dir / RUN_DIR / f"{name}.sock", collect_rate_ppm=ppm,
                                      push_every=min(1.0, self.telemetry_interval), sandbox=self.sandbox,
                                      on_listen=self.on_listen)
                await runner.start(warm=self._warm.pop(inst.key, None))
            else:
                runner = await asyncio.to_thread(self.installer.runner_for, inst)
        except Exception as exc:  # a broken install must not stop the agent; report it
            self.load_errors[name] = f"cannot load the active version: {exc}"
            log.error("%s: module %s: %s", self.identity.device_id, name, self.load_errors[name])
            return
        self.load_errors.pop(name, None)
        self.deactivate(name)
        active = ActiveModule(name, inst.bundle, inst.manifest.version, runner, ppm, config=inst.config_digest)
        if isinstance(runner, ModuleWorker):
            runner.on_stats = functools.partial(self.front.direct_stats, active)
        workload = self.front.workload
        if workload is not None and workload.rate > 0 and runner.inputs:
            active.task = asyncio.create_task(self.front.workload_loop(active))
        self.front.active[name] = active
        self.changed()

    def deactivate(self, name: str) -> None:
        active = self.front.active.pop(name, None)
        if active is not None and active.task is not None:
            active.task.cancel()
        if active is not None:
            self.spawn(stop_runner(active.runner))

    async def _health_in_worker(self, inst: Installed) -> None:
        """The installer's health check in process mode: a fresh worker, killed if it overruns the deadline."""
        worker = await health_check_in_worker(inst.name, inst.files, inst.manifest, self.health_timeout,
                                              self.module_limits, self.sandbox, self._options(inst))
        old = self._warm.pop(inst.key, None)
        if old is not None:
            await old.stop()
        self._warm[inst.key] = worker

    def _options(self, inst: Installed) -> dict[str, Any]:
        """What a worker loads the module with besides its files: its configuration and the device's facts."""
        return {"config": inst.config, "facts": self.installer.facts}

    async def _drop_unused_warm(self) -> None:
        serving = {f"{m.bundle}+{m.config}" if m.config else m.bundle for m in self.front.active.values()}
        for key in [k for k in self._warm if k not in serving]:
            await self._warm.pop(key).stop()

    async def _crash_loop(self, name: str, bundle: str, reason: str) -> None:
        """A committed version's worker keeps dying: roll back to the version before it, with the reason."""
        active = self.front.active.get(name)
        if active is None or active.bundle != bundle:
            return
        if active.bake is not None:  # on probation: the bake fails now and its install rolls back
            active.bake.fail(reason)
            return
        entry = await self.installer.roll_back_committed(name, reason)
        if entry is None:  # no install record to undo (e.g. a version older than the journal): report it
            self.load_errors[name] = reason
            self.deactivate(name)
        elif self.installer.current(name) is not None:
            await self.activate(name)
        else:
            self.deactivate(name)
        self.changed()


async def stop_runner(runner: Runner | ModuleWorker) -> None:
    if isinstance(runner, ModuleWorker):
        await runner.stop()
