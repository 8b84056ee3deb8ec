"""The running hub: its database, keys, services and MQTT bridge, wired together once."""

from __future__ import annotations

import logging
import threading

from hub import audit
from hub.config import HubConfig
from hub.events.webhooks import Webhooks
from hub.fleet.broker_auth import BrokerAuth, signal_reload
from hub.fleet.commands import DeviceCommands
from hub.fleet.device_http import DeviceDownloads
from hub.fleet.devices import Fleet
from hub.ingest import workers as ingest_worker
from hub.monitoring.service import Monitor
from hub.mqtt.bridge import Bridge
from hub.registry.aliases import ModelAliases
from hub.registry.bundles import ModuleBuilder
from hub.registry.evaluations import Evaluations
from hub.registry.models import ModelRegistry
from hub.rollout.deployments import Deployments
from hub.rollout.director import Director
from hub.rollout.rollouts import Rollouts
from hub.store import Database
from hub.trust.keys import load_or_create_keys, private_dir
from hub.trust.release_policy import ReleasePolicies
from hub.trust.renewal import key_expiry, maintain
from hub.trust.roots_publish import publish_roots
from hub.trust.tokens import ensure_admin_token
from modules.sandbox import detect
from modules.store import ContentStore

log = logging.getLogger("edgefleet.hub")

RENEW_CHECK_S = 3600.0


class Hub:
    """Everything one hub process owns; the app builds it in its lifespan, start() connects MQTT."""

    def __init__(self, config: HubConfig) -> None:
        self.config = config
        private_dir(config.data_dir)  # keys, tokens, the database and the broker's password file live here
        self.db = Database(config.data_dir / "hub.db")
        audit.seal(self.db)  # an older hub's audit rows join the hash chain before anything is added
        self.keys = load_or_create_keys(config.data_dir / "keys")
        self.admin_token = ensure_admin_token(self.db, config.data_dir, config.admin_token)
        self.store = ContentStore(config.data_dir / "blobs")
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
                                 config.webhook_timeout_s)
        self.policies = ReleasePolicies(self.db, self.keys, config.release_ttl_s)
        self.bridge = Bridge(config, self.db, self.store, self._is_enrolled)
        self.downloads = DeviceDownloads(self.db, self.store)  # bundles over HTTP for devices (routes/device.py)
        self.director = Director(self.db, self.keys, config.desired_ttl_s, self.bridge.publish, self.policies.envelope)
        self.policies.on_change = self._policy_changed
        self.bridge.on_ready = self.director.republish_all
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
        self.rollouts = Rollouts(self.db, self.director, config.rollout_tick_s)
        self.deployments = Deployments(self.db, self.director, self.rollouts, self.policies.refusal)
        self.monitor = Monitor(config, self.db, self.store)
        self.rollouts.quality = self.monitor.quality  # input drift and accuracy for the quality gates
        self.monitor.alerts.expiry = lambda now: key_expiry(self, now)  # key_expiry alert rules
        self._ingest_workers: list = []  # processes, started by start()
        self._stop = threading.Event()
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

    def stop(self) -> None:
        self._stop.set()
        self.rollouts.stop_loop()
        self.monitor.stop()
        self.webhooks.stop()
        self.bridge.stop()
        ingest_worker.stop_all(self._ingest_workers)
        if self._maintenance.is_alive():
            self._maintenance.join(5)
        self.db.close()

    def _maintain(self) -> None:
        # first pass at start: after a long downtime some documents may be close to expiry (or expired)
        while True:
            try:
                maintain(self)
            except Exception:
                log.exception("maintenance pass failed")
            if self._stop.wait(RENEW_CHECK_S):
                return
