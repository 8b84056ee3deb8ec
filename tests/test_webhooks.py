"""Event webhooks over real parts: a hub, the CLI, real HTTP receivers checking HMAC signatures, retries."""

from __future__ import annotations

import time

import pytest

from hub.events.webhooks import Webhooks
from hub.testing import wait_until
from modules.examples import write_logreg_onnx, write_sample
from tests.clirun import as_json, cli
from tests.pg import hub_store
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.hubstore  # run again on PostgreSQL by scripts/test.sh

SECRET = "s3cret-shared-with-the-receiver"
EVENTS = ["model.registered", "alias.moved", "rollout.started", "rollout.succeeded", "rollout.rolled_back",
          "alert.fired"]


@pytest.fixture
def hub_options() -> dict:
    return {"webhook_backoff_s": 0.05, "rollout_tick_s": 0.1}


@pytest.fixture
def receiver():
    r = Receiver(fail_first=2)
    yield r
    r.close()


def test_signed_events_reach_a_receiver_that_fails_twice_then_succeeds(server, admin, receiver, tmp_path):
    args = ["webhook", "add", receiver.url, "--secret", SECRET, "--json"] + [a for e in EVENTS for a in ("--event", e)]
    hook = as_json(cli(server, *args))
    assert hook["signed"] and hook["events"] == EVENTS
    assert "secret" not in admin.get("/api/v1/webhooks").json()[0]  # shown once, at creation

    model = write_logreg_onnx(tmp_path / "model.onnx")
    cli(server, "model", "register", "churn", str(model))  # model.registered: refused twice, then delivered
    first = receiver.take(1)[0]
    assert first.signed_with(SECRET) and not first.signed_with(SECRET + "x")
    body = first.body
    assert body["event"] == "model.registered" and body["data"]["model"] == "churn" and body["data"]["version"] == 1
    assert first.headers["x-edgefleet-event"] == "model.registered"
    assert first.headers["x-edgefleet-event-id"] == body["id"]
    assert abs(int(first.headers["x-edgefleet-timestamp"]) - time.time()) < 60
    delivery = as_json(cli(server, "webhook", "deliveries", "--event", "model.registered", "--json"))[0]
    assert delivery["state"] == "delivered" and delivery["attempts"] == 3 and delivery["last_status"] == 204
    assert receiver.attempts == 3

    cli(server, "model", "alias", "set", "churn", "champion", "1")
    moved = receiver.take(1)[0]
    assert moved.signed_with(SECRET) and moved.body["event"] == "alias.moved"
    assert moved.body["data"] | {"actor": None} == {"model": "churn", "alias": "champion", "version": 1,
                                                     "previous": None, "actor": None}

    # a rollout to a selector no device matches: started and succeeded at once
    cli(server, "module", "build", "churn", "--model", "churn@champion", "--sample",
        str(write_sample(tmp_path / "sample.json")))
    cli(server, "deploy", "edge", "nobody", "--module", "churn:1", "--target", "site=nowhere")
    got = [d.body for d in receiver.take(2)]
    assert [b["event"] for b in got] == ["rollout.started", "rollout.succeeded"]
    assert got[1]["data"]["deployment"] == "nobody" and got[1]["data"]["module"] == "churn:1"
    # the next revision bakes for a minute; an operator rolls it back
    cli(server, "model", "register", "churn", str(write_logreg_onnx(tmp_path / "m2.onnx", seed=2)))
    cli(server, "module", "build", "churn", "--model", "churn:2")
    cli(server, "deploy", "edge", "nobody", "--module", "churn:2", "--target", "site=nowhere", "--bake", "60s")
    cli(server, "rollout", "rollback", "nobody")
    got = [d for d in receiver.take(3)]
    assert [d.body["event"] for d in got] == ["model.registered", "rollout.started", "rollout.rolled_back"]
    assert all(d.signed_with(SECRET) for d in got)
    back = got[2].body["data"]
    assert back["module"] == "churn:2" and back["from_module"] == "churn:1" and "rolled back by" in back["reason"]

    # an alert: the subscription and the rule's own URL both hear of it, through the same delivery table
    plain = Receiver()
    try:
        with server.hub.db.transaction() as tx:
            tx.execute("INSERT INTO devices (id, labels, facts, online, last_seen, revision, created_at) "
                       "VALUES ('gone-1', '{}', '{}', 0, ?, 0, ?)", (time.time() - 600, time.time() - 900))
        admin.post("/api/v1/alerts/rules", json={"name": "offline", "kind": "offline", "for_s": 300,
                                                 "webhook": plain.url}).raise_for_status()
        raised = admin.post("/api/v1/alerts/evaluate").json()
        assert [(e["key"], e["state"]) for e in raised] == [("gone-1", "firing")]
        fired, own = receiver.take(1)[0], plain.take(1)[0]
        assert fired.signed_with(SECRET) and fired.body["event"] == "alert.fired"
        assert fired.body["data"]["rule"] == "offline" and fired.body["data"]["key"] == "gone-1"
        assert own.raw == fired.raw and "x-edgefleet-signature" not in own.headers  # the rule's URL has no secret
        event = wait_until(lambda: [e for e in admin.get("/api/v1/alerts/events").json() if e["delivered"]], 10,
                           0.1, "the alert's own delivery")[0]
        assert event["event_id"] == fired.body["id"] and event["attempts"] == 1
    finally:
        plain.close()

    # nothing for events the webhook did not subscribe to (model.evaluated, alias.deleted); every delivery done
    cli(server, "model", "alias", "delete", "churn", "champion")
    rows = as_json(cli(server, "webhook", "deliveries", "--json", "--limit", "100"))
    assert {r["event"] for r in rows} == set(EVENTS)
    assert {r["state"] for r in rows} == {"delivered"}
    metrics = admin.get("/metrics").text
    assert 'edgefleet_hub_webhook_attempts_total{outcome="failed"} 2' in metrics


def test_ping_cancel_on_delete_and_redeliver(server, admin):
    r = Receiver()
    try:
        hook = as_json(cli(server, "webhook", "add", r.url, "--event", "*", "--json"))
        assert len(hook["secret"]) >= 32  # made by the hub, shown once
        cli(server, "webhook", "ping", str(hook["id"]))
        ping = r.take(1)[0]
        assert ping.body["event"] == "ping" and ping.signed_with(hook["secret"])

        def delivered_ping() -> dict | None:
            row = admin.get("/api/v1/webhooks/deliveries", params={"event": "ping"}).json()[0]
            return row if row["state"] == "delivered" else None

        done = wait_until(delivered_ping, 10, 0.1, "ping delivered")
        again = as_json(cli(server, "webhook", "redeliver", str(done["id"]), "--json"))
        assert again["state"] == "pending" and again["id"] != done["id"] and again["event_id"] == done["event_id"]
        assert r.take(1)[0].raw == ping.raw  # the same event, body and signature
    finally:
        r.close()
    # a receiver that is gone: deliveries wait with backoff; deleting the webhook cancels them
    dead = as_json(cli(server, "webhook", "add", r.url, "--event", "alias.moved", "--secret", SECRET, "--json"))
    server.hub.webhooks.backoff_s = 30.0
    cli(server, "webhook", "ping", str(dead["id"]))
    wait_until(lambda: admin.get("/api/v1/webhooks/deliveries", params={"webhook": dead["id"]}).json()[0]["attempts"],
               10, 0.1, "a failed attempt")
    gone = as_json(cli(server, "webhook", "delete", str(dead["id"]), "--json"))
    assert gone["cancelled"] == 1
    row = admin.get("/api/v1/webhooks/deliveries", params={"webhook": dead["id"]}).json()[0]
    assert row["state"] == "cancelled" and "connect" in row["last_error"].lower()
    assert admin.post("/api/v1/webhooks", json={"url": "ftp://x", "events": ["alias.moved"]}).status_code == 422
    refused = admin.post("/api/v1/webhooks", json={"url": r.url, "events": ["model.deleted"]})
    assert refused.status_code == 422 and "unknown event(s) ['model.deleted']" in refused.json()["detail"]
    assert admin.post("/api/v1/webhooks", json={"url": r.url, "events": ["*"], "secret": "short"}).status_code == 422


def test_pending_deliveries_survive_a_restart(tmp_path):
    """The rows are the queue: a sender stopped mid-retry leaves them pending; the next one delivers them."""
    from hub.events.outbox import publish

    db = hub_store(tmp_path)
    r = Receiver(fail_first=1)
    try:
        first = Webhooks(db, backoff_s=0.2)
        first.add(r.url, ["alias.moved"], SECRET)
        first.start()
        with db.transaction() as tx:
            publish(tx, "alias.moved", {"model": "m", "alias": "champion", "version": 2})
        wait_until(lambda: first.deliveries()[0]["attempts"] == 1, 10, 0.05, "the refused attempt")
        first.stop()
        assert first.deliveries()[0]["state"] == "pending" and r.received.empty()
        second = Webhooks(db, backoff_s=0.2)
        second.start()
        try:
            got = r.take(1)[0]
            assert got.signed_with(SECRET) and got.body["data"]["version"] == 2
        finally:
            second.stop()
        assert second.deliveries()[0]["attempts"] == 2
    finally:
        r.close()
        db.close()
