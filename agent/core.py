"""The device agent: one device's MQTT session, reconciler, installs, inference and reporting.

Everything runs as tasks on the caller's event loop, so the simulator can run
thousands of agents in one process. Inbound messages are checked before they
are acted on; anything malformed or unverifiable is logged, counted in
``rejected`` and ignored, and the modules already running keep serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import platform
import random
import time
from collections import Counter
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from agent.identity import Identity, check_hub_url, save_identity
from agent.install import BEFORE_ACTIVATION, Entry, Installed, Installer, atomic_write_json
from agent.localapi import LocalApi
from agent.mqtt import AsyncMqttClient, MessageHandler, MqttOffline, Will
from agent.outbox import Outbox
from agent.procstat import CpuMeter, ProcessGone, rss_bytes
from agent.stats import ModuleStats
from agent.supervisor import ModuleWorker, WorkerProcess, health_check_in_worker
from agent.transfer import MANIFESTS_DIR, BundleFetch
from modules.errors import InputError
from modules.store import ContentStore
from protocol.broker_url import BrokerURL
from protocol.encoding import ProtocolError, digest_of, parse_json
from protocol.messages import (
    BakePolicy,
    Command,
    CommandReply,
    DataBatch,
    DataRecord,
    DesiredModule,
    DesiredState,
    HubStatus,
    ModuleReport,
    ReportedState,
    Status,
    TelemetryBatch,
    TelemetryPoint,
    decode,
    validate,
)
from protocol.signing import parse_envelope, update_root
from protocol.topics import (
    HUB_STATUS_TOPIC,
    BlobTopic,
    Channel,
    device_topic,
    parse_root_topic,
    parse_topic,
    root_wildcard,
)
from protocol.verify import accept_desired

if TYPE_CHECKING:  # both load NumPy: the runners only with in-process isolation, the workload only when asked for
    from agent.bake import BakeWatch
    from agent.http_transfer import HubHttp
    from agent.workload import Workload
    from modules.runners import Batch, Runner

log = logging.getLogger("edgefleet.agent")

AGENT_VERSION = "0.1.0"
STATE_FILE = "state.json"
RUN_DIR = "run"  # each module's direct socket, <module>.sock, served by its worker (process isolation)
RETRY_AFTER_ERROR = 30.0
MAX_PENDING_ROOTS = 64  # root versions held while waiting for the one before them


class MqttClient(Protocol):
    """What the agent needs from an MQTT session (``AsyncMqttClient`` or a test double)."""

    connected: asyncio.Event
    on_message: MessageHandler | None
    on_connect: Callable[[], None] | None

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None: ...
    async def subscribe(self, topic: str, qos: int = 1) -> None: ...
    async def unsubscribe(self, topic: str) -> None: ...


ClientFactory = Callable[[str, BrokerURL, Will], MqttClient]
# "process": each module in its own supervised worker process (the daemon's default);
# "inprocess": runners on the event loop thread, shareable across agents (the simulator's thousands of agents).
ISOLATION_MODES = ("process", "inprocess")
# "mqtt": chunks on the blob topics (the default); "http": from the hub's device routes (agent/http_transfer.py)
TRANSFER_MODES = ("mqtt", "http")
PARTIAL_DIR = "downloads"  # chunks cut short during an HTTP download, resumed with a Range request


def default_client_factory(client_id: str, broker: BrokerURL, will: Will) -> MqttClient:
    return AsyncMqttClient(client_id, broker, will=will)


@dataclass
class ActiveModule:
    """A committed module version, loaded and serving."""

    name: str
    bundle: str
    version: int
    runner: Runner | ModuleWorker
    collect_rate_ppm: int
    stats: ModuleStats = field(default_factory=ModuleStats)
    task: asyncio.Task[None] | None = None
    bake: BakeWatch | None = None  # set while this version is on probation


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
        self.http: HubHttp | None = None  # made for the first HTTP download (agent/http_transfer.py is not loaded idle)
        self.isolation = isolation
        self.module_limits = module_limits or {}  # worker rlimits: memory_mb, cpu_seconds
        self.api_port = api_port
        self.health_timeout = health_timeout
        self.identity = identity
        self.device_id = identity.device_id
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.root = identity.trusted_root()
        self.clock = clock
        self.workload = workload
        self.telemetry_interval = telemetry_interval
        self.blob_retry = blob_retry
        self.facts = {
            "agent": AGENT_VERSION, "python": platform.python_version(), "os": platform.system(),
            "machine": platform.machine(), "runtimes": "onnx,python", **(facts or {}),
        }
        self.chunks = ContentStore(self.data_dir / "chunks")
        self.installer = Installer(self.data_dir, self.root, self.chunks, runner_cache, health_timeout, self._on_install,
                                   health=self._health_in_worker if isolation == "process" else None, bake=self._bake)
        self._warm: dict[str, WorkerProcess] = {}  # health-checked workers, handed over on activation
        # the simulator hands every agent a view of one shared database (simulator/outbox.py): a file per
        # device would cost three open files and a fsync'd creation each
        self.outbox = outbox if outbox is not None else Outbox(self.data_dir / "outbox.db", max_rows=outbox_rows)
        will: Will = (self._topic(Channel.STATUS), Status(device=self.device_id, online=False).encode(), 1, True)
        self.client = mqtt_client_factory(self.device_id, identity.broker(mqtt_url), will)

        self.rejected: Counter[str] = Counter()
        self.active: dict[str, ActiveModule] = {}
        self.revision = 0
        self.desired: DesiredState | None = None
        self.desired_error = ""
        self._desired_digest = ""
        self._load_state()
        self._progress: dict[str, float] = {}
        self._transfer_errors: dict[str, str] = {}  # bundle -> what keeps its download from progressing
        self._load_errors: dict[str, str] = {}
        self._fetches: dict[str, BundleFetch] = {}
        self._installing: tuple[str, str] | None = None  # (name, bundle) of the install under way
        self._install_task: asyncio.Task[Entry] | None = None
        self._data: list[DataRecord] = []
        self._rng = random.Random(workload.seed if workload else None)  # which inferences are sampled
        self._desired_changed = asyncio.Event()
        self._report_dirty = asyncio.Event()
        self._outbox_ready = asyncio.Event()
        self._stopping = asyncio.Event()
        self._stopped = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.inferences = 0  # lifetime, across module versions
        # None: no hub presence heard yet (an older hub): send. Otherwise send only while the hub says online.
        self.hub_online: bool | None = None
        self._hub_changed = asyncio.Event()
        self._pending_roots: dict[int, Any] = {}
        self._cpu: dict[int, CpuMeter] = {}  # per worker pid: CPU % since the previous telemetry
        self.api: LocalApi | None = LocalApi(self, port=api_port) if api_port else None
        self._running = False

    # --- persistence -------------------------------------------------------------------------

    def _topic(self, channel: Channel) -> str:
        return device_topic(self.device_id, channel)

    def _load_state(self) -> None:
        path = self.data_dir / STATE_FILE
        if not path.exists():
            return
        try:
            raw = json.loads(path.read_text())
            self.revision = int(raw.get("revision", 0))
            if raw.get("desired"):
                # Verified when it was accepted; re-checking expiry here would strand a device that rebooted.
                self.desired = validate(DesiredState, raw["desired"]["signed"])  # type: ignore[assignment]
                self._desired_digest = digest_of(raw["desired"])
        except (ValueError, KeyError, TypeError, ProtocolError) as exc:
            log.error("%s: %s unreadable (%s); waiting for a fresh desired state", self.device_id, path, exc)

    def _save_state(self, envelope: Any) -> None:
        atomic_write_json(self.data_dir / STATE_FILE, {"revision": self.revision, "desired": envelope})

    # --- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Recover interrupted installs, connect, and serve until :meth:`stop`."""
        self._running = True
        try:
            if self.isolation == "process":
                self._clear_run_dir()
            await self.installer.recover()
            for name in self.installer.installed_names():
                await self._activate(name)
            self.client.on_message = self._on_message
            self.client.on_connect = self._on_connected
            await self.client.subscribe(self._topic(Channel.DESIRED))
            await self.client.subscribe(self._topic(Channel.CMD))
            await self.client.subscribe(HUB_STATUS_TOPIC)
            await self.client.subscribe(root_wildcard())
            await self.client.start()
            if self.api is not None:
                try:
                    await self.api.start()
                except OSError as exc:  # e.g. the port is taken: the device still serves over MQTT
                    log.error("%s: local API not started on port %d: %s", self.device_id, self.api_port, exc)
                    self.api = None
            self._spawn(self._reconcile_loop(), self._report_loop(), self._telemetry_loop(), self._drain_loop())
            self._desired_changed.set()  # reconcile against the persisted desired state straight away
            await self._stopping.wait()
        finally:
            await self._shutdown()

    async def stop(self) -> None:
        self._stopping.set()
        if self._running:
            await self._stopped.wait()

    def _clear_run_dir(self) -> None:
        """Sockets a killed agent's workers left behind: nobody answers on them; the workers started now bind afresh."""
        run = self.data_dir / RUN_DIR
        run.mkdir(mode=0o750, exist_ok=True)
        for stale in run.glob("*.sock"):
            stale.unlink(missing_ok=True)

    def _spawn(self, *coros: Any) -> None:
        for coro in coros:
            task = asyncio.create_task(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)  # short-lived ones (replies, announcements) go away

    async def _shutdown(self) -> None:
        try:
            await self._release()
        finally:  # stop() waits on this: set it whatever went wrong above
            self._running = False
            self._stopped.set()

    async def _release(self) -> None:
        if self.api is not None:
            await self.api.stop()
        tasks = [*self._tasks, *(m.task for m in self.active.values() if m.task)]
        if self._install_task is not None:
            tasks.append(self._install_task)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(self._stop_runner(m.runner) for m in self.active.values()),
                             *(w.stop() for w in self._warm.values()), return_exceptions=True)
        self.active.clear()
        self._warm.clear()
        if self.client.connected.is_set():
            # A clean disconnect suppresses the last will, so say "offline" ourselves.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.client.publish(
                    self._topic(Channel.STATUS), Status(device=self.device_id, online=False, ts=self.clock()).encode(),
                    qos=1, retain=True), 3.0)
        await self.client.stop()
        if self.http is not None:
            self.http.close()
        self.outbox.close()

    def _on_connected(self) -> None:
        async def announce() -> None:
            with contextlib.suppress(MqttOffline, TimeoutError):
                await asyncio.wait_for(self.client.publish(
                    self._topic(Channel.STATUS), Status(device=self.device_id, online=True, ts=self.clock()).encode(),
                    qos=1, retain=True), 10.0)
        self._spawn(announce())
        if self.hub_online is not None:
            # A restarted broker forgets the retained "online": wait for the hub to say it again.
            self.hub_online = False
        self._report_dirty.set()  # the hub may have missed changes while we were away
        self._outbox_ready.set()

    # --- inbound -----------------------------------------------------------------------------

    def _reject(self, key: str, topic: str, reason: str) -> None:
        self.rejected[key] += 1
        log.warning("%s: rejected message on %s: %s", self.device_id, topic, reason)

    def _on_message(self, topic: str, payload: bytes) -> None:
        if topic == HUB_STATUS_TOPIC:
            self._on_hub_status(topic, payload)
            return
        root_version = parse_root_topic(topic)
        if root_version is not None:
            self._on_root(topic, root_version, payload)
            return
        try:
            parsed = parse_topic(topic)
        except ProtocolError as exc:
            self._reject("topic", topic, str(exc))
            return
        if isinstance(parsed, BlobTopic):
            fetch = self._fetches.get(parsed.bundle_digest)
            if fetch is not None:
                fetch.on_part(parsed.part, payload)
            return
        if parsed.device_id != self.device_id:
            self._reject(parsed.channel.value, topic, f"topic is for device {parsed.device_id!r}")
        elif parsed.channel == Channel.DESIRED:
            self._on_desired(topic, payload)
        elif parsed.channel == Channel.CMD:
            self._on_command(topic, payload)

    def _on_desired(self, topic: str, payload: bytes) -> None:
        try:
            envelope = parse_envelope(payload)
            digest = digest_of(envelope)
            if digest == self._desired_digest:
                return  # the retained copy of the state already applied (re-sent on every reconnect)
            state = accept_desired(envelope, self.root, self.device_id, self.revision, now=self.clock())
        except ProtocolError as exc:
            self._refuse_desired(topic, str(exc))
            return
        except (ValueError, TypeError, KeyError, AttributeError) as exc:  # shapes the schema checks never reached
            self._refuse_desired(topic, f"malformed desired state: {exc!r}")
            return
        self.revision, self.desired, self._desired_digest, self.desired_error = state.revision, state, digest, ""
        self._save_state(envelope)
        log.info("%s: accepted desired revision %d (%d modules)", self.device_id, state.revision, len(state.modules))
        self._cancel_superseded_download(state)
        self._desired_changed.set()
        self._report_dirty.set()

    def _on_hub_status(self, topic: str, payload: bytes) -> None:
        if not payload:  # the retained status was cleared: no hub announces presence, send when connected
            self.hub_online = None
            self._hub_changed.set()
            return
        try:
            status = validate(HubStatus, parse_json(payload, 4096))
        except ProtocolError as exc:
            self._reject("hub-status", topic, str(exc))
            return
        assert isinstance(status, HubStatus)
        self.hub_online = status.online
        self._hub_changed.set()

    def _on_root(self, topic: str, version: int, payload: bytes) -> None:
        """Hold a root version; apply every consecutive one after the trusted root, one version at a time."""
        if version <= self.root.version or not payload:
            return  # the retained history, re-sent on every connect (or a cleared retained message)
        if len(self._pending_roots) >= MAX_PENDING_ROOTS and version not in self._pending_roots:
            self._reject("root", topic, f"more than {MAX_PENDING_ROOTS} root versions pending")
            return
        try:
            self._pending_roots[version] = parse_envelope(payload)
        except ProtocolError as exc:
            self._reject("root", topic, str(exc))
            return
        while (nxt := self.root.version + 1) in self._pending_roots:
            envelope = self._pending_roots.pop(nxt)
            try:
                new = update_root(self.root, envelope, now=self.clock())
                if new.version != nxt:
                    raise ProtocolError(f"root on the topic for version {nxt} is version {new.version}")
            except ProtocolError as exc:
                self._reject("root", topic, f"root version {nxt} refused: {exc}")
                continue
            self._trust_root(new.document, new)

    def _trust_root(self, envelope: Any, root: Any) -> None:
        # Persisted before use (atomic write), so a restart never falls back to a revoked key set.
        self.identity = dataclasses.replace(self.identity, root=envelope)
        save_identity(self.data_dir, self.identity)
        self.root = self.installer.root = root
        log.warning("%s: now trusting root version %d", self.device_id, root.version)
        self._pending_roots = {v: e for v, e in self._pending_roots.items() if v > root.version}

    def _refuse_desired(self, topic: str, reason: str) -> None:
        self.desired_error = f"desired state refused: {reason}"
        self._reject("desired", topic, reason)
        self._report_dirty.set()

    def _cancel_superseded_download(self, state: DesiredState) -> None:
        if self._installing is None or self._install_task is None:
            return
        name, bundle = self._installing
        entry = self.installer.journal.get(name)
        still_wanted = any(m.bundle == bundle for m in state.modules)
        if not still_wanted and entry is not None and entry.state == "downloading":
            self._install_task.cancel()  # nothing was activated yet: drop it and go for the new state

    def _on_command(self, topic: str, payload: bytes) -> None:
        try:
            cmd = decode(Channel.CMD, payload)
        except ProtocolError as exc:
            self._reject("cmd", topic, str(exc))
            return
        assert isinstance(cmd, Command)

        async def send() -> None:
            reply = await self._run_command(cmd)
            with contextlib.suppress(MqttOffline, TimeoutError):
                await asyncio.wait_for(self.client.publish(self._topic(Channel.CMD_RES), reply.encode()), 10.0)
        self._spawn(send())

    async def _run_command(self, cmd: Command) -> CommandReply:
        if cmd.name == "ping":
            return CommandReply(id=cmd.id, ok=True, result={"pong": True, "ts": self.clock(), "revision": self.revision})
        if cmd.name == "infer":
            name = cmd.args.get("module")
            active = self.active.get(name) if isinstance(name, str) else None
            if active is None:
                return CommandReply(id=cmd.id, ok=False, error=f"module {name!r} is not running here")
            try:
                out = await self.infer_json(active, json.dumps({"inputs": cmd.args.get("inputs", {})}).encode())
            except Exception as exc:  # the caller gets the reason; the agent keeps serving
                return CommandReply(id=cmd.id, ok=False, error=str(exc) or repr(exc))
            return CommandReply(id=cmd.id, ok=True, result={
                "module": active.name, "version": active.version, "outputs": json.loads(out)})
        return CommandReply(id=cmd.id, ok=False, error=f"unknown command {cmd.name!r}: this agent knows ping, infer")

    # --- reconciling -------------------------------------------------------------------------

    async def _reconcile_loop(self) -> None:
        await self._resume_bakes()  # first: a bake is an install under way, and installs run one at a time here
        while True:
            await self._desired_changed.wait()
            self._desired_changed.clear()
            if self.desired is None:
                continue
            try:
                await self._reconcile(self.desired)
            except Exception:  # e.g. a full disk: settle the journal, keep serving, try again later
                log.exception("%s: reconcile failed; retrying in %.0fs", self.device_id, RETRY_AFTER_ERROR)
                with contextlib.suppress(Exception):
                    await self.installer.recover()
                asyncio.get_running_loop().call_later(RETRY_AFTER_ERROR, self._desired_changed.set)
                self._report_dirty.set()

    async def _reconcile(self, state: DesiredState) -> None:
        wanted = {m.name: m for m in state.modules}
        for name in set(self.installer.installed_names()) | set(self.active):
            if name not in wanted:
                self._deactivate(name)
                self.installer.remove(name)
                self._report_dirty.set()
        for m in state.modules:
            if self.desired is not state:
                return  # a newer state arrived; the loop starts over with it
            if self.installer.current(m.name) == m.bundle:
                if m.name not in self.active or self.active[m.name].bundle != m.bundle:
                    await self._activate(m.name)
                if m.name in self.active:
                    self._set_collect_rate(self.active[m.name], m.collect_rate_ppm)
                continue
            entry = self.installer.journal.get(m.name)
            if entry is not None and entry.bundle == m.bundle and entry.state in ("rolled_back", "failed"):
                continue  # judged unusable on this device; wait for a different bundle
            await self._install(m)
        self._report_dirty.set()

    async def _install(self, m: DesiredModule) -> None:
        if self.transfer == "http":
            from agent.http_transfer import HttpBundleFetch, HubHttp

            if self.http is None:
                assert self.hub_url is not None
                self.http = HubHttp(self.hub_url, self.device_id, self.identity.mqtt_password, self.identity.broker_ca)
            fetch: BundleFetch | HttpBundleFetch = HttpBundleFetch(
                self.http, m, self.root, self.chunks, self.data_dir / MANIFESTS_DIR, self.data_dir / PARTIAL_DIR,
                reject=self._reject, progress=lambda f: self._set_progress(m.bundle, f),
                note=lambda text: self._set_transfer_error(m.bundle, text), retry=self.blob_retry, clock=self.clock)
        else:
            fetch = BundleFetch(
                self.device_id, m, self.root, self.chunks, self.data_dir / MANIFESTS_DIR,
                publish=lambda t, p: self.client.publish(t, p, qos=1), reject=self._reject,
                progress=lambda f: self._set_progress(m.bundle, f), retry=self.blob_retry, clock=self.clock,
            )
            self._fetches[m.bundle] = fetch
        self._installing = (m.name, m.bundle)
        try:
            if isinstance(fetch, BundleFetch):
                await self.client.subscribe(fetch.topic)
            self._install_task = asyncio.create_task(self.installer.install(m, fetch.run))
            await asyncio.wait({self._install_task})  # not cancelled with it: a superseded download is
            if self._install_task.cancelled():
                entry = self.installer.journal.get(m.name)
                if entry is not None and entry.state in BEFORE_ACTIVATION:
                    self.installer.journal.drop(m.name)
                log.info("%s: download of %s %s superseded", self.device_id, m.name, m.bundle[:12])
                return
            entry = self._install_task.result()
        finally:
            self._fetches.pop(m.bundle, None)
            self._installing, self._install_task = None, None
            self._progress.pop(m.bundle, None)
            self._transfer_errors.pop(m.bundle, None)
            if isinstance(fetch, BundleFetch):
                with contextlib.suppress(MqttOffline):
                    await self.client.unsubscribe(fetch.topic)
        await self._settle(m.name, entry)

    async def _settle(self, name: str, entry: Entry) -> None:
        """After an install ends: serve what ``current`` points at (a bake may have served the new version)."""
        current = self.installer.current(name)
        active = self.active.get(name)
        if current is None:
            if entry.state == "failed":
                self._deactivate(name)
        elif entry.state in ("committed", "rolled_back") and (active is None or active.bundle != current):
            await self._activate(name)
        await self._drop_unused_warm()

    async def _resume_bakes(self) -> None:
        for name in self.installer.baking():
            try:
                await self._settle(name, await self.installer.resume_bake(name))
            except Exception:  # the journal stays "baking": the next start tries again (and counts it)
                log.exception("%s: resuming the bake of %s failed", self.device_id, name)
        self._report_dirty.set()

    async def _bake(self, inst: Installed, policy: BakePolicy) -> str:
        """The installer's bake: the new version serves; its error rate (or a crash loop) decides. "" commits."""
        from agent.bake import BakeWatch  # loaded when a deployment asks for a bake: the idle agent stays small

        active = self.active.get(inst.name)
        if active is None or active.bundle != inst.bundle:
            await self._activate(inst.name)
            active = self.active.get(inst.name)
        if active is None or active.bundle != inst.bundle:
            return f"the new version did not start: {self._load_errors.get(inst.name, 'unknown reason')}"
        watch = active.bake = BakeWatch(policy)
        log.info("%s: module %s baking for %ds (rollback above %g%% errors over >= %d inferences)", self.device_id,
                 inst.name, policy.seconds, policy.max_error_ppm / 10_000, policy.min_inferences)
        try:
            reason = await watch.wait()
        finally:
            active.bake = None
        log.info("%s: module %s bake %s: %s", self.device_id, inst.name, "failed" if reason else "passed",
                 reason or watch.summary())
        return reason

    def _set_transfer_error(self, bundle: str, text: str) -> None:
        if text:
            self._transfer_errors[bundle] = text
        else:
            self._transfer_errors.pop(bundle, None)
        self._report_dirty.set()

    def _set_progress(self, bundle: str, fraction: float) -> None:
        self._progress[bundle] = fraction
        self._report_dirty.set()

    def _on_install(self, name: str, entry: Entry) -> None:
        self._report_dirty.set()

    async def _activate(self, name: str) -> None:
        """Load the active version of ``name`` and start serving it (replacing an older one)."""
        try:
            inst: Installed = await asyncio.to_thread(self.installer.load_installed, name)
            ppm = inst.manifest.collect_rate_ppm
            if self.desired is not None:
                ppm = next((m.collect_rate_ppm for m in self.desired.modules if m.name == name), ppm)
            runner: Runner | ModuleWorker
            if self.isolation == "process":
                # A committed version, or one starting its bake (it serves on probation): its worker takes the
                # direct socket over (rename) on start, as the TCP API switches to it.
                runner = ModuleWorker(name, inst.files, inst.manifest, limits=self.module_limits,
                                      start_timeout=self.health_timeout,
                                      on_crash_loop=lambda reason: self._spawn(self._crash_loop(name, inst.bundle, reason)),
                                      socket_path=self.data_dir / RUN_DIR / f"{name}.sock", collect_rate_ppm=ppm,
                                      push_every=min(1.0, self.telemetry_interval))
                await runner.start(warm=self._warm.pop(inst.bundle, None))
            else:
                runner = await asyncio.to_thread(self.installer.runner_for, inst)
        except Exception as exc:  # a broken install must not stop the agent; report it
            self._load_errors[name] = f"cannot load the active version: {exc}"
            log.error("%s: module %s: %s", self.device_id, name, self._load_errors[name])
            return
        self._load_errors.pop(name, None)
        self._deactivate(name)
        active = ActiveModule(name, inst.bundle, inst.manifest.version, runner, ppm)
        if isinstance(runner, ModuleWorker):
            runner.on_stats = functools.partial(self._direct_stats, active)
        if self.workload is not None and self.workload.rate > 0 and runner.inputs:
            active.task = asyncio.create_task(self._workload_loop(active))
        self.active[name] = active
        self._report_dirty.set()

    def _deactivate(self, name: str) -> None:
        active = self.active.pop(name, None)
        if active is not None and active.task is not None:
            active.task.cancel()
        if active is not None:
            self._spawn(self._stop_runner(active.runner))

    @staticmethod
    async def _stop_runner(runner: Runner | ModuleWorker) -> None:
        if isinstance(runner, ModuleWorker):
            await runner.stop()

    async def _health_in_worker(self, inst: Installed) -> None:
        """The installer's health check in process mode: a fresh worker, killed if it overruns the deadline."""
        worker = await health_check_in_worker(inst.name, inst.files, inst.manifest, self.health_timeout,
                                              self.module_limits)
        old = self._warm.pop(inst.bundle, None)
        if old is not None:
            await old.stop()
        self._warm[inst.bundle] = worker

    async def _drop_unused_warm(self) -> None:
        for bundle in [b for b in self._warm if not any(m.bundle == b for m in self.active.values())]:
            await self._warm.pop(bundle).stop()

    async def _crash_loop(self, name: str, bundle: str, reason: str) -> None:
        """A committed version's worker keeps dying: roll back to the version before it, with the reason."""
        active = self.active.get(name)
        if active is None or active.bundle != bundle:
            return
        if active.bake is not None:  # on probation: the bake fails now and its install rolls back
            active.bake.fail(reason)
            return
        entry = await self.installer.roll_back_committed(name, reason)
        if entry is None:  # no install record to undo (e.g. a version older than the journal): report it
            self._load_errors[name] = reason
            self._deactivate(name)
        elif self.installer.current(name) is not None:
            await self._activate(name)
        else:
            self._deactivate(name)
        self._report_dirty.set()

    # --- inference ---------------------------------------------------------------------------

    async def infer(self, active: ActiveModule, batch: Batch) -> Batch:
        """Run one batch of arrays through ``active`` (its worker, or in process), counting and sampling it."""
        t0 = time.perf_counter()
        ok = False
        self.inferences += 1
        try:
            if isinstance(active.runner, ModuleWorker):
                out = await active.runner.predict(batch)
            else:
                out = active.runner.predict(batch)
            ok = True
        finally:
            active.stats.record((time.perf_counter() - t0) * 1000.0, ok)
            if active.bake is not None:
                active.bake.record(ok)
        if self._sampled(active):
            self._collect(active, {k: v.tolist() for k, v in batch.items()}, {k: v.tolist() for k, v in out.items()})
        return out

    async def infer_json(self, active: ActiveModule, body: bytes) -> bytes:
        """Run a JSON request ``{"inputs": {...}}`` through ``active``; the outputs object as JSON.

        With process isolation the body goes to the worker as it is: the worker parses it, checks it
        against the signature and runs it, so the agent never builds an array. A body that is not
        JSON (BodyError) or does not fit the signature (InputError) never reached the model: not counted.
        """
        t0 = time.perf_counter()
        try:
            if isinstance(active.runner, ModuleWorker):
                out = await active.runner.predict_json(body)
            else:
                from modules.runners import predict_json  # in-process isolation: the runner's NumPy is here anyway

                out = predict_json(active.runner, body)
        except Exception as exc:
            self._inferred(active, body, t0, None, exc)
            raise
        self._inferred(active, body, t0, out, None)
        return out

    def infer_json_now(self, active: ActiveModule, body: bytes,
                       done: Callable[[bytes | None, Exception | None], None]) -> bool:
        """:meth:`infer_json` with a callback and no task, when ``active``'s worker is serving; else False.

        The local API's fast path: the answer is written from the callback that reads the worker's
        frame, two event-loop turns per request instead of four.
        """
        if not isinstance(active.runner, ModuleWorker):
            return False
        t0 = time.perf_counter()

        def answered(out: bytes | None, exc: Exception | None) -> None:
            try:
                self._inferred(active, body, t0, out, exc)
            except Exception:  # a sampled body the agent cannot re-read: the caller still gets its answer
                log.exception("%s: recording an inference of %s failed", self.device_id, active.name)
            done(out, exc)

        return active.runner.predict_json_now(body, answered)

    def _inferred(self, active: ActiveModule, body: bytes, t0: float, out: bytes | None, exc: Exception | None) -> None:
        """Count one JSON inference (not a request rejected before the model) and sample it for collection."""
        if not isinstance(exc, InputError):
            self.inferences += 1
            active.stats.record((time.perf_counter() - t0) * 1000.0, exc is None)
            if active.bake is not None:
                active.bake.record(exc is None)
        if out is not None and self._sampled(active):  # parsed again only when sampled
            doc = json.loads(body)
            self._collect(active, doc.get("inputs") if isinstance(doc, dict) else doc, json.loads(out))

    def _direct_stats(self, active: ActiveModule, header: dict[str, Any], blob: bytes) -> None:
        """A worker's report of the inferences it answered on its direct socket: counted and sampled as ours are."""
        count, errors = int(header.get("count", 0)), int(header.get("errors", 0))
        self.inferences += count
        active.stats.add(count, errors, float(header.get("latency_ms_sum", 0.0)),
                         [float(v) for v in header.get("latencies_ms", [])])
        if active.bake is not None and count:  # direct callers' errors count against a version on probation too
            active.bake.add(count, errors)
        if header.get("rejected"):
            self.rejected["direct_api"] += int(header["rejected"])
        if header.get("samples_dropped"):
            log.warning("%s: module %s dropped %d samples (over its pending bound)", self.device_id, active.name,
                        header["samples_dropped"])
        for record in json.loads(blob) if blob else []:  # already sampled by the worker at the module's rate
            self._collect(active, record.get("input"), record.get("output"))

    @staticmethod
    def _set_collect_rate(active: ActiveModule, ppm: int) -> None:
        active.collect_rate_ppm = ppm
        if isinstance(active.runner, ModuleWorker):
            active.runner.set_collect_rate(ppm)

    def _sampled(self, active: ActiveModule) -> bool:
        return bool(active.collect_rate_ppm) and self._rng.random() * 1_000_000 < active.collect_rate_ppm

    def _collect(self, active: ActiveModule, inputs: Any, outputs: Any) -> None:
        self._data.append(DataRecord(ts=self.clock(), module=active.name, version=active.version, input=inputs,
                                     output=outputs))

    async def _workload_loop(self, active: ActiveModule) -> None:
        assert self.workload is not None
        loop = asyncio.get_running_loop()
        period = 1.0 / self.workload.rate
        rng = self.workload.rng(active.name)
        next_t = loop.time() + random.uniform(0, period)  # spread many agents across the period
        while True:
            await asyncio.sleep(max(0.0, next_t - loop.time()))
            next_t = max(next_t + period, loop.time() - 1.0)  # after a stall, catch up at most one second
            batch = self.workload.make_inputs(rng, active.runner.inputs)
            with contextlib.suppress(Exception):  # counted as an error in stats; the workload goes on
                await self.infer(active, batch)

    # --- outbound ----------------------------------------------------------------------------

    def reported(self) -> ReportedState:
        modules: list[ModuleReport] = []
        for m in self.desired.modules if self.desired else []:
            entry = self.installer.journal.get(m.name)
            active = self.active.get(m.name)
            state, error, progress = "pending", "", 0.0
            if entry is not None and entry.bundle == m.bundle and entry.state != "committed":
                state, error = entry.state, entry.error
                progress = 1.0 if entry.state not in ("downloading",) else self._progress.get(m.bundle, 0.0)
                if entry.state == "downloading" and not error:
                    error = self._transfer_errors.get(m.bundle, "")
            elif active is not None and active.bundle == m.bundle:
                state, progress = "running", 1.0
            elif m.name in self._load_errors:
                state, error = "failed", self._load_errors[m.name]
            elif self.installer.current(m.name) == m.bundle:
                state, progress = "activating", 1.0
            modules.append(ModuleReport(name=m.name, version=m.version, bundle=m.bundle, state=state,  # type: ignore[arg-type]
                                        error=error, progress=round(progress, 4)))
        return ReportedState(device=self.device_id, revision=self.revision, modules=modules, error=self.desired_error,
                             facts=self.facts, ts=self.clock())

    async def _report_loop(self) -> None:
        while True:
            await self._report_dirty.wait()
            await asyncio.sleep(0.05)  # coalesce a burst of state changes into one retained message
            self._report_dirty.clear()
            if not self.client.connected.is_set():
                continue  # re-sent from _on_connected
            try:
                await asyncio.wait_for(self.client.publish(
                    self._topic(Channel.REPORTED), self.reported().encode(), qos=1, retain=True), 10.0)
            except (MqttOffline, TimeoutError):
                self._report_dirty.set()
                await asyncio.sleep(1.0)

    async def _telemetry_loop(self) -> None:
        # A random phase, so a fleet started together does not report in lock-step.
        await asyncio.sleep(random.uniform(0, self.telemetry_interval))
        while True:
            self.flush_telemetry()
            await asyncio.sleep(self.telemetry_interval)

    def flush_telemetry(self) -> None:
        """Queue this interval's telemetry (and sampled data) in the outbox."""
        now = self.clock()
        points = []
        for a in self.active.values():
            n, errors, latency = a.stats.take()
            points.append(TelemetryPoint(ts=now, module=a.name, version=a.version, inferences=n, errors=errors,
                                         latency_ms=latency))
        agent = {
            "rss_mb": round(rss_bytes() / 2**20, 1),
            "outbox_dropped": float(self.outbox.dropped),
            "outbox_pending": float(len(self.outbox)),
            "rejected_messages": float(sum(self.rejected.values())),
            "connected": 1.0 if self.client.connected.is_set() else 0.0,
            **self.health(),
            **self.worker_stats(),
        }
        batch = TelemetryBatch(device=self.device_id, seq=self.outbox.next_seq("telemetry"), ts=now, points=points,
                               agent=agent)
        self.outbox.put("telemetry", batch.encode())
        while self._data:
            records, self._data = self._data[:1000], self._data[1000:]
            data = DataBatch(device=self.device_id, seq=self.outbox.next_seq("data"), ts=now, records=records)
            self.outbox.put("data", data.encode())
        self._outbox_ready.set()

    async def _drain_loop(self) -> None:
        topics = {"telemetry": self._topic(Channel.TELEMETRY), "data": self._topic(Channel.DATA)}
        while True:
            await self.client.connected.wait()
            if self.hub_online is False:
                self._hub_changed.clear()
                await self._hub_changed.wait()  # the broker would accept, but nobody would store it
                continue
            self._outbox_ready.clear()
            rows = self.outbox.peek(50)
            if not rows:
                await self._outbox_ready.wait()
                continue
            # Pipelined: paho keeps them in order on the wire; each row is deleted on its PUBACK.
            results = await asyncio.gather(
                *(self._send(topics.get(kind, topics["telemetry"]), payload) for _, kind, payload in rows),
                return_exceptions=True)
            failed = False
            for (rowid, _, _), result in zip(rows, results):
                if isinstance(result, BaseException):
                    failed = True
                else:
                    self.outbox.delete(rowid)
            if failed:
                await asyncio.sleep(1.0)

    async def _send(self, topic: str, payload: bytes, timeout: float = 30.0) -> None:
        # The publish coroutine is made inside this task, so a cancelled gather leaves none un-awaited.
        await asyncio.wait_for(self.client.publish(topic, payload, qos=1), timeout)

    # --- introspection -----------------------------------------------------------------------

    def health(self) -> dict[str, float]:
        """Agent health: 1.0 when every desired module is serving and no load or install error stands."""
        wanted = {m.name for m in self.desired.modules} if self.desired else set()
        serving = {n for n, a in self.active.items()
                   if not isinstance(a.runner, ModuleWorker) or a.runner.state == "serving"}
        healthy = wanted <= serving and not self._load_errors and not self.desired_error
        return {"healthy": 1.0 if healthy else 0.0, "modules_running": float(len(serving))}

    def worker_stats(self) -> dict[str, float]:
        """Per module worker: CPU % since the last call, RSS in MB and restarts (flat keys: the schema is str -> float)."""
        out: dict[str, float] = {}
        meters: dict[int, CpuMeter] = {}
        for name, a in self.active.items():
            if not isinstance(a.runner, ModuleWorker):
                continue
            out[f"worker.{name}.restarts"] = float(a.runner.restarts)
            pid = a.runner.pid
            if pid is None:
                continue
            try:
                meter = meters[pid] = self._cpu.get(pid) or CpuMeter(pid)
                out[f"worker.{name}.cpu_pct"] = round(meter.percent(), 1)
                out[f"worker.{name}.rss_mb"] = round(rss_bytes(pid) / 2**20, 1)
            except ProcessGone:
                # dead (or a zombie not yet reaped): the supervisor is about to restart it; the next
                # interval sees the new one
                out.pop(f"worker.{name}.cpu_pct", None)
                continue
        self._cpu = meters
        return out

    def snapshot(self) -> dict[str, Any]:
        report = self.reported()
        return {
            "device_id": self.device_id,
            "connected": self.client.connected.is_set(),
            "revision": self.revision,
            "error": self.desired_error,
            "modules": [{"name": m.name, "version": m.version, "bundle": m.bundle, "state": m.state, "error": m.error,
                         "progress": m.progress} for m in report.modules],
            "inferences": self.inferences,
            "rejected": dict(self.rejected),
            "outbox": len(self.outbox),
            "outbox_dropped": self.outbox.dropped,
        }
