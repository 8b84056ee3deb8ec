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
import logging
from collections.abc import Callable, Coroutine, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.deferral import Hold
from agent.gc import collect_chunks
from agent.identity import Identity
from agent.inference import InferenceFront
from agent.install import BakeHook, HealthHook, Installed, Installer
from agent.journal import BEFORE_ACTIVATION, Entry
from agent.limits import DownloadLimits, is_disk_full, wake_at
from agent.mqtt import MqttOffline
from agent.offline import Package, PackageFetch
from agent.reconcile import (
    Action,
    Activate,
    CancelInstall,
    Facts,
    Install,
    InstallShadow,
    ModuleFacts,
    Reconfigure,
    Remove,
    RemoveShadow,
    Report,
    ResumeBake,
    SetCollectRate,
    StartShadow,
    Trust,
    next_retry,
    step,
    still_wanted,
    supersede,
)
from agent.serving import RUN_DIR, Serving, stop_runner
from agent.session import MqttClient
from agent.shadow_slots import ShadowSlots
from agent.transfer import MANIFESTS_DIR, BundleFetch
from agent.workerproc import WorkerProcess, WorkerSandbox, clear_run_dir
from modules.store import ContentStore
from protocol.messages import BakePolicy, DesiredModule, DesiredState

if TYPE_CHECKING:
    from agent.http_transfer import HttpBundleFetch, HubHttp
    from modules.runners import Runner

log = logging.getLogger("edgefleet.agent")

PARTIAL_DIR = "downloads"  # chunks cut short during an HTTP download, resumed with a Range request


class Executor(Serving):
    """Installs, activates, bakes and removes module versions as the reconciler decides."""

    def __init__(self, identity: Identity, data_dir: Path, trust: Trust, front: InferenceFront, client: MqttClient, *,
                 reject: Callable[[str, str, str], None], changed: Callable[[], None],
                 spawn: Callable[[Coroutine[Any, Any, Any]], None], clock: Callable[[], float],
                 isolation: str, module_limits: dict[str, int], health_timeout: float, telemetry_interval: float,
                 transfer: str, hub_url: str | None, blob_retry: float,
                 runner_cache: MutableMapping[str, Runner] | None, limits: DownloadLimits | None = None,
                 sandbox: WorkerSandbox | None = None) -> None:
        self.identity, self.data_dir, self.trust, self.front, self.client = identity, data_dir, trust, front, client
        self.reject, self.changed, self.spawn, self.clock = reject, changed, spawn, clock
        self.isolation, self.module_limits, self.health_timeout = isolation, module_limits, health_timeout
        self.telemetry_interval, self.transfer, self.hub_url, self.blob_retry = (telemetry_interval, transfer, hub_url,
                                                                                 blob_retry)
        self.limits, self.sandbox = limits or DownloadLimits(), sandbox
        self.chunks = ContentStore(data_dir / "chunks")
        self.runner_cache = runner_cache
        self.installer = self.make_installer(data_dir, self._health_in_worker if isolation == "process" else None,
                                             bake=self._bake)
        # shadow candidates: the same installer (download and disk limits) and worker sandbox as live versions
        self.shadows = ShadowSlots(data_dir, front, self.make_installer, sandbox=sandbox,
                                   health_timeout=health_timeout, isolation=isolation, module_limits=module_limits)
        self.storage_error = ""  # the last write the disk refused (a full disk), until a pass succeeds again
        self.blocked: dict[str, tuple[str, str]] = {}  # name -> (bundle, why): an install a full disk kept off the journal
        self._installing_failed: tuple[str, str] | None = None  # (name, bundle) of the install that raised
        self._retry: asyncio.TimerHandle | None = None
        self._collect = True  # an install or removal happened: collect the chunks nothing lists any more
        self.http: HubHttp | None = None  # made for the first HTTP download (agent/http_transfer.py is not loaded idle)
        self.wake = asyncio.Event()  # the desired state changed (or a retry is due): run a pass
        self.load_errors: dict[str, str] = {}
        self.progress: dict[str, float] = {}
        self.transfer_errors: dict[str, str] = {}  # bundle -> what keeps its download from progressing
        self._warm: dict[str, WorkerProcess] = {}  # health-checked workers, handed over on activation
        self.on_listen: Callable[[WorkerProcess], None] | None = None  # set by the agent (its Unix socket's regions)
        self._fetches: dict[str, BundleFetch] = {}
        self._installing: tuple[str, str] | None = None  # (name, bundle) of the install under way
        self._installing_shadow = False  # ... into a shadow slot
        self.install_task: asyncio.Task[Entry] | None = None
        self.hold = Hold()  # an application's hold on installs (agent/deferral.py)
        self.packages: dict[str, Package] = {}  # bundle -> the offline package it installs from (agent/offline.py)

    def make_installer(self, data_dir: Path, health: HealthHook | None, bake: BakeHook | None = None) -> Installer:
        """An installer under ``data_dir`` with this agent's root, chunk store, limits and clock: live or shadow."""
        return Installer(data_dir, self.trust.root, self.chunks, self.runner_cache, self.health_timeout,
                         self._on_install, health=health, bake=bake, limits=self.limits, clock=self.clock)

    def set_hold(self, hold: Hold) -> None:
        """Apply an application's hold (or its release): the pass after it ends installs what waited."""
        self.hold = hold
        self.wake.set()  # the pass after it schedules the wake for the hold's end (_schedule_retries)
        self.changed()

    # --- facts and passes ----------------------------------------------------------------------

    def module_facts(self) -> dict[str, ModuleFacts]:
        names = {*self.installer.installed_names(), *self.front.active, *self.installer.journal.entries}
        facts = {}
        for name in names:
            entry, active = self.installer.journal.get(name), self.front.active.get(name)
            facts[name] = ModuleFacts(current=self.installer.current(name), active=active.bundle if active else None,
                                      journal=entry.state if entry else None,
                                      journal_bundle=entry.bundle if entry else None,
                                      journal_retry=entry.retry if entry else 0,
                                      retry_at=entry.retry_at if entry else 0.0,
                                      config=self.installer.current_config(name),
                                      active_config=active.config if active else "",
                                      journal_config=entry.config if entry else "")
        return facts

    async def start(self) -> None:
        """Recover interrupted installs and serve every installed module (before the session connects)."""
        if self.isolation == "process":
            clear_run_dir(self.data_dir / RUN_DIR)
        await self.installer.recover()
        for name in self.installer.installed_names():
            await self.activate(name)
        if self.shadows.dir.exists():
            await self.shadows.installer.recover()
            for m in self.trust.desired.modules if self.trust.desired else []:  # candidates a restart stopped
                if m.shadow is not None and self.shadows.installer.current(m.name) == m.shadow.bundle:
                    await self.shadows.start(m.name, m.shadow)

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
                await self.carry_out(step(self.clock(), state, self.module_facts(), Facts(hold_until=self.hold.until),
                                          shadows=self.shadows.facts()),
                                     state)
                if self._collect:
                    await self.collect_chunks()
                self.storage_error = ""
            except Exception as exc:  # e.g. a full disk: settle the journal, keep serving, try again later
                if is_disk_full(exc):
                    if self._installing_failed:
                        (name, bundle), self._installing_failed = self._installing_failed, None
                        self.blocked[name] = (bundle, f"disk full: the install cannot even be recorded ({exc}); "
                                                      f"trying again in {self.limits.retry_s:g}s")
                    self.storage_error = f"disk full: {exc}"
                    log.error("%s: reconcile stopped by a full disk (%s); retrying in %gs", self.identity.device_id,
                              exc, self.limits.retry_s)
                else:
                    log.exception("%s: reconcile failed; retrying in %gs", self.identity.device_id,
                                  self.limits.retry_s)
                with contextlib.suppress(Exception):
                    await self.installer.recover()
                self._wake_at(self.clock() + self.limits.retry_s)
                self.changed()
            self._schedule_retries()

    async def collect_chunks(self) -> None:
        """Delete the chunks, cached releases and partial downloads of versions no longer kept (``agent/gc.py``)."""
        self._collect = False
        try:
            await asyncio.to_thread(collect_chunks, self.installer.modules_dir, self.data_dir / MANIFESTS_DIR,
                                    self.data_dir / PARTIAL_DIR, self.chunks,
                                    still_wanted(self.trust.desired, self.module_facts()))
        except OSError as exc:
            log.warning("%s: chunk collection failed: %s", self.identity.device_id, exc)

    def _schedule_retries(self) -> None:
        """Wake for the earliest install the environment stopped (retried from its ``retry_at``), or for the end
        of an application's hold on installs."""
        if (when := next_retry(self.trust.desired, self.module_facts(), self.shadows.facts())) is not None:
            self._wake_at(when)
        if self.hold.until > self.clock():
            self._wake_at(self.hold.until + 0.01)

    def _wake_at(self, when: float) -> None:
        self._retry = wake_at(self._retry, when - self.clock(), self.wake)

    async def carry_out(self, actions: list[Action], state: DesiredState | None = None) -> None:
        """Do ``actions`` in order; stop when a newer desired state than ``state`` arrives (the next pass has it)."""
        for action in actions:
            if state is not None and self.trust.desired is not state:
                return
            if isinstance(action, Remove):
                self.deactivate(action.name)
                self.installer.remove(action.name)
                self._collect = True
                self.changed()
            elif isinstance(action, Activate):
                await self.activate(action.name)
            elif isinstance(action, SetCollectRate):
                if action.name in self.front.active:
                    self.front.set_collect_rate(self.front.active[action.name], action.ppm)
            elif isinstance(action, Install):
                await self._install(action.module)
            elif isinstance(action, Reconfigure):
                await self._reconfigure(action.module)
            elif isinstance(action, ResumeBake):
                await self._resume_bake(action.name)
            elif isinstance(action, CancelInstall):
                self._cancel(action)
            elif isinstance(action, InstallShadow):
                await self._install(action.module, shadow=True)
                self.wake.set()  # the next pass starts it (or, failed, leaves it)
            elif isinstance(action, StartShadow):
                await self.shadows.start(action.name, action.spec)
                self.changed()
            elif isinstance(action, RemoveShadow):
                await self.shadows.remove(action.name)
                self.changed()
            elif isinstance(action, Report):
                self.changed()

    def on_desired(self, state: DesiredState) -> None:
        """A newer desired state was accepted: cancel a download it no longer wants, and run a pass."""
        installer = self.shadows.installer if self._installing_shadow else self.installer
        entry = installer.journal.get(self._installing[0]) if self._installing else None
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

    async def _install(self, m: DesiredModule, shadow: bool = False) -> None:
        """Install ``m``: the live version of its module, or (``shadow``) a candidate in its shadow slot."""
        installer = self.shadows.installer if shadow else self.installer
        fetch: BundleFetch | HttpBundleFetch | PackageFetch
        if m.bundle in self.packages:  # an offline package carries it: verified like a download, read from the file
            fetch = PackageFetch(self.packages[m.bundle], m, self.trust.root, self.chunks, self.data_dir / MANIFESTS_DIR,
                                 self.reject, lambda f: self._set_progress(m.bundle, f), self.clock, self.limits)
        elif self.transfer == "http":
            from agent.http_transfer import HttpBundleFetch, HubHttp

            if self.http is None:
                assert self.hub_url is not None
                # a body read waits at most the slow-retrieval window for its next bytes
                timeout = min(30.0, self.limits.window_s) if self.limits.window_s > 0 else 30.0
                self.http = HubHttp(self.hub_url, self.identity.device_id, self.identity.mqtt_password,
                                    self.identity.broker_ca, timeout=timeout)
            fetch = HttpBundleFetch(
                self.http, m, self.trust.root, self.chunks, self.data_dir / MANIFESTS_DIR,
                self.data_dir / PARTIAL_DIR, reject=self.reject, progress=lambda f: self._set_progress(m.bundle, f),
                note=lambda text: self._set_transfer_error(m.bundle, text), retry=self.blob_retry, clock=self.clock,
                limits=self.limits)
        else:
            fetch = BundleFetch(
                self.identity.device_id, m, self.trust.root, self.chunks, self.data_dir / MANIFESTS_DIR,
                publish=lambda t, p: self.client.publish(t, p, qos=1), reject=self.reject,
                progress=lambda f: self._set_progress(m.bundle, f), retry=self.blob_retry, clock=self.clock,
                limits=self.limits,
            )
            self._fetches[m.bundle] = fetch
        self._installing, self._installing_shadow = (m.name, m.bundle), shadow
        try:
            if isinstance(fetch, BundleFetch):
                await self.client.subscribe(fetch.topic)
            self.install_task = asyncio.create_task(installer.install(m, fetch.run))
            await asyncio.wait({self.install_task})  # not cancelled with it: a superseded download is
            if self.install_task.cancelled():
                entry = installer.journal.get(m.name)
                if entry is not None and entry.state in BEFORE_ACTIVATION:
                    installer.journal.drop(m.name)
                log.info("%s: download of %s %s superseded", self.identity.device_id, m.name, m.bundle[:12])
                return
            self._installing_failed = (m.name, m.bundle)
            entry = self.install_task.result()  # a full disk may raise here: the journal could not be written
            self._installing_failed = None
        finally:
            self._collect = True
            self._fetches.pop(m.bundle, None)
            self._installing, self.install_task = None, None
            self.progress.pop(m.bundle, None)
            self.transfer_errors.pop(m.bundle, None)
            if isinstance(fetch, BundleFetch):
                with contextlib.suppress(MqttOffline):
                    await self.client.unsubscribe(fetch.topic)
        if not shadow:
            await self._settle(m.name, entry)

    async def _reconfigure(self, m: DesiredModule) -> None:
        """A new configuration for the version installed: the installer's health gate, bake and rollback."""
        self._installing = (m.name, m.bundle)
        try:
            entry = await self.installer.reconfigure(m)
        finally:
            self._installing = None
        await self._settle(m.name, entry)

    async def _settle(self, name: str, entry: Entry) -> None:
        """After an install ends: serve what ``current`` points at (a bake may have served the new version)."""
        current = self.installer.current(name)
        active = self.front.active.get(name)
        if current is None:
            if entry.state == "failed":
                self.deactivate(name)
        elif entry.state in ("committed", "rolled_back") and (
                active is None or (active.bundle, active.config) != (current, self.installer.current_config(name))):
            await self.activate(name)
        await self._drop_unused_warm()

    async def _resume_bake(self, name: str) -> None:
        try:
            await self._settle(name, await self.installer.resume_bake(name))
        except Exception:  # the journal stays "baking": the next start tries again (and counts it)
            log.exception("%s: resuming the bake of %s failed", self.identity.device_id, name)

    async def _bake(self, inst: Installed, policy: BakePolicy) -> str:
        """The installer's bake: the new version serves; its error rate (or a crash loop) decides. "" commits."""
        from agent.bake import bake  # loaded when a deployment asks for a bake: the idle agent stays small

        return await bake(self.front.active, self.activate, self.load_errors, self.identity.device_id, inst, policy)

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
        self.blocked.pop(name, None)  # the journal is written again: it tells the state
        self.changed()

    # --- shutdown ------------------------------------------------------------------------------

    def tasks(self) -> list[asyncio.Task[Any]]:
        """What runs on the executor's behalf: the workload loops and the install under way."""
        tasks: list[asyncio.Task[Any]] = [m.task for m in self.front.active.values() if m.task]
        if self.install_task is not None:
            tasks.append(self.install_task)
        return tasks

    async def stop_workers(self) -> None:
        """Stop every serving runner's worker and every warm one."""
        await asyncio.gather(*(stop_runner(m.runner) for m in self.front.active.values()),
                             *(w.stop() for w in self._warm.values()), self.shadows.stop_all(), return_exceptions=True)
        self.front.active.clear()
        self._warm.clear()

    def close(self) -> None:
        if self.http is not None:
            self.http.close()
