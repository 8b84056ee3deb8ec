"""The device agent: one device, wired from its parts. Everything runs as tasks on the caller's event loop.

The parts (imports point one way, down this list):

- ``agent.session``: the MQTT session (subscriptions, inbound routing, presence);
- ``agent.reconcile``: the pure decisions (what to trust, what to do), no I/O;
- ``agent.executor``: carries out the decisions (install, activate, bake, remove);
- ``agent.inference``: the modules serving and every inference through them;
- ``agent.reporter``: reported state, telemetry and the outbox;
- ``agent.localapi``: HTTP on 127.0.0.1, on the inference front through :class:`agent.localapi.Host`.

This file persists what the pure core decides (the root in ``identity.json``, the desired state in
``state.json``) and keeps the public surface (``run``, ``stop``, ``snapshot``, ``active``, ``revision``, …).
Inbound messages are checked before they are acted on; anything malformed or unverifiable is logged,
counted in ``rejected`` and ignored, and the modules already running keep serving. The simulator runs
thousands of agents in one process on one loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import platform
import time
from collections import Counter
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import deferral
from agent.diagnostics import DEVICE, Diagnostics
from agent.executor import Executor
from agent.identity import Identity, check_hub_url, save_identity
from agent.inference import ActiveModule, Answered, InferenceFront
from agent.install import Installer
from agent.journal import atomic_write_json
from agent.limits import DownloadLimits
from agent.localapi import LocalApi
from agent.outbox import Outbox
from agent.reconcile import Accepted, RootTrusted, Trust, TrustEvent
from agent.reporter import Reporter
from agent.session import ClientFactory, Handlers, Session, default_client_factory, last_will
from agent.workerproc import WorkerSandbox
from modules.store import ContentStore
from protocol.encoding import ProtocolError
from protocol.messages import Command, DesiredState, ReportedState, decode
from protocol.signing import Root, parse_envelope
from protocol.topics import Channel

if TYPE_CHECKING:  # both load NumPy: the runners only with in-process isolation, the workload only when asked for
    from agent.apitokens import ApiTokens
    from agent.http_transfer import HubHttp
    from agent.supervisor import Reply
    from agent.workload import Workload
    from modules.runners import Batch, Runner

log = logging.getLogger("edgefleet.agent")

AGENT_VERSION = "0.1.0"
STATE_FILE = "state.json"
# "process": each module in its own supervised worker process (the daemon's default);
# "inprocess": runners on the event loop thread, shareable across agents (the simulator's thousands of agents).
ISOLATION_MODES = ("process", "inprocess")
# "mqtt": chunks on the blob topics (the default); "http": from the hub's device routes (agent/http_transfer.py)
TRANSFER_MODES = ("mqtt", "http")


class Agent:
    """One device. ``await run()`` until ``await stop()``; ``snapshot()`` for a summary at any time."""

    def __init__(
        self,
        identity: Identity,
        data_dir: Path,
        *,
        mqtt_url: str | None = None,
        mqtt_client_factory: ClientFactory = default_client_factory,
        clock: Callable[[], float] = time.time,
        workload: Workload | None = None,
        telemetry_interval: float = 5.0,
        runner_cache: MutableMapping[str, Runner] | None = None,
        health_timeout: float = 30.0,
        outbox_rows: int = 10_000,
        outbox: Outbox | None = None,
        blob_retry: float = 3.0,
        facts: dict[str, str] | None = None,
        isolation: str = "inprocess",
        module_limits: dict[str, int] | None = None,
        api_port: int = 0,
        transfer: str = "mqtt",
        hub_url: str | None = None,
        max_defer_s: float = 3600.0,
        limits: DownloadLimits | None = None,
        api_tokens: ApiTokens | None = None,
        api_socket: Path | None = None,
        api_group: str | None = None,
        module_sandbox: WorkerSandbox | None = None,
    ) -> None:
        if isolation not in ISOLATION_MODES:
            raise ValueError(f"isolation must be one of {ISOLATION_MODES}, not {isolation!r}")
        if transfer not in TRANSFER_MODES:
            raise ValueError(f"transfer must be one of {TRANSFER_MODES}, not {transfer!r}")
        self.transfer = transfer
        self.hub_url = hub_url or identity.hub_url
        if transfer == "http":
            if not self.hub_url:
                raise ValueError("--transfer http needs the hub's URL: this identity predates it (enrolled by an"
                                 " older agent); pass --hub-url or enrol again")
            check_hub_url(self.hub_url)
        self.isolation = isolation
        self.module_limits = module_limits or {}  # worker rlimits: memory_mb, cpu_seconds
        self.api_port = api_port
        self.max_defer_s = max_defer_s  # the longest an application may hold installs (agent/deferral.py)
        self.health_timeout = health_timeout
        self.identity = identity
        self.device_id = identity.device_id
        self.data_dir = Path(data_dir).absolute()  # workers in a sandbox start elsewhere: no relative paths
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.clock = clock
        self.telemetry_interval = telemetry_interval
        self.blob_retry = blob_retry
        self.facts = {
            "agent": AGENT_VERSION, "python": platform.python_version(), "os": platform.system(),
            "machine": platform.machine(), "runtimes": "onnx,python", **(facts or {}),
        }
        self.rejected: Counter[str] = Counter()
        self.trust = self._load_trust(identity)
        self.front = InferenceFront(self.device_id, clock, self.rejected, workload)
        # the simulator hands every agent a view of one shared database (simulator/outbox.py): a file per
        # device would cost three open files and a fsync'd creation each
        self.outbox = outbox if outbox is not None else Outbox(self.data_dir / "outbox.db", max_rows=outbox_rows)
        self.client = mqtt_client_factory(self.device_id, identity.broker(mqtt_url), last_will(self.device_id))
        self._tasks: set[asyncio.Task[Any]] = set()
        self.session = Session(self.device_id, self.client, clock, self.rejected, self._spawn)
        self._report_dirty = asyncio.Event()
        self.executor = Executor(
            identity, self.data_dir, self.trust, self.front, self.client, reject=self.session.reject,
            changed=self._report_dirty.set, spawn=self._spawn, clock=clock, isolation=isolation,
            module_limits=self.module_limits, health_timeout=health_timeout, telemetry_interval=telemetry_interval,
            transfer=transfer, hub_url=self.hub_url, blob_retry=blob_retry, runner_cache=runner_cache,
            limits=limits, sandbox=module_sandbox)
        self.executor.installer.facts = self.facts  # runners pick their accelerator from them (modules/accel.py)
        self.reporter = Reporter(self.session, self.outbox, self.trust, self.front, self.executor, self.facts,
                                 self.rejected, clock, telemetry_interval, self._report_dirty)
        self._stopping = asyncio.Event()
        self.started = asyncio.Event()  # run() recovered, started connecting and spawned its loops
        self._stopped = asyncio.Event()
        # the local API: TCP on 127.0.0.1 (per-app tokens when given), and/or a Unix socket (its mode is the guard)
        self.apis: list[LocalApi] = [*([LocalApi(self, port=api_port, tokens=api_tokens)] if api_port else []),
                                     *([LocalApi(self, path=api_socket, group=api_group)] if api_socket else [])]
        # the regions a uid registers on the Unix socket reach each worker taking its direct socket (agent.shmem)
        self.executor.on_listen = next((api.share_regions for api in self.apis if api.path is not None), None)
        self.diagnostics = Diagnostics(self)
        self._running = False

    # --- the parts' state, as the agent's -------------------------------------------------------

    @property
    def api(self) -> LocalApi | None:
        """The TCP listener of the local API, if on."""
        return next((a for a in self.apis if a.path is None), None)

    @property
    def root(self) -> Root:
        return self.trust.root

    @property
    def revision(self) -> int:
        return self.trust.revision

    @property
    def desired(self) -> DesiredState | None:
        return self.trust.desired

    @property
    def desired_error(self) -> str:
        return self.trust.desired_error

    @property
    def active(self) -> dict[str, ActiveModule]:
        return self.front.active

    @property
    def inferences(self) -> int:
        return self.front.inferences

    @property
    def workload(self) -> Workload | None:
        return self.front.workload

    @workload.setter
    def workload(self, workload: Workload | None) -> None:
        self.front.workload = workload

    @property
    def installer(self) -> Installer:
        return self.executor.installer

    @property
    def chunks(self) -> ContentStore:
        return self.executor.chunks

    @property
    def http(self) -> HubHttp | None:
        return self.executor.http

    @property
    def hub_online(self) -> bool | None:
        return self.session.hub.online

    # --- persistence -----------------------------------------------------------------------------

    def _load_trust(self, identity: Identity) -> Trust:
        """The pinned root plus the applied desired state and release policy from ``state.json``: the revision
        floor and the policy survive a restart (a floor is reset only by a root that drops the state's signer)."""
        path = self.data_dir / STATE_FILE
        if path.exists():
            try:
                raw = json.loads(path.read_text())
                # Verified when it was accepted; re-checking expiry here would strand a device that rebooted.
                return Trust(self.device_id, identity.root, raw.get("desired") or None, raw.get("policy") or None)
            except (ValueError, KeyError, TypeError, AttributeError, ProtocolError) as exc:
                log.error("%s: %s unreadable (%s); waiting for a fresh desired state", self.device_id, path, exc)
        return Trust(self.device_id, identity.root)

    def _save_state(self, envelope: Any) -> None:
        atomic_write_json(self.data_dir / STATE_FILE, {"revision": self.trust.revision, "desired": envelope,
                                                       "policy": self.trust.state.policy_envelope})

    def _on_signed_command(self, topic: str, envelope: dict[str, Any]) -> None:
        """A diagnostic command signed by the director (agent/diagnostics.py): answered once, refusals counted."""
        async def send() -> None:
            try:
                reply = await self.diagnostics.answer(envelope, self.clock())
            except ProtocolError as exc:
                self.session.reject("cmd", topic, str(exc))
                return
            if reply is not None:
                await self.session.reply(Channel.CMD_RES, reply.encode())
        self._spawn(send())

    def _persist_state(self, envelope: Any) -> None:
        """Save the accepted state; on a full disk it is applied from memory and saved once there is room (a restart
        meanwhile falls back to the state saved before it, and the hub's retained copy brings it again)."""
        try:
            self._save_state(envelope)
        except OSError as exc:
            log.error("%s: desired state not saved (%s): applied anyway, saving again in %gs", self.device_id, exc,
                      self.executor.limits.retry_s)
            self.executor.storage_error = f"disk full: the desired state cannot be saved ({exc})"
            asyncio.get_running_loop().call_later(self.executor.limits.retry_s, self._save_later, envelope)

    def _save_later(self, envelope: Any) -> None:
        if self.trust.desired is not None and self._running and envelope is self.trust.state.applied:
            self._persist_state(envelope)

    # --- lifecycle -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Recover interrupted installs, connect, and serve until :meth:`stop`."""
        self._running = True
        DEVICE.set(self.device_id)  # this task's (and its children's) log records are this device's
        try:
            await self.executor.start()
            await self.session.start(Handlers(desired=self._on_desired, root=self._on_root, command=self._on_command,
                                              blob=self.executor.on_blob, connected=self.reporter.connected))
            for api in list(self.apis):
                try:
                    await api.start()
                except (OSError, LookupError) as exc:  # the port is taken, no such group: MQTT still serves
                    log.error("%s: local API not started on %s: %s", self.device_id, api.path or api.port, exc)
                    self.apis.remove(api)
            self._spawn(self.executor.loop(), self.reporter.report_loop(), self.reporter.telemetry_loop(),
                        self.reporter.drain_loop())
            self.executor.wake.set()  # reconcile against the persisted desired state straight away
            self.started.set()
            await self._stopping.wait()
        finally:
            await self._shutdown()

    async def stop(self) -> None:
        self._stopping.set()
        if self._running:
            await self._stopped.wait()

    def _spawn(self, *coros: Any) -> None:
        for coro in coros:
            task = asyncio.create_task(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)  # short-lived ones (replies, announcements) go away

    async def _shutdown(self) -> None:
        self.diagnostics.close()
        try:
            for api in self.apis:
                await api.stop()
            tasks = [*self._tasks, *self.executor.tasks()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.executor.stop_workers()
            await self.session.close()
            self.executor.close()
            self.outbox.close()
        finally:  # stop() waits on this: set it whatever went wrong above
            self._running = False
            self._stopped.set()

    # --- inbound: what the pure core decided, persisted and acted on -------------------------------

    def _on_desired(self, topic: str, payload: bytes) -> None:
        self._apply(topic, self.trust.on_desired(payload, self.clock()))

    def _on_root(self, topic: str, version: int, payload: bytes) -> None:
        self._apply(topic, self.trust.on_root(version, payload, self.clock()))

    def _apply(self, topic: str, events: list[TrustEvent]) -> None:
        for event in events:
            if isinstance(event, RootTrusted):
                # Persisted (atomic write) before anything acts on it, so a restart never falls back to a revoked
                # key set; a desired state accepted on the re-check after it comes next, and is saved after it.
                self.identity = dataclasses.replace(self.identity, root=event.envelope)
                save_identity(self.data_dir, self.identity)
                self.executor.installer.root = event.root
                self.executor.shadows.set_root(event.root)
                log.warning("%s: now trusting root version %d%s", self.device_id, event.root.version,
                            " (the applied state's signer is gone: revision floor reset)" if event.floor_reset else "")
                self._report_dirty.set()
            elif isinstance(event, Accepted):
                self._persist_state(event.envelope)
                log.info("%s: accepted desired revision %d (%d modules)%s", self.device_id, event.state.revision,
                         len(event.state.modules), " held until a root update" if event.recheck else "")
                self.executor.on_desired(event.state)
                self._report_dirty.set()
            else:
                if not event.recheck:
                    self.session.reject(event.kind, topic, event.reason)
                if event.kind == "desired":
                    self._report_dirty.set()

    def _on_command(self, topic: str, payload: bytes) -> None:
        try:  # an envelope ({"signed", "signatures"}) is a signed diagnostic command; anything else a Command
            doc = parse_envelope(payload)
        except ProtocolError:
            doc = None
        if isinstance(doc, dict) and "signed" in doc:
            self._on_signed_command(topic, doc)
            return
        try:
            cmd = decode(Channel.CMD, payload)
        except ProtocolError as exc:
            self.session.reject("cmd", topic, str(exc))
            return
        assert isinstance(cmd, Command)

        async def send() -> None:
            reply = await self.front.command(cmd, self.trust.revision)
            await self.session.reply(Channel.CMD_RES, reply.encode())
        self._spawn(send())

    # --- inference (agent.localapi.Host) and reporting --------------------------------------------

    async def infer(self, active: ActiveModule, batch: Batch) -> Batch:
        return await self.front.infer(active, batch)

    async def infer_json(self, active: ActiveModule, body: bytes) -> bytes:
        return await self.front.infer_json(active, body)

    def infer_json_now(self, active: ActiveModule, body: bytes, done: Answered) -> bool:
        return self.front.infer_json_now(active, body, done)

    def add_labels(self, body: bytes) -> int:
        """Ground truth from an application (``POST /v1/labels``), sent with the next data batch."""
        return self.front.add_labels(body)
    async def infer_form(self, active: ActiveModule, form: dict[str, Any], body: bytes) -> Reply:
        return await self.front.infer_form(active, form, body)

    def infer_form_now(self, active: ActiveModule, form: dict[str, Any], body: bytes,
                       done: Callable[[Reply | None, Exception | None], None]) -> bool:
        return self.front.infer_form_now(active, form, body, done)

    def reported(self) -> ReportedState:
        return self.reporter.reported()

    def flush_telemetry(self) -> None:
        """Queue this interval's telemetry (and sampled data) in the outbox."""
        self.reporter.flush_telemetry()

    def health(self) -> dict[str, float]:
        return self.reporter.health()

    def worker_stats(self) -> dict[str, float]:
        return self.reporter.worker_stats()

    def snapshot(self) -> dict[str, Any]:
        return self.reporter.snapshot()

    def defer(self, seconds: float | None, reason: str = "") -> tuple[dict[str, Any], str | None]:
        """An application's hold on installs (None: release it): (the hold now, why refused or None)."""
        now = self.clock()
        if seconds is None:
            held, why = deferral.release(self.executor.hold, now), None
        else:
            held, why = deferral.request(self.executor.hold, now, seconds, self.max_defer_s, reason)
        if why is None:
            self.executor.set_hold(held)
            log.info("%s: installs %s", self.device_id, f"held until {held.until:.0f} ({held.reason or 'no reason'})"
                     if held.active(now) else "no longer held")
        return self.hold_view(), why

    def hold_view(self) -> dict[str, Any]:
        held, now = self.executor.hold, self.clock()
        return {"held": held.active(now), "until": held.until if held.active(now) else None, "reason": held.reason,
                "max_until": held.since + self.max_defer_s if held.active(now) else None,
                "max_defer_s": self.max_defer_s}
