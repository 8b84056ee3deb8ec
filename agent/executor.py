"""The executor: carries out the reconciler's actions on this device.

It reads the facts (``module_facts``), asks ``agent.reconcile.step`` what to do, and does it: installs
through the journalled ``Installer`` (fetching bundles over MQTT or HTTP), activation (a supervised
worker per module, or a runner in process), bakes, removal, the rollback of a committed version whose
worker crash-loops, and the warm workers a health check hands over to serve. One install at a time;
a newer desired state stops a pass between actions and starts the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Coroutine, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.identity import Identity
from agent.inference import ActiveModule, InferenceFront
from agent.install import Installed, Installer
from agent.journal import BEFORE_ACTIVATION, Entry
from agent.mqtt import MqttOffline
from agent.reconcile import (
    Action,
    Activate,
    CancelInstall,
    Facts,
    Install,
    ModuleFacts,
    Remove,
    Report,
    ResumeBake,
    SetCollectRate,
    Trust,
    step,
    supersede,
)
from agent.session import MqttClient
from agent.supervisor import ModuleWorker
from agent.transfer import MANIFESTS_DIR, BundleFetch
from agent.workerproc import WorkerProcess, health_check_in_worker
from modules.store import ContentStore
from protocol.messages import BakePolicy, DesiredModule, DesiredState

if TYPE_CHECKING:
    from agent.http_transfer import HubHttp
    from modules.runners import Runner

log = logging.getLogger("edgefleet.agent")

RUN_DIR = "run"  # each module's direct socket, <module>.sock, served by its worker (process isolation)
PARTIAL_DIR = "downloads"  # chunks cut short during an HTTP download, resumed with a Range request
RETRY_AFTER_ERROR = 30.0


class Executor:
    """Installs, activates, bakes and removes module versions as the reconciler decides."""

    def __init__(self, identity: Identity, data_dir: Path, trust: Trust, front: InferenceFront, client: MqttClient, *,
                 reject: Callable[[str, str, str], None], changed: Callable[[], None],
                 spawn: Callable[[Coroutine[Any, Any, Any]], None], clock: Callable[[], float],
                 isolation: str, module_limits: dict[str, int], health_timeout: float, telemetry_interval: float,
                 transfer: str, hub_url: str | None, blob_retry: float,
                 runner_cache: MutableMapping[str, Runner] | None) -> None:
        self.identity, self.data_dir, self.trust, self.front, self.client = identity, data_dir, trust, front, client
        self.reject, self.changed, self.spawn, self.clock = reject, changed, spawn, clock
        self.isolation, self.module_limits, self.health_timeout = isolation, module_limits, health_timeout
        self.telemetry_interval, self.transfer, self.hub_url, self.blob_retry = (telemetry_interval, transfer, hub_url,
                                                                                 blob_retry)
        self.chunks = ContentStore(data_dir / "chunks")
        self.installer = Installer(data_dir, trust.root, self.chunks, runner_cache, health_timeout, self._on_install,
                                   health=self._health_in_worker if isolation == "process" else None, bake=self._bake)
        self.http: HubHttp | None = None  # made for the first HTTP download (agent/http_transfer.py is not loaded idle)
        self.wake = asyncio.Event()  # the desired state changed (or a retry is due): run a pass
        self.load_errors: dict[str, str] = {}
        self.progress: dict[str, float] = {}
        self.transfer_errors: dict[str, str] = {}  # bundle -> what keeps its download from progressing
        self._warm: dict[str, WorkerProcess] = {}  # health-checked workers, handed over on activation
        self._fetches: dict[str, BundleFetch] = {}
        self._installing: tuple[str, str] | None = None  # (name, bundle) of the install under way
        self.install_task: asyncio.Task[Entry] | None = None

    # --- facts and passes ----------------------------------------------------------------------

    def module_facts(self) -> dict[str, ModuleFacts]:
        names = {*self.installer.installed_names(), *self.front.active, *self.installer.journal.entries}
        facts = {}
        for name in names:
            entry, active = self.installer.journal.get(name), self.front.active.get(name)
            facts[name] = ModuleFacts(current=self.installer.current(name), active=active.bundle if active else None,
                                      journal=entry.state if entry else None,
                                      journal_bundle=entry.bundle if entry else None)
        return facts

    async def start(self) -> None:
        """Recover interrupted installs and serve every installed module (before the session connects)."""
        if self.isolation == "process":
            self._clear_run_dir()
        await self.installer.recover()
        for name in self.installer.installed_names():
            await self.activate(name)

    async def loop(self) -> None:
        """Resume interrupted bakes, then a pass for each change of the desired state, until cancelled."""
        await self.carry_out(step(self.clock(), self.trust.desired, self.module_facts(), Facts(starting=True)))
        while True:
            await self.wake.wait()
            self.wake.clear()
            state = self.trust.desired
            if state is None:
                continue
            try:
                await self.carry_out(step(self.clock(), state, self.module_facts()), state)
            except Exception:  # e.g. a full disk: settle the journal, keep serving, try again later
                log.exception("%s: reconcile failed; retrying in %.0fs", self.identity.device_id, RETRY_AFTER_ERROR)
                with contextlib.suppress(Exception):
                    await self.installer.recover()
                asyncio.get_running_loop().call_later(RETRY_AFTER_ERROR, self.wake.set)
                self.changed()

    async def carry_out(self, actions: list[Action], state: DesiredState | None = None) -> None:
        """Do ``actions`` in order; stop when a newer desired state than ``state`` arrives (the next pass has it)."""
        for action in actions:
            if state is not None and self.trust.desired is not state:
                return
            if isinstance(action, Remove):
                self.deactivate(action.name)
                self.installer.remove(action.name)
                self.changed()
            elif isinstance(action, Activate):
                await self.activate(action.name)
            elif isinstance(action, SetCollectRate):
                if action.name in self.front.active:
                    self.front.set_collect_rate(self.front.active[action.name], action.ppm)
            elif isinstance(action, Install):
                await self._install(action.module)
            elif isinstance(action, ResumeBake):
                await self._resume_bake(action.name)
            elif isinstance(action, CancelInstall):
                self._cancel(action)
            elif isinstance(action, Report):
                self.changed()

    def on_desired(self, state: DesiredState) -> None:
        """A newer desired state was accepted: cancel a download it no longer wants, and run a pass."""
        entry = self.installer.journal.get(self._installing[0]) if self._installing else None
        for action in supersede(state, self._installing, entry.state if entry else None):
            self._cancel(action)
        self.wake.set()

    def _cancel(self, action: CancelInstall) -> None:
        if self.install_task is not None and self._installing == (action.name, action.bundle):
            self.install_task.cancel()  # nothing was activated yet: drop it and go for the new state

    def on_blob(self, bundle: str, part: str, payload: bytes) -> None:
        """A bundle part from the blob topics, for the MQTT download that asked for it (others are ignored)."""
        fetch = self._fetches.get(bundle)
        if fetch is not None:
            fetch.on_part(part, payload)

    # --- installing ----------------------------------------------------------------------------

    async def _install(self, m: DesiredModule) -> None:
        if self.transfer == "http":
            from agent.http_transfer import HttpBundleFetch, HubHttp

            if self.http is None:
                assert self.hub_url is not None
                self.http = HubHttp(self.hub_url, self.identity.device_id, self.identity.mqtt_password,
                                    self.identity.broker_ca)
            fetch: BundleFetch | HttpBundleFetch = HttpBundleFetch(
                self.http, m, self.trust.root, self.chunks, self.data_dir / MANIFESTS_DIR,
                self.data_dir / PARTIAL_DIR, reject=self.reject, progress=lambda f: self._set_progress(m.bundle, f),
                note=lambda text: self._set_transfer_error(m.bundle, text), retry=self.blob_retry, clock=self.clock)
        else:
            fetch = BundleFetch(
                self.identity.device_id, m, self.trust.root, self.chunks, self.data_dir / MANIFESTS_DIR,
                publish=lambda t, p: self.client.publish(t, p, qos=1), reject=self.reject,
                progress=lambda f: self._set_progress(m.bundle, f), retry=self.blob_retry, clock=self.clock,
            )
            self._fetches[m.bundle] = fetch
        self._installing = (m.name, m.bundle)
        try:
            if isinstance(fetch, BundleFetch):
                await self.client.subscribe(fetch.topic)
            self.install_task = asyncio.create_task(self.installer.install(m, fetch.run))
            await asyncio.wait({self.install_task})  # not cancelled with it: a superseded download is
            if self.install_task.cancelled():
                entry = self.installer.journal.get(m.name)
                if entry is not None and entry.state in BEFORE_ACTIVATION:
                    self.installer.journal.drop(m.name)
                log.info("%s: download of %s %s superseded", self.identity.device_id, m.name, m.bundle[:12])
                return
            entry = self.install_task.result()
        finally:
            self._fetches.pop(m.bundle, None)
            self._installing, self.install_task = None, None
            self.progress.pop(m.bundle, None)
            self.transfer_errors.pop(m.bundle, None)
            if isinstance(fetch, BundleFetch):
                with contextlib.suppress(MqttOffline):
                    await self.client.unsubscribe(fetch.topic)
        await self._settle(m.name, entry)

    async def _settle(self, name: str, entry: Entry) -> None:
        """After an install ends: serve what ``current`` points at (a bake may have served the new version)."""
        current = self.installer.current(name)
        active = self.front.active.get(name)
        if current is None:
            if entry.state == "failed":
                self.deactivate(name)
        elif entry.state in ("committed", "rolled_back") and (active is None or active.bundle != current):
            await self.activate(name)
        await self._drop_unused_warm()

    async def _resume_bake(self, name: str) -> None:
        try:
            await self._settle(name, await self.installer.resume_bake(name))
        except Exception:  # the journal stays "baking": the next start tries again (and counts it)
            log.exception("%s: resuming the bake of %s failed", self.identity.device_id, name)

    async def _bake(self, inst: Installed, policy: BakePolicy) -> str:
        """The installer's bake: the new version serves; its error rate (or a crash loop) decides. "" commits."""
        from agent.bake import BakeWatch  # loaded when a deployment asks for a bake: the idle agent stays small

        active = self.front.active.get(inst.name)
        if active is None or active.bundle != inst.bundle:
            await self.activate(inst.name)
            active = self.front.active.get(inst.name)
        if active is None or active.bundle != inst.bundle:
            return f"the new version did not start: {self.load_errors.get(inst.name, 'unknown reason')}"
        watch = active.bake = BakeWatch(policy)
        log.info("%s: module %s baking for %ds (rollback above %g%% errors over >= %d inferences)",
                 self.identity.device_id, inst.name, policy.seconds, policy.max_error_ppm / 10_000,
                 policy.min_inferences)
        try:
            reason = await watch.wait()
        finally:
            active.bake = None
        log.info("%s: module %s bake %s: %s", self.identity.device_id, inst.name, "failed" if reason else "passed",
                 reason or watch.summary())
        return reason

    def _set_transfer_error(self, bundle: str, text: str) -> None:
        if text:
            self.transfer_errors[bundle] = text
        else:
            self.transfer_errors.pop(bundle, None)
        self.changed()

    def _set_progress(self, bundle: str, fraction: float) -> None:
        self.progress[bundle] = fraction
        self.changed()

    def _on_install(self, name: str, entry: Entry) -> None:
        self.changed()

    # --- serving -------------------------------------------------------------------------------

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
                                      start_timeout=self.health_timeout,
                                      on_crash_loop=lambda reason: self.spawn(self._crash_loop(name, inst.bundle, reason)),
                                      socket_path=self.data_dir / RUN_DIR / f"{name}.sock", collect_rate_ppm=ppm,
                                      push_every=min(1.0, self.telemetry_interval))
                await runner.start(warm=self._warm.pop(inst.bundle, None))
            else:
                runner = await asyncio.to_thread(self.installer.runner_for, inst)
        except Exception as exc:  # a broken install must not stop the agent; report it
            self.load_errors[name] = f"cannot load the active version: {exc}"
            log.error("%s: module %s: %s", self.identity.device_id, name, self.load_errors[name])
            return
        self.load_errors.pop(name, None)
        self.deactivate(name)
        active = ActiveModule(name, inst.bundle, inst.manifest.version, runner, ppm)
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
            self.spawn(_stop_runner(active.runner))

    async def _health_in_worker(self, inst: Installed) -> None:
        """The installer's health check in process mode: a fresh worker, killed if it overruns the deadline."""
        worker = await health_check_in_worker(inst.name, inst.files, inst.manifest, self.health_timeout,
                                              self.module_limits)
        old = self._warm.pop(inst.bundle, None)
        if old is not None:
            await old.stop()
        self._warm[inst.bundle] = worker

    async def _drop_unused_warm(self) -> None:
        for bundle in [b for b in self._warm if not any(m.bundle == b for m in self.front.active.values())]:
            await self._warm.pop(bundle).stop()

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

    def _clear_run_dir(self) -> None:
        """Sockets a killed agent's workers left behind: nobody answers on them; the workers started now bind afresh."""
        run = self.data_dir / RUN_DIR
        run.mkdir(mode=0o750, exist_ok=True)
        for stale in run.glob("*.sock"):
            stale.unlink(missing_ok=True)

    # --- shutdown ------------------------------------------------------------------------------

    def tasks(self) -> list[asyncio.Task[Any]]:
        """What runs on the executor's behalf: the workload loops and the install under way."""
        tasks: list[asyncio.Task[Any]] = [m.task for m in self.front.active.values() if m.task]
        if self.install_task is not None:
            tasks.append(self.install_task)
        return tasks

    async def stop_workers(self) -> None:
        """Stop every serving runner's worker and every warm one."""
        await asyncio.gather(*(_stop_runner(m.runner) for m in self.front.active.values()),
                             *(w.stop() for w in self._warm.values()), return_exceptions=True)
        self.front.active.clear()
        self._warm.clear()

    def close(self) -> None:
        if self.http is not None:
            self.http.close()


async def _stop_runner(runner: Runner | ModuleWorker) -> None:
    if isinstance(runner, ModuleWorker):
        await runner.stop()
