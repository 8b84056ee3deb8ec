"""Webhook subscriptions and the one sender that delivers every pending delivery row.

A delivery is POSTed with its body exactly as stored, signed with the subscription's secret
(``signature.py``); a non-2xx answer or a network error is retried with exponential backoff
(``backoff_s`` × 2^n, at most ``MAX_DELAY_S``) until ``max_attempts``, then marked ``failed``. Rows
are the queue: deliveries pending when the hub stopped are sent after it starts again. Among hub
replicas the leader alone sends (hub/leader.py); any replica may queue.
"""

from __future__ import annotations

import logging
import secrets
import threading
from typing import Any
from urllib.parse import urlsplit

import httpx

from hub.audit import record
from hub.errors import Invalid, NotFound
from hub.events import signature
from hub.events.catalog import PING, check_events
from hub.events.outbox import enqueue
from hub.leader import SOLE_LEADER, Leader
from hub.store import Database, dumps, loads, now

log = logging.getLogger("edgefleet.hub.webhooks")

MAX_DELAY_S = 300.0
STATES = ("pending", "delivered", "failed", "cancelled")
USER_AGENT = "edgefleet-hub"


def check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Invalid(f"webhook URL {url!r} must be http:// or https:// with a host")
    return url


def hook_row(row: dict[str, Any]) -> dict[str, Any]:
    """A subscription as shown: never its secret."""
    return {"id": row["id"], "url": row["url"], "events": loads(row["events"], []), "signed": bool(row["secret"]),
            "description": row["description"], "created_at": row["created_at"], "created_by": row["created_by"]}


class Webhooks:
    def __init__(self, db: Database, backoff_s: float = 1.0, max_attempts: int = 10, timeout_s: float = 5.0,
                 poll_s: float = 0.25, leader: Leader = SOLE_LEADER) -> None:
        self.db, self.leader = db, leader  # hub replicas: the leader alone sends (each delivery once)
        self.backoff_s, self.max_attempts, self.poll_s = backoff_s, max_attempts, poll_s
        self._http = httpx.Client(timeout=timeout_s, headers={"User-Agent": USER_AGENT})
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- subscriptions -------------------------------------------------------------------------

    def add(self, url: str, events: list[str], secret: str | None = None, description: str = "",
            actor: str = "") -> dict[str, Any]:
        """Subscribe ``url`` to ``events``; with no secret the hub makes one. The secret is returned here only."""
        check_url(url)
        try:
            events = check_events(events)
        except ValueError as exc:
            raise Invalid(str(exc)) from None
        if secret is not None and len(secret) < 16:
            raise Invalid("a webhook secret needs at least 16 characters (leave it out and the hub makes one)")
        secret = secret or secrets.token_urlsafe(32)
        with self.db.transaction() as tx:
            hook = tx.scalar("INSERT INTO webhooks (url, events, secret, description, created_at, created_by) "
                             "VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
                             (url, dumps(events), secret, description, now(), actor))
            record(self.db, actor, "webhook.added", str(hook), url=url, events=events)
        return self.get(hook) | {"secret": secret}

    def get(self, hook: int) -> dict[str, Any]:
        row = self.db.one("SELECT * FROM webhooks WHERE id = ?", (hook,))
        if row is None:
            raise NotFound(f"no webhook {hook}")
        return hook_row(row)

    def list(self) -> list[dict[str, Any]]:
        return [hook_row(r) for r in self.db.query("SELECT * FROM webhooks ORDER BY id")]

    def delete(self, hook: int, actor: str = "") -> dict[str, Any]:
        """Unsubscribe; its deliveries still pending are cancelled (their record stays)."""
        self.get(hook)
        with self.db.transaction() as tx:
            tx.execute("DELETE FROM webhooks WHERE id = ?", (hook,))
            cancelled = tx.execute("UPDATE webhook_deliveries SET state = 'cancelled' WHERE webhook = ? "
                                   "AND state = 'pending'", (hook,)).rowcount
            record(self.db, actor, "webhook.deleted", str(hook), cancelled=cancelled)
        return {"id": hook, "deleted": True, "cancelled": cancelled}

    def ping(self, hook: int) -> dict[str, Any]:
        """Send a ``ping`` event to one webhook (to check its URL and signature check)."""
        h = self.get(hook)
        with self.db.transaction() as tx:
            event_id = enqueue(tx, PING, {"webhook": hook}, [(hook, h["url"])])
        return {"event_id": event_id, "webhook": hook}

    # --- deliveries ----------------------------------------------------------------------------

    def deliveries(self, hook: int | None = None, state: str | None = None, event: str | None = None,
                   event_id: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        if state is not None and state not in STATES:
            raise Invalid(f"state must be one of {STATES}")
        where, params = ["1=1"], []
        for column, value in (("webhook", hook), ("state", state), ("event", event), ("event_id", event_id)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        return self.db.query("SELECT id, event_id, event, webhook, url, state, attempts, last_status, last_error,"
                             " next_at, created_at, delivered_at FROM webhook_deliveries WHERE "
                             + " AND ".join(where) + " ORDER BY id DESC LIMIT ?", [*params, limit])

    def redeliver(self, delivery: int) -> dict[str, Any]:
        """Send a delivery again (failed, or to repeat a delivered one): a new row with the same event and body, so
        the first one's record (and the attempt counts) stay as they were."""
        with self.db.transaction() as tx:
            old = self.delivery(delivery)
            if old["webhook"] is not None and tx.one("SELECT 1 FROM webhooks WHERE id = ?", (old["webhook"],)) is None:
                raise NotFound(f"delivery {delivery} was to webhook {old['webhook']}, which no longer exists")
            t = now()
            new = tx.scalar("INSERT INTO webhook_deliveries (event_id, event, webhook, url, body, next_at, created_at)"
                            " VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
                            (old["event_id"], old["event"], old["webhook"], old["url"], old["body"], t, t))
        return self.delivery(new)

    def delivery(self, delivery: int) -> dict[str, Any]:
        row = self.db.one("SELECT * FROM webhook_deliveries WHERE id = ?", (delivery,))
        if row is None:
            raise NotFound(f"no delivery {delivery}")
        return row

    # --- the sender ----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="hub-webhooks", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(10)
        self._http.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                sent = self.send_due()
            except Exception:
                log.exception("webhook delivery pass failed")
                sent = 0
            if not sent:
                self._stop.wait(self.poll_s)

    def send_due(self, limit: int = 20) -> int:
        """One pass: attempt every delivery that is due (oldest first); returns how many were attempted."""
        if not self.leader.is_leader():
            return 0
        due = self.db.query(
            "SELECT d.id, d.event_id, d.event, d.webhook, d.url, d.body, d.attempts, w.secret FROM webhook_deliveries d"
            " LEFT JOIN webhooks w ON w.id = d.webhook WHERE d.state = 'pending' AND d.next_at <= ?"
            " ORDER BY d.next_at, d.id LIMIT ?", (now(), limit))
        for d in due:
            if self._stop.is_set():
                break
            self._attempt(d)
        return len(due)

    def _attempt(self, d: dict[str, Any]) -> None:
        if d["webhook"] is not None and d["secret"] is None:  # unsubscribed since
            with self.db.transaction() as tx:
                tx.execute("UPDATE webhook_deliveries SET state = 'cancelled' WHERE id = ?", (d["id"],))
            return
        body = d["body"].encode()
        headers = {"Content-Type": "application/json", signature.EVENT_HEADER: d["event"],
                   signature.EVENT_ID_HEADER: d["event_id"], signature.DELIVERY_HEADER: str(d["id"]),
                   signature.TIMESTAMP_HEADER: str(int(loads(d["body"])["ts"]))}
        if d["secret"]:
            headers[signature.SIGNATURE_HEADER] = signature.sign(d["secret"], body)
        status: int | None = None
        try:
            resp = self._http.post(d["url"], content=body, headers=headers)
            status = resp.status_code
            ok, error = 200 <= status < 300, "" if 200 <= status < 300 else f"HTTP {status}"
        except httpx.HTTPError as exc:
            ok, error = False, str(exc) or type(exc).__name__
        attempts = d["attempts"] + 1
        t = now()
        if ok:
            state, next_at = "delivered", t
        elif attempts >= self.max_attempts:
            state, next_at = "failed", t
            log.error("webhook delivery %s (%s to %s) failed %d times; giving up: %s", d["id"], d["event"], d["url"],
                      attempts, error)
        else:
            state, next_at = "pending", t + min(MAX_DELAY_S, self.backoff_s * 2 ** (attempts - 1))
            log.warning("webhook delivery %s (%s to %s) failed (%s); attempt %d in %.1fs", d["id"], d["event"],
                        d["url"], error, attempts + 1, next_at - t)
        with self.db.transaction() as tx:
            tx.execute("UPDATE webhook_deliveries SET state = ?, attempts = ?, next_at = ?, last_status = ?,"
                       " last_error = ?, delivered_at = ? WHERE id = ? AND state = 'pending'",
                       (state, attempts, next_at, status, error, t if ok else None, d["id"]))
