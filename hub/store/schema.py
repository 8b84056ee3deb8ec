"""The hub's one schema, as an ordered list of migrations; ``schema_version`` records how many were applied.

Add a change by appending a step to :data:`MIGRATIONS` (never edit an applied one). A step is SQL
statements or an :class:`AddColumn`. Step 1 is the schema as it stood when versioning began; it is
idempotent (``IF NOT EXISTS``, columns added only when missing), so a database made before versioning
takes it too. Keep the SQL portable: the PostgreSQL store applies the same list, translating only what
``hub/store/dialect.py`` knows is dialect (types, ``AUTOINCREMENT``, ``WITHOUT ROWID``), and partitions the
tables in :data:`PARTITIONED` by time.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AddColumn:
    """``ALTER TABLE table ADD COLUMN column decl``, skipped when the column exists (SQLite has no IF NOT EXISTS)."""

    table: str
    column: str
    decl: str


Step = str | AddColumn

DAY = 86400


@dataclass(frozen=True)
class Partitioning:
    """PostgreSQL keeps this table as range partitions of ``column`` (unix seconds), one per ``period_s``.

    Partitions are created ahead of time (``Database.maintain``) and retention drops whole ones
    (``Connection.delete_before``); SQLite keeps one table and deletes rows.
    """

    column: str
    period_s: int = DAY


# the tables that grow with the fleet's traffic
PARTITIONED: dict[str, Partitioning] = {
    "telemetry_batches": Partitioning("ts_max"),
    "telemetry_minutes": Partitioning("bucket"),
    "data_records": Partitioning("ts"),
}

CORE = """CREATE TABLE IF NOT EXISTS api_tokens (
    token_hash TEXT PRIMARY KEY, name TEXT NOT NULL, role TEXT NOT NULL, created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS enrollment_tokens (
    token_hash TEXT PRIMARY KEY, labels TEXT NOT NULL DEFAULT '{}', expires_at REAL NOT NULL, used_by TEXT
);
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY,
    labels TEXT NOT NULL DEFAULT '{}',
    facts TEXT NOT NULL DEFAULT '{}',
    online INTEGER NOT NULL DEFAULT 0,
    last_seen REAL,
    revision INTEGER NOT NULL DEFAULT 0,
    reported TEXT,
    created_at REAL NOT NULL,
    mqtt_password_hash TEXT,
    desired TEXT,           -- the module list last published, to publish only on change
    desired_envelope TEXT,  -- the signed envelope last published, re-sent after a broker restart
    desired_expires INTEGER
);
CREATE TABLE IF NOT EXISTS models (
    name TEXT NOT NULL, version INTEGER NOT NULL, framework TEXT NOT NULL,
    files TEXT NOT NULL, inputs TEXT NOT NULL, outputs TEXT NOT NULL, tags TEXT NOT NULL DEFAULT '{}',
    description TEXT NOT NULL DEFAULT '', created_at REAL NOT NULL, created_by TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS modules (
    name TEXT NOT NULL, version INTEGER NOT NULL, digest TEXT NOT NULL UNIQUE, runtime TEXT NOT NULL,
    envelope TEXT NOT NULL, size INTEGER NOT NULL, created_at REAL NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS chunks (
    digest TEXT PRIMARY KEY, blob TEXT NOT NULL, offset INTEGER NOT NULL, length INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS deployments (
    name TEXT PRIMARY KEY, module_name TEXT NOT NULL, module_version INTEGER NOT NULL, digest TEXT NOT NULL,
    target TEXT NOT NULL, priority INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL,
    active INTEGER NOT NULL DEFAULT 1
);
-- every revision of a deployment stays, so a rollout can go back to any of them
CREATE TABLE IF NOT EXISTS deployment_revisions (
    deployment TEXT NOT NULL, revision INTEGER NOT NULL, module_name TEXT NOT NULL, module_version INTEGER NOT NULL,
    digest TEXT NOT NULL, target TEXT NOT NULL, priority INTEGER NOT NULL DEFAULT 0, collect_rate_ppm INTEGER,
    created_at REAL NOT NULL, created_by TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (deployment, revision)
);
-- one row per rollout of a revision; state machine in hub/rollout/rollout_states.py
CREATE TABLE IF NOT EXISTS rollouts (
    id INTEGER PRIMARY KEY AUTOINCREMENT, deployment TEXT NOT NULL, revision INTEGER NOT NULL,
    from_revision INTEGER, strategy TEXT NOT NULL, gates TEXT NOT NULL, on_failure TEXT NOT NULL,
    bake_s REAL NOT NULL, wave_timeout_s REAL NOT NULL, state TEXT NOT NULL, wave INTEGER NOT NULL DEFAULT 0,
    paused_from TEXT, phase_started_at REAL, everyone INTEGER NOT NULL DEFAULT 0, reason TEXT NOT NULL DEFAULT '',
    last_gate TEXT, created_at REAL NOT NULL, created_by TEXT NOT NULL DEFAULT '', updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS rollouts_deployment ON rollouts (deployment, id);
-- the devices a rollout has moved to its revision (the rest keep the deployment's stable revision)
CREATE TABLE IF NOT EXISTS rollout_devices (
    rollout INTEGER NOT NULL, device TEXT NOT NULL, wave INTEGER NOT NULL, admitted_at REAL NOT NULL,
    PRIMARY KEY (rollout, device)
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL,
    subject TEXT NOT NULL, detail TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS data_records (
    device TEXT NOT NULL, seq INTEGER NOT NULL, idx INTEGER NOT NULL, ts REAL NOT NULL,
    module TEXT NOT NULL, version INTEGER NOT NULL, input TEXT, output TEXT,
    PRIMARY KEY (device, seq, idx)
);
"""

# telemetry (hub/ingest/telemetry.py): a row per batch, per-minute rollups
TELEMETRY = """CREATE TABLE IF NOT EXISTS telemetry_batches (
    device TEXT NOT NULL, seq INTEGER NOT NULL, ts_min REAL NOT NULL, ts_max REAL NOT NULL,
    points INTEGER NOT NULL, keys TEXT NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (device, seq)
);
CREATE INDEX IF NOT EXISTS telemetry_batches_ts ON telemetry_batches (ts_max);
-- no (device, ts) index: it cost about 40% of a one-point batch's insert; device reads walk the time index
CREATE TABLE IF NOT EXISTS telemetry_minutes (
    module TEXT NOT NULL, version INTEGER NOT NULL, device TEXT NOT NULL, bucket INTEGER NOT NULL,
    points INTEGER NOT NULL, inferences INTEGER NOT NULL, errors INTEGER NOT NULL,
    w50 REAL NOT NULL, w95 REAL NOT NULL, w99 REAL NOT NULL, s95 REAL NOT NULL,
    PRIMARY KEY (module, version, bucket, device)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS telemetry_minutes_device ON telemetry_minutes (device, bucket);
CREATE INDEX IF NOT EXISTS telemetry_minutes_bucket ON telemetry_minutes (bucket);
-- raw_from: raw points are complete from this time on; older minutes exist only as rollups (retention)
CREATE TABLE IF NOT EXISTS telemetry_meta (key TEXT PRIMARY KEY, value REAL NOT NULL);
"""

# registry (hub/registry/): which model versions each module was built from, module metadata, deletions
REGISTRY = """CREATE TABLE IF NOT EXISTS module_sources (
    module_name TEXT NOT NULL, module_version INTEGER NOT NULL, model_name TEXT NOT NULL, model_version INTEGER NOT NULL,
    PRIMARY KEY (module_name, module_version, model_name, model_version)
);
-- hub-side module metadata that is not part of the signed manifest (resource hints for schedulers and operators)
CREATE TABLE IF NOT EXISTS module_meta (
    module_name TEXT NOT NULL, module_version INTEGER NOT NULL, resources TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (module_name, module_version)
);
CREATE INDEX IF NOT EXISTS module_sources_model ON module_sources (model_name, model_version);
-- deleted versions are never reused, so a reference to name:version always means the same files
CREATE TABLE IF NOT EXISTS model_deletions (
    name TEXT NOT NULL, version INTEGER NOT NULL, deleted_at REAL NOT NULL, deleted_by TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (name, version)
);
"""

# monitoring (hub/monitoring/alerts.py)
ALERTS = """CREATE TABLE IF NOT EXISTS alert_rules (
    name TEXT PRIMARY KEY, kind TEXT NOT NULL, deployment TEXT, threshold REAL NOT NULL,
    for_s REAL NOT NULL DEFAULT 0, window_s REAL NOT NULL DEFAULT 300, webhook TEXT, created_at REAL NOT NULL,
    created_by TEXT NOT NULL DEFAULT ''
);
-- one row per (rule, key) currently breached: pending until for_s passes, then firing
CREATE TABLE IF NOT EXISTS alert_state (
    rule TEXT NOT NULL, key TEXT NOT NULL, since REAL NOT NULL, firing INTEGER NOT NULL DEFAULT 0, value REAL,
    PRIMARY KEY (rule, key)
);
CREATE TABLE IF NOT EXISTS alert_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, rule TEXT NOT NULL, kind TEXT NOT NULL, key TEXT NOT NULL,
    state TEXT NOT NULL, value REAL, message TEXT NOT NULL, ts REAL NOT NULL, webhook TEXT,
    delivered INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT NOT NULL DEFAULT ''
);
"""

# extra ingest processes' counters, read by /metrics (hub/ingest/workers.py)
INGEST_WORKERS = """CREATE TABLE IF NOT EXISTS ingest_workers (
    idx INTEGER PRIMARY KEY, pid INTEGER NOT NULL, received INTEGER NOT NULL, rejected INTEGER NOT NULL,
    updated_at REAL NOT NULL
);
"""

# web endpoints (hub/endpoints/manager.py)
ENDPOINTS = """CREATE TABLE IF NOT EXISTS endpoints (
    name TEXT PRIMARY KEY, versions TEXT NOT NULL, replicas INTEGER NOT NULL, max_batch INTEGER NOT NULL,
    max_wait_ms REAL NOT NULL, primary_key TEXT NOT NULL, secondary_key TEXT NOT NULL,
    port INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL, updated_at REAL NOT NULL
);
"""

# data export (hub/monitoring/export.py) pages through data_records in these orders
EXPORT_INDEXES = """CREATE INDEX IF NOT EXISTS data_records_ts ON data_records (ts, device, seq, idx);
CREATE INDEX IF NOT EXISTS data_records_module ON data_records (module, version, ts);
"""

# registry aliases, evaluations and event webhooks (migration 4)
MLOPS = """CREATE TABLE IF NOT EXISTS model_aliases (
    name TEXT NOT NULL, alias TEXT NOT NULL, version INTEGER NOT NULL, updated_at REAL NOT NULL,
    updated_by TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (name, alias)
);
-- metrics measured by running a model version on a data set (edgefleet model evaluate); never edited
CREATE TABLE IF NOT EXISTS model_evaluations (
    id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, version INTEGER NOT NULL, metrics TEXT NOT NULL,
    dataset TEXT NOT NULL DEFAULT '{}', dataset_sha256 TEXT NOT NULL DEFAULT '', created_at REAL NOT NULL,
    created_by TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS model_evaluations_version ON model_evaluations (name, version, id);
-- event subscriptions; the secret signs each delivery (HMAC-SHA256), so it is kept, and never shown
CREATE TABLE IF NOT EXISTS webhooks (
    id INTEGER PRIMARY KEY AUTOINCREMENT, url TEXT NOT NULL, events TEXT NOT NULL, secret TEXT NOT NULL DEFAULT '',
    description TEXT NOT NULL DEFAULT '', created_at REAL NOT NULL, created_by TEXT NOT NULL DEFAULT ''
);
-- one row per (event, receiver): written in the transaction of the change it announces, sent by one thread.
-- webhook NULL: an alert rule's own URL (unsigned)
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL, event TEXT NOT NULL, webhook INTEGER,
    url TEXT NOT NULL, body TEXT NOT NULL, state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0, next_at REAL NOT NULL, last_status INTEGER,
    last_error TEXT NOT NULL DEFAULT '', created_at REAL NOT NULL, delivered_at REAL
);
CREATE INDEX IF NOT EXISTS webhook_deliveries_due ON webhook_deliveries (state, next_at);
CREATE INDEX IF NOT EXISTS webhook_deliveries_event ON webhook_deliveries (event_id);
"""

# one row per shadow point of a telemetry batch (protocol ShadowPoint): hub/rollout/shadow_gates.py reads them
SHADOW = """CREATE TABLE IF NOT EXISTS shadow_points (
    device TEXT NOT NULL, seq INTEGER NOT NULL, idx INTEGER NOT NULL, ts REAL NOT NULL,
    module TEXT NOT NULL, version INTEGER NOT NULL, live_version INTEGER NOT NULL,
    mirrored INTEGER NOT NULL, dropped INTEGER NOT NULL, compared INTEGER NOT NULL, disagreements INTEGER NOT NULL,
    errors INTEGER NOT NULL, p95 REAL NOT NULL, live_p95 REAL NOT NULL, live_classes TEXT NOT NULL,
    shadow_classes TEXT NOT NULL,
    PRIMARY KEY (device, seq, idx)
);
CREATE INDEX IF NOT EXISTS shadow_points_module ON shadow_points (module, version, ts);
"""

# hub replicas on one database (hub/leader.py): the lease of the one leader, with a fencing epoch that grows with
# each new holder, and the desired-state syncs other replicas ask the leader for (the leader alone signs)
CLUSTER = """CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY, holder TEXT NOT NULL, epoch INTEGER NOT NULL, expires_at REAL NOT NULL
);
-- resign 1: also re-sign states a device would refuse (a key rotation or a new release policy on that replica)
CREATE TABLE IF NOT EXISTS director_requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT, devices TEXT, created_at REAL NOT NULL, resign INTEGER NOT NULL DEFAULT 0
);
-- the durable MQTT sessions that ingest (hub/ingest/sessions.py): a process that stops beating is adopted
CREATE TABLE IF NOT EXISTS mqtt_sessions (client_id TEXT PRIMARY KEY, seen_at REAL NOT NULL);
"""

MIGRATIONS: list[tuple[Step, ...]] = [
    (  # 1: the schema when versioning began (its columns were added by hubs of their time, so: only when missing)
        CORE,
        AddColumn("devices", "mqtt_password_mosq", "TEXT"),  # mosquitto $7$ hash of the device's broker password
        AddColumn("deployments", "revision", "INTEGER NOT NULL DEFAULT 1"),
        AddColumn("deployments", "stable_revision", "INTEGER"),  # what devices outside a rollout get; NULL: nothing
        AddColumn("deployment_revisions", "device_bake", "TEXT"),  # JSON BakePolicy for devices (protocol); NULL: none
        AddColumn("enrollment_tokens", "uses", "INTEGER NOT NULL DEFAULT 1"),  # >1: a fleet-provisioning (group) token
        AddColumn("enrollment_tokens", "used", "INTEGER NOT NULL DEFAULT 0"),
        AddColumn("models", "properties", "TEXT NOT NULL DEFAULT '{}'"),
        AddColumn("models", "lineage", "TEXT NOT NULL DEFAULT '{}'"),
        AddColumn("models", "baseline", "TEXT"),
        # endpoint rows in data_records (hub/endpoints/collect.py): source 'device' or 'endpoint', and its name
        AddColumn("data_records", "source", "TEXT NOT NULL DEFAULT 'device'"),
        AddColumn("data_records", "endpoint", "TEXT"),
        TELEMETRY, REGISTRY, ALERTS, INGEST_WORKERS, ENDPOINTS, EXPORT_INDEXES,
    ),
    (  # 2: signed release policies (revocations, per-module minimum versions): hub/trust/release_policy.py
        """CREATE TABLE IF NOT EXISTS release_policies (
    version INTEGER PRIMARY KEY, envelope TEXT NOT NULL, created_at REAL NOT NULL, created_by TEXT NOT NULL DEFAULT ''
);""",
    ),
    (  # 3: API and enrolment tokens that expire and are revoked; the audit log's hash chain (issue 13)
        AddColumn("api_tokens", "expires_at", "REAL"),  # NULL: never
        AddColumn("api_tokens", "revoked_at", "REAL"),
        AddColumn("api_tokens", "created_by", "TEXT NOT NULL DEFAULT ''"),
        # 'bootstrap': the admin token generated at first start or given by EDGEFLEET_ADMIN_TOKEN (one at a time);
        # 'api': made with POST /api/v1/tokens. Older hubs named their bootstrap tokens 'admin'.
        AddColumn("api_tokens", "source", "TEXT NOT NULL DEFAULT 'api'"),
        "UPDATE api_tokens SET source = 'bootstrap' WHERE name = 'admin' AND role = 'admin';",
        AddColumn("enrollment_tokens", "created_at", "REAL"),
        AddColumn("enrollment_tokens", "created_by", "TEXT NOT NULL DEFAULT ''"),
        AddColumn("enrollment_tokens", "revoked_at", "REAL"),
        # hash = sha256(prev_hash + canonical row): hub/audit.py; rows of older hubs are chained at start
        AddColumn("audit", "prev_hash", "TEXT"),
        AddColumn("audit", "hash", "TEXT"),
    ),
    (  # 4: the MLOps loop: registry aliases and recorded evaluations (hub/registry/aliases.py, evaluations.py),
        # event webhooks and one delivery table for them and for alert rules' own URLs (hub/events/)
        MLOPS,
        AddColumn("alert_events", "event_id", "TEXT"),  # the webhook event that carried it (webhook_deliveries)
    ),
    (  # 5: the operations console (issue 14): a stored device state (hub/fleet/device_state.py) and indexes so the
        # device list filters, counts and pages in SQL at 10,000+ devices (hub/fleet/device_query.py)
        AddColumn("devices", "state", "TEXT"),  # NULL until the hub computes it (at start, for older rows)
        # covers the counts by (state, online) without reading rows (signed envelopes make a row ~2 KB)
        "CREATE INDEX IF NOT EXISTS devices_state ON devices (state, online, id);",
        "CREATE INDEX IF NOT EXISTS devices_online ON devices (online, id);",
    ),
    (  # 6: per-module configuration in the desired state (issue 15): JSON object, NULL none
        AddColumn("deployment_revisions", "config", "TEXT"),
    ),
    (  # 7: shadow evaluation on devices (issue 18): a rollout's shadow phase and the devices' comparisons
        AddColumn("rollouts", "shadow_s", "REAL NOT NULL DEFAULT 0"),  # 0: no shadow phase
        AddColumn("rollouts", "shadow_started_at", "REAL"),  # every shadow device settled: the period runs
        AddColumn("rollouts", "shadow_sample_ppm", "INTEGER NOT NULL DEFAULT 1000000"),  # share of inputs mirrored
        SHADOW,
        # ground truth (hub/monitoring/labels.py): a device's record by the id its request carried, or by
        # device/seq/idx; labels are kept apart and joined, so a label may arrive before its record
        AddColumn("data_records", "sample_id", "TEXT"),
        """CREATE INDEX IF NOT EXISTS data_records_sample ON data_records (sample_id);
CREATE TABLE IF NOT EXISTS endpoint_canaries (
    endpoint TEXT PRIMARY KEY, module TEXT NOT NULL, steps TEXT NOT NULL, step INTEGER NOT NULL,
    interval_s REAL NOT NULL, gates TEXT NOT NULL, min_inferences INTEGER NOT NULL, step_started_at REAL NOT NULL,
    state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '', last_gate TEXT, updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS labels (
    sample_id TEXT PRIMARY KEY, label TEXT NOT NULL, ts REAL NOT NULL, source TEXT NOT NULL,
    created_by TEXT NOT NULL DEFAULT ''
);""",
    ),
    (  # 8: batch scoring jobs started on the hub (hub/batch/jobs.py)
        """CREATE TABLE IF NOT EXISTS batch_jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, module_name TEXT NOT NULL, module_version INTEGER NOT NULL,
    digest TEXT NOT NULL, requested TEXT NOT NULL, input TEXT NOT NULL, output TEXT NOT NULL,
    options TEXT NOT NULL DEFAULT '{}', state TEXT NOT NULL, rows_done INTEGER NOT NULL DEFAULT 0, rows_total INTEGER,
    rows_per_s REAL, error TEXT NOT NULL DEFAULT '', summary TEXT, pid INTEGER, created_at REAL NOT NULL,
    created_by TEXT NOT NULL DEFAULT '', started_at REAL, finished_at REAL
);""",
    ),
    (  # 9: rollout retry and schedules (issue 14): per device and bundle, the retry number the director puts in the desired
        # state and the desired revision that carried it (hub/rollout/retries.py)
        """CREATE TABLE IF NOT EXISTS install_retries (
    device TEXT NOT NULL, digest TEXT NOT NULL, retry INTEGER NOT NULL DEFAULT 0, revision INTEGER,
    PRIMARY KEY (device, digest)
);""",
        # scheduled rollouts: waves begin at or after start_at, inside the windows (hub/rollout/schedule.py)
        AddColumn("rollouts", "start_at", "REAL"),
        AddColumn("rollouts", "windows", "TEXT NOT NULL DEFAULT ''"),
        # signed diagnostic commands and their results (hub/fleet/commands.py)
        """CREATE TABLE IF NOT EXISTS device_commands (
    id TEXT PRIMARY KEY, device TEXT NOT NULL, name TEXT NOT NULL, args TEXT NOT NULL, state TEXT NOT NULL,
    result TEXT, error TEXT NOT NULL DEFAULT '', created_at REAL NOT NULL, created_by TEXT NOT NULL DEFAULT '',
    expires INTEGER NOT NULL, replied_at REAL
);
CREATE INDEX IF NOT EXISTS device_commands_device ON device_commands (device, created_at);""",
    ),
    (  # 10: replicas (issue 17): the leader's lease, director requests, states stored but not yet acknowledged
        CLUSTER,
        AddColumn("devices", "desired_published", "INTEGER NOT NULL DEFAULT 1"),
        AddColumn("batch_jobs", "owner", "TEXT"),  # the replica running it (its MQTT client id; hub/batch/jobs.py)
    ),
]
