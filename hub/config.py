"""Hub settings."""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from hub.store.db import is_postgres_url
from protocol.broker_url import parse_broker_url

DEFAULT_CLIENT_ID = "edgefleet-hub"


@dataclass
class HubConfig:
    """Where the hub keeps its state and how it reaches the broker.

    ``mqtt_url`` may carry the hub's own broker credentials; devices are handed
    ``public_mqtt_url`` (by default the same address without credentials).
    ``admin_token`` falls back to env ``EDGEFLEET_ADMIN_TOKEN``, else one is
    generated at first start.
    """

    data_dir: Path
    mqtt_url: str
    public_mqtt_url: str | None = None
    admin_token: str | None = None
    desired_ttl_s: int = 86400  # short: a leaked director key's states die soon; renewed at half life (hub/trust/renewal.py)
    # bundle parts go out in passes, one copy for every device waiting (hub/mqtt/blob_carousel.py): a pass waits
    # until no new device has asked for blob_gather_s (at most blob_hold_max_s); 0: per-device transfer,
    # every request answered at once with its own copy. A device asking again for a copy sent after it
    # asked is ignored for blob_covered_s (the copy is on its way), then served again.
    blob_gather_s: float = 1.5
    blob_hold_max_s: float = 30.0
    blob_covered_s: float = 30.0
    # bundle bytes one device may make the hub publish: a burst (a whole bundle at once), then a rate
    # (hub/mqtt/ratelimit.py); burst 0: no limit
    blob_device_burst_bytes: int = 64 << 20
    blob_device_rate_bps: float = 64 << 10
    mqtt_client_id: str = DEFAULT_CLIENT_ID  # two hubs on one broker need distinct ids (replicas get their own)
    release_ttl_s: int = 365 * 86400
    writer_flush_s: float = 0.1
    writer_batch_rows: int = 1000
    load_check_timeout_s: float = 120.0  # registering: how long the child process may take to load a model
    load_check_memory_mb: int = 4096  # registering: address-space cap for that child (0: none)
    endpoint_host: str = "127.0.0.1"  # web endpoints: where their gateways listen (each on its own port)
    endpoint_url_host: str | None = None  # the host name put in endpoint URLs (default: endpoint_host)
    endpoint_threads: int = 1  # onnxruntime intra-op threads per endpoint worker process
    endpoint_queue_timeout_s: float = 30.0  # how long a request may wait for a live worker before a 503
    endpoint_telemetry_s: float = 5.0  # how often each endpoint writes its counts and latency to the telemetry store
    endpoint_memory_mb: int = 4096  # address-space cap per endpoint worker process (0: none)
    # operator code (load checks, endpoint workers) runs outside the hub's trust domain (modules/sandbox.py):
    # "on" refuses to start where nothing isolates, "auto" falls back to none with a warning, "off" is --no-sandbox
    sandbox: str = "on"
    sandbox_user: str = "nobody"  # the account a root hub runs operator code as
    sandbox_network: bool = False  # endpoint workers and load checks get no network unless this is set
    rollout_tick_s: float = 0.5  # how often the rollout controller re-reads rollouts and checks gates
    isolate: bool = False  # generate a per-device password file and ACL in DATA/broker (hub/fleet/broker_auth.py)
    broker_pid: int | None = None  # isolate: the mosquitto to SIGHUP after each change (None: an external broker)
    broker_pid_file: Path | None = None  # isolate: the same, its pid read at each change (a supervised broker's)
    ingest_workers: int = 0  # extra processes sharing telemetry/data ingest via an MQTT 5 shared subscription
    alert_eval_s: float = 15.0  # how often alert rules are evaluated
    # event webhooks (hub/events): a failed delivery is retried after backoff × 2^n seconds, max_attempts in all
    webhook_backoff_s: float = 1.0  # 1, 2, 4 … 256 s: about 8.5 minutes of retries (a receiver redeploying)
    webhook_max_attempts: int = 10
    webhook_timeout_s: float = 5.0
    telemetry_retention_s: float = 7 * 86400  # raw telemetry older than this is folded into 1-minute rollups
    data_retention_s: float = 30 * 86400  # collected inputs/predictions older than this are deleted
    broker_ca: Path | None = None  # mqtts: the broker's CA (PEM); the hub trusts it and pins it on devices at enrolment
    tls_ca: Path | None = None  # the CA of the hub's own TLS (DATA/tls/ca.pem, or the operator's): pinned on devices too
    max_body_bytes: int = 4 << 20  # HTTP request bodies, except the model upload (hub/api/guard.py)
    max_upload_bytes: int = 8 << 30  # POST /api/v1/models: the model files of one version
    # the database: None is SQLite in data_dir/hub.db (one hub per data directory); a postgresql:// URL lets
    # several hub replicas share one database (docs/scaling.md). Keep its password out of the URL: PGPASSWORD.
    db_url: str | None = None
    # the blob store all replicas share: a directory (default data_dir/blobs) or an s3://bucket/prefix URL
    blobs_dir: Path | str | None = None
    leader_lease_s: float = 5.0  # replicas: how long the leader's lease lasts unless renewed (failover time)
    ingest_adopt_s: float = 15.0  # replicas: an ingest process silent this long has its MQTT session adopted

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        if self.mqtt_client_id == DEFAULT_CLIENT_ID and is_postgres_url(self.database):
            # replicas on one database: the broker would drop one of two clients with the same id
            # the same after a restart (a container keeps its host name): its durable session is found again
            self.mqtt_client_id = f"{DEFAULT_CLIENT_ID}-{socket.gethostname()}"
        if self.blobs_dir is not None and not str(self.blobs_dir).startswith("s3://"):
            self.blobs_dir = Path(self.blobs_dir)
        parse_broker_url(self.mqtt_url)  # fail at start, not at first connect
        if self.broker_ca is not None:
            self.broker_ca = Path(self.broker_ca)
            ssl.create_default_context(cafile=str(self.broker_ca))  # a bad CA file fails here, with OpenSSL's reason
        if self.tls_ca is not None:
            self.tls_ca = Path(self.tls_ca)
            ssl.create_default_context(cafile=str(self.tls_ca))

    @property
    def database(self) -> str:
        """Where the hub's database is: the PostgreSQL URL, or the SQLite file's path."""
        return self.db_url or str(self.data_dir / "hub.db")

    def broker_ca_pem(self) -> str | None:
        return self.broker_ca.read_text() if self.broker_ca is not None else None

    def device_ca_pem(self) -> str | None:
        """The CAs devices pin at enrolment, for the broker and for HTTPS to the hub: one PEM bundle, or None when
        they use the system's store."""
        pems = [p.read_text().strip() + "\n" for p in (self.broker_ca, self.tls_ca) if p is not None]
        return "".join(dict.fromkeys(pems)) or None

    def tls_ca_certs(self) -> str | None:
        """For paho's ``tls_set(ca_certs=...)``: the configured CA, or None for the system store."""
        return str(self.broker_ca) if self.broker_ca is not None else None

    @property
    def device_mqtt_url(self) -> str:
        """The broker URL handed to devices at enrolment: never the hub's own credentials."""
        return self.public_mqtt_url or parse_broker_url(self.mqtt_url).public()
