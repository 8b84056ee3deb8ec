"""Fleet: enrolment tokens, device enrolment, and the device views the API shows."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from hub.audit import record
from hub.bounds import check_labels
from hub.errors import Conflict, Forbidden, Invalid, NotFound
from hub.fleet.broker_auth import mosquitto_hash
from hub.fleet.device_query import DeviceFilter
from hub.fleet.device_state import active_hold, device_state, module_views, summarize
from hub.ingest.writer import EnrolledCache
from hub.monitoring.timeseries import device_totals
from hub.rollout.director import Director
from hub.store import Database, dumps, loads, now
from hub.trust.keys import KeyRing
from hub.trust.tokens import hash_token
from protocol.encoding import ProtocolError
from protocol.topics import Channel, check_device_id, device_topic

log = logging.getLogger("edgefleet.hub.fleet")

MAX_TOKEN_USES = 1_000_000
MAX_BATCH = 1000  # devices per bulk enrolment request


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


class Fleet:
    def __init__(self, db: Database, keys: KeyRing, director: Director, device_mqtt_url: str,
                 broker_ca_pem: str | None = None) -> None:
        self.db, self.keys, self.director, self.device_mqtt_url = db, keys, director, device_mqtt_url
        self.broker_ca_pem = broker_ca_pem  # handed to devices at enrolment so they pin the broker's CA
        self.enrolled = EnrolledCache(db)  # the per-message check on the MQTT thread
        self.on_credentials_changed: Callable[[], None] = lambda: None  # isolation: rewrite the broker's files
        self.fill_states()  # rows of an older hub get the state the device list filters on

    def broker_credentials(self) -> list[tuple[str, str]]:
        """(device id, mosquitto $7$ hash) of every enrolled device, for the broker's password file."""
        return [(r["id"], r["mqtt_password_mosq"]) for r in self.db.query(
            "SELECT id, mqtt_password_mosq FROM devices WHERE mqtt_password_mosq IS NOT NULL ORDER BY id")]

    def set_labels(self, device_id: str, set_: dict[str, str], unset: list[str], actor: str) -> dict[str, Any]:
        """Change labels; the device's desired state follows (deployments select by label)."""
        for k in [*set_, *unset]:
            if not k or "=" in k or "," in k or "!" in k:
                raise Invalid(f"label key {k!r} is not usable in a selector")
        with self.db.transaction() as tx:
            row = self.db.one("SELECT labels FROM devices WHERE id = ?", (device_id,))
            if row is None:
                raise NotFound(f"device {device_id!r} is not enrolled")
            labels = check_labels({k: v for k, v in loads(row["labels"], {}).items() if k not in unset} | set_)
            tx.execute("UPDATE devices SET labels = ? WHERE id = ?", (dumps(labels), device_id))
            record(self.db, actor, "device.labels", device_id, set=set_, unset=unset)
        self.director.sync([device_id])
        return self.device(device_id)

    def decommission(self, device_id: str, actor: str) -> dict[str, Any]:
        """Forget the device and revoke its broker login now; clear its retained topics."""
        self.enrolled.forget(device_id)
        with self.db.transaction() as tx:
            if tx.execute("DELETE FROM devices WHERE id = ?", (device_id,)).rowcount == 0:
                raise NotFound(f"device {device_id!r} is not enrolled")
            tx.execute("DELETE FROM rollout_devices WHERE device = ?", (device_id,))
            tx.execute("DELETE FROM install_retries WHERE device = ?", (device_id,))
            tx.execute("DELETE FROM device_commands WHERE device = ?", (device_id,))
            record(self.db, actor, "device.decommissioned", device_id)
        self.on_credentials_changed()
        for channel in (Channel.DESIRED, Channel.REPORTED, Channel.STATUS):
            self.director.publish(device_topic(device_id, channel), b"", 1, True)  # empty retained: deleted
        log.info("decommissioned device %s", device_id)
        return {"id": device_id, "decommissioned": True}

    def create_enrollment_tokens(self, count: int, labels: dict[str, str], expires_in: int,
                                 uses: int = 1, actor: str = "") -> dict[str, Any]:
        """``count`` tokens, each good for ``uses`` enrolments (>1: a group token for fleet provisioning)."""
        if not 1 <= count <= 10_000 or expires_in <= 0 or not 1 <= uses <= MAX_TOKEN_USES:
            raise Invalid(f"count must be 1..10000, uses 1..{MAX_TOKEN_USES} and expires_in positive")
        t = now()
        expires_at = t + expires_in
        tokens = [secrets.token_urlsafe(24) for _ in range(count)]
        hashes = [hash_token(tok) for tok in tokens]
        with self.db.transaction() as tx:
            tx.insert_many("enrollment_tokens", ("token_hash", "labels", "expires_at", "uses", "created_at", "created_by"),
                           [(h, dumps(labels), expires_at, uses, t, actor) for h in hashes])
            record(self.db, actor or "hub", "enrollment_tokens.created", f"{count} token(s)", uses=uses, labels=labels,
                   expires_at=expires_at, ids=[h[:12] for h in hashes[:100]])
        return {"tokens": tokens, "ids": [h[:12] for h in hashes], "expires_at": expires_at, "uses": uses}

    def enroll(self, token: str, device_id: str | None, facts: dict[str, str]) -> dict[str, Any]:
        """Spend one use of a token: create the device, hand it credentials and the root of trust."""
        [device] = self.enroll_many(token, [(device_id, facts)])["devices"]
        return {"device_id": device["device_id"], "mqtt_url": self.device_mqtt_url,
                "mqtt_username": device["mqtt_username"], "mqtt_password": device["mqtt_password"],
                "root": self.keys.root_envelope, "hub_time": time.time(),
                **({"broker_ca": self.broker_ca_pem} if self.broker_ca_pem else {})}

    def enroll_many(self, token: str, devices: list[tuple[str | None, dict[str, str]]]) -> dict[str, Any]:
        """Enrol several devices with one token (one use each) in one transaction: all or none.

        One broker reload and one desired-state pass for the lot, which is what makes provisioning a
        large fleet (a factory line, the simulator) cheap. Returns the shared broker URL, root and
        clock, and each device's id and broker credentials.
        """
        if not 1 <= len(devices) <= MAX_BATCH:
            raise Invalid(f"enrol 1..{MAX_BATCH} devices per request, not {len(devices)}")
        ids = [d for d, _ in devices if d is not None]
        for d in ids:
            try:
                check_device_id(d)
            except ProtocolError as exc:
                raise Invalid(str(exc)) from None
        if len(set(ids)) != len(ids):
            raise Invalid("a device id appears twice in the request")
        rows, out = [], []
        with self.db.transaction() as tx:
            tok = self.db.one("SELECT * FROM enrollment_tokens WHERE token_hash = ?", (hash_token(token),))
            if tok is None:
                raise Forbidden("enrolment token is not valid: the hub never issued it")
            if tok["revoked_at"] is not None:
                raise Forbidden(f"enrolment token was revoked at {_iso(tok['revoked_at'])}")
            left = tok["uses"] - tok["used"]
            if left <= 0:
                raise Forbidden(f"enrolment token was already used (by device {tok['used_by']}); tokens are single-use"
                                if tok["uses"] == 1 else f"enrolment token is used up (all {tok['uses']} uses)")
            if left < len(devices):
                raise Forbidden(f"enrolment token has {left} use(s) left, not {len(devices)}")
            if tok["expires_at"] <= now():
                raise Forbidden(f"enrolment token expired at {_iso(tok['expires_at'])}")
            taken = [r["id"] for i in range(0, len(ids), 500) for r in self.db.query(
                f"SELECT id FROM devices WHERE id IN ({','.join('?' * len(ids[i:i + 500]))})", tuple(ids[i:i + 500]))]
            if taken:
                raise Conflict(f"device id {taken[0]!r} is already enrolled" + (f" (and {len(taken) - 1} more)"
                                                                                if len(taken) > 1 else ""))
            labels, ts = loads(tok["labels"], {}), now()
            chosen = set(ids)
            for device_id, facts in devices:
                if device_id is None:
                    while (device_id := self._fresh_id()) in chosen:
                        pass
                    chosen.add(device_id)
                password = secrets.token_urlsafe(24)
                rows.append((device_id, tok["labels"], dumps(facts), ts, hash_token(password), mosquitto_hash(password)))
                out.append({"device_id": device_id, "mqtt_username": device_id, "mqtt_password": password})
            tx.insert_many("devices", ("id", "labels", "facts", "created_at", "mqtt_password_hash",
                                       "mqtt_password_mosq", "state"), [(*r, "idle") for r in rows])
            tx.execute("UPDATE enrollment_tokens SET used = used + ?, used_by = ? WHERE token_hash = ?",
                       (len(rows), rows[-1][0], tok["token_hash"]))
            for r in rows:
                record(self.db, f"device:{r[0]}", "device.enrolled", r[0], labels=labels)
        log.info("enrolled %s", rows[0][0] if len(rows) == 1 else f"{len(rows)} devices")
        self.on_credentials_changed()  # before answering: the device connects as soon as it has its password
        self.director.sync([r[0] for r in rows])
        return {"devices": out, "mqtt_url": self.device_mqtt_url, "root": self.keys.root_envelope,
                "hub_time": time.time(), **({"broker_ca": self.broker_ca_pem} if self.broker_ca_pem else {})}

    def _fresh_id(self) -> str:
        while True:
            candidate = f"dev-{secrets.token_hex(4)}"
            if self.db.one("SELECT 1 FROM devices WHERE id = ?", (candidate,)) is None:
                return candidate

    def is_enrolled(self, device_id: str) -> bool:
        return self.enrolled(device_id)

    def fill_states(self) -> int:
        """Compute ``state`` for rows that lack it (written by an older hub); returns how many."""
        rows = self.db.query("SELECT id, desired, reported FROM devices WHERE state IS NULL")
        if rows:
            with self.db.transaction() as tx:
                tx.executemany("UPDATE devices SET state = ? WHERE id = ?",
                               [(device_state(r["desired"], r["reported"]), r["id"]) for r in rows])
        return len(rows)

    def _view(self, row: dict[str, Any], totals: dict[str, tuple[int, int]]) -> dict[str, Any]:
        desired = loads(row["desired"], [])
        reported = loads(row["reported"])
        views = module_views(desired, reported)
        inferences, errors = totals.get(row["id"], (0, 0))
        return {
            "id": row["id"], "online": bool(row["online"]), "state": summarize(desired, views),
            "labels": loads(row["labels"], {}), "facts": loads(row["facts"], {}), "last_seen": row["last_seen"],
            "revision": row["revision"], "reported_revision": (reported or {}).get("revision"),
            # how the device got the revision it reports: from the hub, or an offline package (agent/offline.py)
            "reported_source": (reported or {}).get("source", "hub") if reported else None,
            "error": (reported or {}).get("error", ""), "modules": views,
            "inferences": inferences, "errors": errors, "hold": active_hold(reported, time.time()),
        }

    def _totals(self, ids: list[str]) -> dict[str, tuple[int, int]]:
        """(inferences, errors) of these devices over all time."""
        if not ids:
            return {}
        rows = self.db.query("SELECT device, SUM(inferences) AS n, SUM(errors) AS e FROM telemetry_minutes"
                             f" WHERE device IN ({','.join('?' * len(ids))}) GROUP BY device", ids)
        return {r["device"]: (r["n"] or 0, r["e"] or 0) for r in rows}

    def devices(self, f: DeviceFilter | None = None) -> list[dict[str, Any]]:
        """Every device (matching ``f``), ordered by id."""
        where, params = (f or DeviceFilter()).where()
        totals = device_totals(self.db)
        return [self._view(r, totals) for r in self.db.query("SELECT * FROM devices" + where + " ORDER BY id", params)]

    def page(self, f: DeviceFilter, limit: int, cursor: str | None = None) -> dict[str, Any]:
        """One page of the devices matching ``f`` after device id ``cursor`` (keyset: stable while devices come and
        go), how many match in all, and how many of those are in each status (whatever ``f.status`` says)."""
        where, params = f.where()
        after = (" AND" if where else " WHERE") + " id > ?" if cursor else ""
        rows = self.db.query(f"SELECT * FROM devices{where}{after} ORDER BY id LIMIT ?",
                             [*params, *([cursor] if cursor else []), limit + 1])
        more = len(rows) > limit
        rows = rows[:limit]
        totals = self._totals([r["id"] for r in rows])
        where, params = f.where(status=False)
        counts: dict[str, int] = {"online": 0, "offline": 0}
        for r in self.db.query(f"SELECT state, online, COUNT(*) AS n FROM devices{where} GROUP BY state, online",
                               params):
            counts["online" if r["online"] else "offline"] += r["n"]
            counts[r["state"] or "idle"] = counts.get(r["state"] or "idle", 0) + r["n"]
        total = counts.get(f.status, 0) if f.status else counts["online"] + counts["offline"]
        return {"items": [self._view(r, totals) for r in rows], "total": total, "limit": limit,
                "next_cursor": rows[-1]["id"] if more else None, "counts": counts}

    def label_many(self, where: list[DeviceFilter], set_: dict[str, str], unset: list[str],
                   actor: str) -> dict[str, Any]:
        """Set or remove labels on every device any of ``where`` matches (each with a selector); one audit record
        each."""
        if not where or any(not f.selector for f in where):
            raise Invalid("a bulk label change needs a selector (use '*' for every device)")
        for k in [*set_, *unset]:
            if not k or "=" in k or "," in k or "!" in k:
                raise Invalid(f"label key {k!r} is not usable in a selector")
        ids = sorted({r["id"] for f in where for r in self.db.query(
            "SELECT id FROM devices" + f.where()[0], f.where()[1])})
        with self.db.transaction() as tx:
            for device_id in ids:
                row = self.db.one("SELECT labels FROM devices WHERE id = ?", (device_id,))
                if row is None:  # decommissioned meanwhile
                    continue
                labels = check_labels({k: v for k, v in loads(row["labels"], {}).items() if k not in unset} | set_)
                tx.execute("UPDATE devices SET labels = ? WHERE id = ?", (dumps(labels), device_id))
                record(self.db, actor, "device.labels", device_id, set=set_, unset=unset)
        if ids:
            self.director.sync(ids)
        return {"matched": len(ids), "devices": ids, "set": set_, "unset": unset}

    def device(self, device_id: str) -> dict[str, Any]:
        """One device's view, with its desired modules as signed (``desired``) and what it last reported."""
        row = self.db.one("SELECT * FROM devices WHERE id = ?", (device_id,))
        if row is None:
            raise NotFound(f"device {device_id!r} is not enrolled")
        return self._view(row, self._totals([device_id])) | {
            "desired": loads(row["desired"], []), "reported": loads(row["reported"]),
            "desired_expires": row["desired_expires"], "created_at": row["created_at"]}

    def summary(self) -> dict[str, Any]:
        """Counts from SQL alone: no device's JSON is decoded (the console polls this)."""
        by_state: dict[str, int] = {}
        devices = online = 0
        for r in self.db.query("SELECT state, online, COUNT(*) AS n FROM devices GROUP BY state, online"):
            devices += r["n"]
            online += r["n"] if r["online"] else 0
            by_state[r["state"] or "idle"] = by_state.get(r["state"] or "idle", 0) + r["n"]
        n, e = self.db.db().execute("SELECT SUM(inferences), SUM(errors) FROM telemetry_minutes"
                                    " WHERE device IN (SELECT id FROM devices)").fetchone()
        return {"devices": devices, "online": online, "inferences": n or 0, "errors": e or 0, "by_state": by_state}
