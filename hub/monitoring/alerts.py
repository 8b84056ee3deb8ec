"""Alert rules on metrics and drift -> events in the hub -> webhooks (``hub/events``: signed, retried).

Rule kinds:

* ``drift``      a feature's PSI over ``window_s`` > ``threshold`` (one alert per feature);
* ``error_rate`` errors / inferences of a deployment over ``window_s`` > ``threshold``;
* ``offline``    a device offline for more than ``for_s`` (one alert per device);
* ``stale``      an online device that stops accepting new revisions: its reported revision lags the director's
                 latest by more than ``threshold`` (default 0), or its report carries a refusal or trust flag
                 (root expired, state refused, applied state expired, wrong clock), for ``for_s`` (default
                 600 s: every new revision lags until the device has it); one alert per device;
* ``key_expiry`` what a role signs (root, release, director) expires within ``threshold`` days (default 30),
                 from the same figures as the ``edgefleet_key_expiry_seconds`` gauge; one alert per role.

A condition must hold for ``for_s`` seconds before it fires (``offline`` uses
``for_s`` as its threshold instead); each firing and each resolution is one event, published as
``alert.fired`` / ``alert.resolved`` to the subscribed webhooks and to the rule's own ``webhook`` URL
(unsigned), through the one delivery mechanism of ``hub/events``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field

from hub.errors import Conflict, Invalid, NotFound
from hub.events.outbox import publish
from hub.monitoring.reports import DriftReports
from hub.monitoring.timeseries import SeriesFilter, totals
from hub.store import Database, loads

log = logging.getLogger("edgefleet.hub.alerts")



class AlertRule(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    kind: Literal["drift", "error_rate", "offline", "stale", "key_expiry"]
    deployment: str | None = Field(default=None, max_length=64)  # drift and error_rate: which deployment
    threshold: float = Field(default=0.2, allow_inf_nan=False)
    for_s: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    window_s: float = Field(default=300.0, gt=0, allow_inf_nan=False)
    webhook: str | None = Field(default=None, max_length=2048)


# a rule's threshold when none is given: PSI, error fraction, -, revisions behind, days ahead
DEFAULT_THRESHOLD = {"drift": 0.2, "error_rate": 0.2, "offline": 0.0, "stale": 0.0, "key_expiry": 30.0}
# and its for_s: a device lags every new revision for as long as it takes to receive and accept it
DEFAULT_FOR_S = {"stale": 600.0}


@dataclass(frozen=True)
class Breach:
    key: str
    value: float
    message: str


class Alerts:
    """Rules, their evaluation and events (their webhooks are sent by ``hub/events/webhooks.py``)."""

    def __init__(self, db: Database, reports: DriftReports,
                 expiry: Callable[[float], dict[str, float]] | None = None) -> None:
        self.db = db
        self.reports = reports
        # seconds to expiry per role at a time (hub/trust/renewal.key_expiry), given by the hub once it has its keys
        self.expiry = expiry

    # --- rules --------------------------------------------------------------------------------

    def add_rule(self, rule: AlertRule, who: str = "") -> dict[str, Any]:
        if rule.kind in ("drift", "error_rate") and not rule.deployment:
            raise Invalid(f"a {rule.kind} rule needs a deployment")
        if "threshold" not in rule.model_fields_set:
            rule = rule.model_copy(update={"threshold": DEFAULT_THRESHOLD[rule.kind]})
        if "for_s" not in rule.model_fields_set and rule.kind in DEFAULT_FOR_S:
            rule = rule.model_copy(update={"for_s": DEFAULT_FOR_S[rule.kind]})
        with self.db.transaction() as tx:
            if tx.execute("SELECT 1 FROM alert_rules WHERE name = ?", (rule.name,)).fetchone():
                raise Conflict(f"alert rule {rule.name!r} exists")
            tx.execute("INSERT INTO alert_rules (name, kind, deployment, threshold, for_s, window_s, webhook, "
                       "created_at, created_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (rule.name, rule.kind, rule.deployment, rule.threshold, rule.for_s, rule.window_s,
                        rule.webhook, time.time(), who))
        return self.rule(rule.name)

    def rule(self, name: str) -> dict[str, Any]:
        row = self.db.one("SELECT * FROM alert_rules WHERE name = ?", (name,))
        if row is None:
            raise NotFound(f"no alert rule {name!r}")
        return row

    def rules(self) -> list[dict[str, Any]]:
        return [r | {"status": self.status(r)} for r in self.db.query("SELECT * FROM alert_rules ORDER BY name")]

    def status(self, rule: dict[str, Any]) -> str:
        """Whether the rule can be checked at all: a drift rule on a module without a baseline cannot."""
        if rule["kind"] not in ("drift", "error_rate"):
            return "ok"
        try:
            target = self.reports.deployment_target(rule["deployment"])
        except NotFound:
            return f"deployment {rule['deployment']!r} does not exist: not checked"
        if rule["kind"] == "drift":
            info = self.reports.baseline_info(target)
            if info is None:
                return self.reports.no_baseline(target)
            if info["inherited"]:
                return f"ok: module {target.label} has no baseline of its own, compared against {info['module']}'s"
        return "ok"

    def delete_rule(self, name: str) -> None:
        self.rule(name)
        with self.db.transaction() as tx:
            tx.execute("DELETE FROM alert_rules WHERE name = ?", (name,))
            tx.execute("DELETE FROM alert_state WHERE rule = ?", (name,))

    def events(self, rule: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Newest first, each with the delivery state of the rule's own webhook (``delivered``, ``attempts``)."""
        sql = ("SELECT e.id, e.rule, e.kind, e.key, e.state, e.value, e.message, e.ts, e.webhook, e.event_id,"
               " CASE WHEN d.id IS NULL THEN e.delivered WHEN d.state = 'delivered' THEN 1 ELSE 0 END AS delivered,"
               " coalesce(d.attempts, e.attempts) AS attempts,"
               " coalesce(d.last_error, e.last_error) AS last_error FROM alert_events e LEFT JOIN webhook_deliveries d"
               " ON d.event_id = e.event_id AND d.webhook IS NULL")
        params: list[Any] = []
        if rule:
            sql += " WHERE e.rule = ?"
            params.append(rule)
        return self.db.query(sql + " ORDER BY e.id DESC LIMIT ?", [*params, limit])

    def firing(self) -> list[dict[str, Any]]:
        return self.db.query("SELECT * FROM alert_state WHERE firing = 1 ORDER BY rule, key")

    # --- evaluation ---------------------------------------------------------------------------

    def breaches(self, rule: dict[str, Any], now: float) -> list[Breach]:
        if rule["kind"] == "drift":
            try:
                report = self.reports.report(self.reports.deployment_target(rule["deployment"]), rule["window_s"],
                                             until=now, psi_threshold=rule["threshold"])
            except NotFound:
                return []
            return [Breach(f["feature"], f["psi"],
                           f"input drift on {f['feature']} in deployment {rule['deployment']}: "
                           f"PSI {f['psi']:.3f} > {rule['threshold']} (KS p={f['p_value']:.2g}, n={f['n_current']})")
                    for f in report["features"] if f["psi"] > rule["threshold"]]
        if rule["kind"] == "error_rate":
            try:
                target = self.reports.deployment_target(rule["deployment"])
            except NotFound:
                return []
            sums = totals(self.db, SeriesFilter(module=target.module, version=target.version, devices=target.devices),
                          now - rule["window_s"]).values()
            n, e = int(sum(s[1] for s in sums)), int(sum(s[2] for s in sums))
            rate = e / n if n else 0.0
            if n and rate > rule["threshold"]:
                return [Breach("error_rate", rate, f"error rate of deployment {rule['deployment']} is "
                                                    f"{rate:.1%} > {rule['threshold']:.1%} ({e} of {n})")]
            return []
        if rule["kind"] == "offline":
            rows = self.db.query("SELECT id, last_seen FROM devices WHERE online = 0 AND last_seen IS NOT NULL "
                                 "AND last_seen < ?", (now - rule["for_s"],))
            return [Breach(r["id"], now - r["last_seen"], f"device {r['id']} offline for {now - r['last_seen']:.0f}s")
                    for r in rows]
        if rule["kind"] == "stale":
            return self._stale(rule["threshold"])
        if rule["kind"] == "key_expiry":
            return self._expiring(rule["threshold"], now)
        return []

    def _stale(self, threshold: float) -> list[Breach]:
        out = []
        for r in self.db.query("SELECT id, revision, reported FROM devices WHERE online = 1 ORDER BY id"):
            reported = loads(r["reported"]) or {}
            applied, why = int(reported.get("revision", 0)), str(reported.get("error", ""))
            lag = r["revision"] - applied
            if lag > threshold or why:
                text = f"device {r['id']} answers revision {applied} of {r['revision']}"
                out.append(Breach(r["id"], float(lag), text + (f": {why}" if why else " (no reason reported)")))
        return out

    def _expiring(self, days: float, now: float) -> list[Breach]:
        if self.expiry is None:
            return []
        out = []
        for role, left in sorted(self.expiry(now).items()):
            if left < days * 86400:
                when = f"expired {-left / 86400:.1f} days ago" if left <= 0 else f"expire in {left / 86400:.1f} days"
                out.append(Breach(role, left, f"{role} signatures {when} (warning {days:g} days ahead)"))
        return out

    def evaluate(self, now: float | None = None) -> list[dict[str, Any]]:
        """Evaluate every rule once; return the events it raised."""
        now = time.time() if now is None else now
        raised = []
        for rule in self.rules():
            try:
                found = {b.key: b for b in self.breaches(rule, now)}
            except Exception:
                log.exception("evaluating alert rule %s failed", rule["name"])
                continue
            hold = 0.0 if rule["kind"] == "offline" else rule["for_s"]
            state = {r["key"]: r for r in self.db.query("SELECT * FROM alert_state WHERE rule = ?", (rule["name"],))}
            with self.db.transaction() as tx:
                for key, b in found.items():
                    current = state.get(key)
                    if current is None:
                        tx.execute("INSERT INTO alert_state (rule, key, since, firing, value) VALUES (?, ?, ?, 0, ?)",
                                   (rule["name"], key, now, b.value))
                        current = {"since": now, "firing": 0}
                    if not current["firing"] and now - current["since"] >= hold:
                        tx.execute("UPDATE alert_state SET firing = 1, value = ? WHERE rule = ? AND key = ?",
                                   (b.value, rule["name"], key))
                        raised.append(self._event(tx, rule, key, "firing", b.value, b.message))
                for key, current in state.items():
                    if key not in found:
                        tx.execute("DELETE FROM alert_state WHERE rule = ? AND key = ?", (rule["name"], key))
                        if current["firing"]:
                            raised.append(self._event(tx, rule, key, "resolved", None, f"{rule['name']}: {key} resolved"))
        for event in raised:
            log.warning("alert %s %s: %s", event["rule"], event["state"], event["message"])
        return raised

    def _event(self, tx: Any, rule: dict[str, Any], key: str, state: str, value: float | None,
               message: str) -> dict[str, Any]:
        ts = time.time()
        rid = tx.scalar("INSERT INTO alert_events (rule, kind, key, state, value, message, ts, webhook) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                        (rule["name"], rule["kind"], key, state, value, message, ts, rule["webhook"]))
        event = {"id": rid, "rule": rule["name"], "kind": rule["kind"], "key": key, "state": state,
                 "value": value, "message": message, "ts": ts, "webhook": rule["webhook"],
                 "deployment": rule["deployment"]}
        data = {k: v for k, v in event.items() if k not in ("id", "webhook")} | {"alert_event": rid}
        event_id = publish(tx, "alert.fired" if state == "firing" else "alert.resolved", data,
                           also=[rule["webhook"]] if rule["webhook"] else [])
        tx.execute("UPDATE alert_events SET event_id = ? WHERE id = ?", (event_id, rid))
        return event | {"event_id": event_id}
