"""Where shadow candidates live on a device: their own install slots, runners and shadows.

A candidate installs through an :class:`Installer` made by the executor's own factory (the live
version's root, chunk store, download and disk limits, clock), but under ``DATA/shadow/`` with its
own journal, so its ``current`` link is never the live one and its failure never touches the live
version. Started, it runs in its own worker process (process isolation, in the live modules' sandbox;
no direct socket: nobody calls it) or in process, and the inference front offers it the live inputs
(:mod:`agent.shadow`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from agent.install import HealthHook, Installed, Installer
from agent.reconcile import ModuleFacts
from agent.supervisor import ModuleWorker
from agent.workerproc import WorkerProcess, WorkerSandbox, health_check_in_worker
from protocol.messages import ShadowSpec
from protocol.signing import Root

if TYPE_CHECKING:
    from agent.inference import InferenceFront
    from modules.runners import Runner

log = logging.getLogger("edgefleet.agent.shadow")

SHADOW_DIR = "shadow"


class ShadowSlots:
    """The shadow candidates of one device: installs under ``DATA/shadow`` and the running shadows."""

    def __init__(self, data_dir: Path, front: InferenceFront, make_installer: Callable[[Path, HealthHook | None],
                                                                                       Installer], *,
                 sandbox: WorkerSandbox | None, health_timeout: float, isolation: str,
                 module_limits: dict[str, int]) -> None:
        """``make_installer(directory, health)``: the live installer's factory (``Executor.make_installer``);
        ``sandbox``: the live module workers' (``agent/workerproc.py``), None for none."""
        self.dir = data_dir / SHADOW_DIR
        self.front, self.isolation, self.module_limits = front, isolation, module_limits
        self.health_timeout, self.sandbox = health_timeout, sandbox
        self._make_installer = make_installer
        self._installer: Installer | None = None
        self.load_errors: dict[str, str] = {}
        self._warm: dict[str, WorkerProcess] = {}

    @property
    def installer(self) -> Installer:
        """Made on first use: a device never asked for a shadow has no ``shadow/`` directory."""
        if self._installer is None:
            self._installer = self._make_installer(self.dir, self._health_in_worker
                                                   if self.isolation == "process" else None)
        return self._installer

    def set_root(self, root: Root) -> None:
        if self._installer is not None:  # one made later takes the agent's root then
            self._installer.root = root

    def facts(self) -> dict[str, ModuleFacts]:
        if self._installer is None and not self.dir.exists():
            return {}
        inst = self.installer
        out = {}
        for name in {*inst.installed_names(), *self.front.shadows, *inst.journal.entries}:
            entry, running = inst.journal.get(name), self.front.shadows.get(name)
            out[name] = ModuleFacts(current=inst.current(name), active=running.bundle if running else None,
                                    journal=entry.state if entry else None,
                                    journal_bundle=entry.bundle if entry else None,
                                    retry_at=entry.retry_at if entry else 0.0)
        return out

    async def start(self, name: str, spec: ShadowSpec) -> None:
        """Load the installed candidate of ``name`` and offer it the live inputs from now on."""
        from agent.shadow import Shadow  # NumPy: only on a device asked to run a shadow

        await self.stop(name)
        try:
            inst: Installed = await asyncio.to_thread(self.installer.load_installed, name)
            runner: Runner | ModuleWorker
            if self.isolation == "process":
                runner = ModuleWorker(name, inst.files, inst.manifest, limits=self.module_limits,
                                      start_timeout=self.health_timeout, sandbox=self.sandbox)
                await runner.start(warm=self._warm.pop(inst.bundle, None))
            else:
                runner = await asyncio.to_thread(self.installer.runner_for, inst)
        except Exception as exc:  # the live version keeps serving; the hub sees why the shadow does not run
            self.load_errors[name] = f"cannot start the shadow candidate: {exc}"
            log.error("module %s: %s", name, self.load_errors[name])
            return
        self.load_errors.pop(name, None)
        shadow = Shadow(name, inst.bundle, inst.manifest.version, runner, spec)
        shadow.task = asyncio.create_task(shadow.run())
        self.front.shadows[name] = shadow
        log.info("module %s: shadow of version %d started (%.0f%% of inputs, queue %d)", name,
                 inst.manifest.version, spec.sample_ppm / 10_000, spec.max_queue)

    async def stop(self, name: str) -> None:
        shadow = self.front.shadows.pop(name, None)
        if shadow is not None:
            await shadow.stop()

    async def remove(self, name: str) -> None:
        await self.stop(name)
        self.load_errors.pop(name, None)
        self.installer.remove(name)
        for bundle in list(self._warm):
            await self._warm.pop(bundle).stop()

    async def stop_all(self) -> None:
        for name in list(self.front.shadows):
            await self.stop(name)
        for bundle in list(self._warm):
            await self._warm.pop(bundle).stop()

    async def _health_in_worker(self, inst: Installed) -> None:
        worker = await health_check_in_worker(inst.name, inst.files, inst.manifest, self.health_timeout,
                                              self.module_limits, self.sandbox)
        old = self._warm.pop(inst.bundle, None)
        if old is not None:
            await old.stop()
        self._warm[inst.bundle] = worker
