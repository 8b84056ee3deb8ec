"""The running hub: its database, keys, services and MQTT bridge, wired together once.

On SQLite the hub owns its data directory (a second hub on it refuses to start). On PostgreSQL
several replicas share the database, the keys and the blob store (a shared directory: ``data_dir``
and ``blobs_dir`` on a volume every replica mounts); one of them is the leader (hub/leader.py).
"""

from __future__ import annotations

import logging
import threading
import time

from hub import audit
from hub.batch.jobs import fail_orphaned
from hub.config import HubConfig
from hub.events.webhooks import Webhooks
from hub.fleet.broker_auth import BrokerAuth, signal_reload
from hub.fleet.commands import DeviceCommands
from hub.fleet.device_http import DeviceDownloads
from hub.fleet.devices import Fleet
from hub.ingest import sessions
from hub.ingest import workers as ingest_worker
from hub.leader import DataDirLock, Leadership
from hub.monitoring.service import Monitor
from hub.mqtt.bridge import Bridge
from hub.registry.aliases import ModelAliases
from hub.registry.bundles import ModuleBuilder
from hub.registry.evaluations import Evaluations
from hub.registry.models import ModelRegistry
from hub.rollout.deployments import Deployments
from hub.rollout.director import Director
from hub.rollout.rollouts import Rollouts
from hub.store import is_postgres_url, open_database
from hub.store.blobs import open_blob_store
from hub.trust.keys import load_or_create_keys, private_dir
from hub.trust.release_policy import ReleasePolicies
from hub.trust.renewal import key_expiry, maintain
from hub.trust.roots_publish import publish_roots
from hub.trust.tokens import ensure_admin_token
from modules.sandbox import detect

log = logging.getLogger("edgefleet.hub")

RENEW_CHECK_S = 3600.0
KEYS_CHECK_S = 2.0  # how often every replica looks for a key rotated by another one


class Hub:
    """Everything one hub process owns; the app builds it in its lifespan, start() connects MQTT."""

    def __init__(self, config: HubConfig) -> None:
        self.config = config
        private_dir(config.data_dir)  # keys, tokens, the database and the broker's password file live here
        self.clustered = is_postgres_url(config.database)
        self._dir_lock = None if self.clustered else DataDirLock(config.data_dir).acquire()
        try:
            self._build(config)
        except BaseException:
            if self._dir_lock is not None:
                self._dir_lock.release()
            raise

    def _build(self, config: HubConfig) -> None:
        self._stop = threading.Event()
        self._maintenance_wake = threading.Event()
        self.db = open_database(config.database)
        audit.seal(self.db)  # an older hub's audit rows join the hash chain before anything is added
        with self.db.transaction():  # replicas starting together on an empty shared directory: one creates the keys
            self.keys = load_or_create_keys(config.data_dir / "keys")
            self.admin_token = ensure_admin_token(self.db, config.data_dir, config.admin_token)
        self._root_mtime = self._root_stamp()
        self.leadership = Leadership(self.db, config.leader_lease_s, sole=not self.clustered)
        self.store = open_blob_store(config.blobs_dir or config.data_dir / "blobs",  # shared by every replica
                                     cache=config.data_dir / "blob-cache")
        # before anything runs operator code: refuse to start (sandbox "on") where nothing can isolate it
        self.sandbox = detect(config.sandbox, config.sandbox_user, network=config.sandbox_network,
                              hide=[config.data_dir])
        log.info("operator code sandbox: %s", self.sandbox.describe())
        self.registry = ModelRegistry(self.db, self.store, config.load_check_timeout_s, config.load_check_memory_mb,
                                      self.sandbox)
        self.modules = ModuleBuilder(self.db, self.store, self.registry, self.keys, config.release_ttl_s)
        self.aliases = ModelAliases(self.db, self.registry)
        self.evaluations = Evaluations(self.db, self.registry)
        self.webhooks = Webhooks(self.db, config.webhook_backoff_s, config.webhook_max_attempts,
                                 config.webhook_timeout_s, leader=self.leadership)
        self.policies = ReleasePolicies(self.db, self.keys, config.release_ttl_s)
        self.bridge = Bridge(config, self.db, self.store, self._is_enrolled, self.leadership.is_leader)
        self.downloads = DeviceDownloads(self.db, self.store)  # bundles over HTTP for devices (routes/device.py)
        self.director = Director(self.db, self.keys, config.desired_ttl_s, self.bridge.publish,
                                 policy=self.policies.envelope, leader=self.leadership)
        self.policies.on_change = self._policy_changed
        self.fleet = Fleet(self.db, self.keys, self.director, config.device_mqtt_url, config.device_ca_pem())
        self.commands = DeviceCommands(self.db, self.keys, self.bridge.publish)
        self.bridge.on_command_reply = self.commands.replied
        self.broker_auth: BrokerAuth | None = None
        if config.isolate:
            pid = config.broker_pid_file or config.broker_pid
            reload = signal_reload(pid) if pid else None
            self.broker_auth = BrokerAuth(config.data_dir / "broker", reload, workers=config.ingest_workers)
            self.fleet.on_credentials_changed = self._write_broker_auth
            self._write_broker_auth()
        self.rollouts = Rollouts(self.db, self.director, config.rollout_tick_s, self.leadership)
        self.bridge.on_ready = self.rollouts.republish  # the leader's loop re-sends retained desired states
        self.leadership.on_elected.append(self.rollouts.elected)
        self.leadership.on_elected.append(self._maintenance_wake.set)
        self.deployments = Deployments(self.db, self.director, self.rollouts, self.policies.refusal)
        self.monitor = Monitor(config, self.db, self.store, self.leadership)
        self.rollouts.quality = self.monitor.quality  # input drift and accuracy for the quality gates
        self.monitor.alerts.expiry = lambda now: key_expiry(self, now)  # key_expiry alert rules
        self._ingest_workers: list = []  # processes, started by start()
        self._maintenance = threading.Thread(target=self._maintain, name="hub-maintenance", daemon=True)

    def _write_broker_auth(self) -> None:
        if self.broker_auth is not None:
            self.broker_auth.write(self.fleet.broker_credentials())

    def after_root_change(self) -> dict[str, int]:
        """A new root was published: devices learn it now, then every retained document it would refuse is re-signed
        (releases, the release policy, desired states), so the fleet converges without a restart."""
        publish_roots(self.bridge.publish, self.config.data_dir / "keys")
        releases = self.modules.resign()
        policy = self.policies.renew(before=0)  # re-signed only if the new root no longer trusts its signer
        states = self.director.resign_refused() if self.keys.holds("director") else 0
        return {"resigned_releases": releases, "resigned_policy": int(policy), "resigned_states": states}

    def _policy_changed(self) -> None:
        if self.keys.holds("director"):
            self.director.resign_refused()

    def _is_enrolled(self, device_id: str) -> bool:
        return self.fleet.is_enrolled(device_id)

    def start(self) -> None:
        self._ingest_workers = ingest_worker.spawn(self.config, self.db)
        self.bridge.start()
        self.monitor.start()
        self.webhooks.start()
        self._maintenance.start()
        self.rollouts.start_loop()
        self.leadership.start()  # a lone hub is leader from here on; a replica may wait for the lease

    def stop(self) -> None:
        self._stop.set()
        self._maintenance_wake.set()
        self.rollouts.stop_loop()
        self.leadership.stop()  # hands the lease over at once
        self.monitor.stop()
        self.webhooks.stop()
        self.bridge.stop()
        ingest_worker.stop_all(self._ingest_workers)
        if self._maintenance.is_alive():
            self._maintenance.join(5)
        self.db.close()
        if self._dir_lock is not None:
            self._dir_lock.release()

    def _maintain(self) -> None:
        """The leader's slow chores (renewals, partitions) and adoptions; every replica's key reload."""
        next_chores = 0.0
        while not self._stop.is_set():
            self._reload_keys()
            if self.leadership.is_leader() and time.monotonic() >= next_chores:
                next_chores = time.monotonic() + RENEW_CHECK_S
                self._chores()
            if self.clustered and self.leadership.is_leader():
                self._adopt_sessions()
                self._fail_orphaned_jobs()
            self._maintenance_wake.wait(KEYS_CHECK_S)
            self._maintenance_wake.clear()

    def _chores(self) -> None:
        # first pass on election: after a long downtime some documents may be close to expiry (or expired)
        try:
            maintain(self)  # hub/trust/renewal.py: the root, desired states, releases, the release policy
        except Exception:
            log.exception("maintenance pass failed")
        try:
            self.db.maintain()  # PostgreSQL: the coming week's time partitions
        except Exception:
            log.exception("creating time partitions failed")

    def _adopt_sessions(self) -> None:
        """Leader: store what the MQTT sessions of ingest processes that died hold (hub/ingest/sessions.py)."""
        try:
            for client_id in sessions.stale(self.db, self.config.ingest_adopt_s):
                if client_id != self.config.mqtt_client_id and not self._stop.is_set():
                    sessions.adopt(self.config, self.db, client_id)
        except Exception:
            log.exception("adopting the MQTT session of a dead ingest process failed")

    def _fail_orphaned_jobs(self) -> None:
        """Leader: batch jobs of a replica that died are failed (nobody watches them; hub/batch/jobs.py)."""
        try:
            if n := fail_orphaned(self.db, self.config.ingest_adopt_s):
                log.warning("%d batch job(s) of a replica that stopped marked failed", n)
        except Exception:
            log.exception("failing the batch jobs of a stopped replica failed")

    def _root_stamp(self) -> float:
        try:
            return (self.config.data_dir / "keys" / "root.json").stat().st_mtime
        except OSError:
            return 0.0

    def _reload_keys(self) -> None:
        """Another replica rotated a key (root.json changed in the shared directory): sign with the new one."""
        stamp = self._root_stamp()
        if stamp == self._root_mtime:
            return
        self._root_mtime = stamp
        try:
            fresh = load_or_create_keys(self.config.data_dir / "keys")
        except Exception:
            log.exception("reloading the keys after a rotation failed")
            return
        with self.keys.lock:
            if fresh.root.version <= self.keys.root.version:
                return
            self.keys.held, self.keys.root, self.keys.pending = fresh.held, fresh.root, fresh.pending
        log.warning("keys reloaded: root version %d", fresh.root.version)
        if self.leadership.is_leader() and self.keys.holds("director"):
            try:  # what the replica that rotated asked for was served with the old keys: re-sign now
                self.director.resign_refused()
            except Exception:
                log.exception("re-signing desired states after a key rotation failed")
