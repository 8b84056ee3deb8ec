"""Event webhooks: ``webhook add|list|delete|ping|deliveries|redeliver``."""

from __future__ import annotations

import typer

from edgefleet.cli_common import call, client, emit, err, get

webhook_app = typer.Typer(rich_markup_mode=None, help="Event webhooks: signed POSTs when models, aliases, rollouts and alerts change.",
                          no_args_is_help=True)


@webhook_app.command("add")
def webhook_add(
    url: str,
    event: list[str] = typer.Option(..., "--event", help="model.registered, model.evaluated, alias.moved, "
                                                          "alias.deleted, rollout.started, rollout.succeeded, "
                                                          "rollout.rolled_back, rollout.halted, rollout.aborted, "
                                                          "alert.fired, alert.resolved, or '*'; repeatable."),
    secret: str | None = typer.Option(None, "--secret", envvar="EDGEFLEET_WEBHOOK_SECRET",
                                      help="Shared secret for the signature (16+ characters; default: the hub makes "
                                           "one and prints it once)."),
    description: str = typer.Option("", "--description"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Subscribe URL to events; each delivery is signed (X-Edgefleet-Signature: sha256=HMAC of the body)."""
    with client() as c:
        res = call(lambda: c.post("/api/v1/webhooks", {"url": url, "events": event, "secret": secret,
                                                       "description": description}))
    if as_json:
        emit(res, True)
        return
    emit(res, False, ["id", "url", "events", "signed"])
    if secret is None:
        err.print(f"secret (shown once, keep it for the receiver): {res['secret']}")


@webhook_app.command("list")
def webhook_list(as_json: bool = typer.Option(False, "--json")) -> None:
    res = get("/api/v1/webhooks")
    emit(res, as_json, ["id", "url", "events", "signed", "description", "created_by"])


@webhook_app.command("delete")
def webhook_delete(hook: int, as_json: bool = typer.Option(False, "--json")) -> None:
    """Unsubscribe (its pending deliveries are cancelled)."""
    with client() as c:
        res = call(lambda: c.request("DELETE", f"/api/v1/webhooks/{hook}"))
    emit(res, as_json, ["id", "deleted", "cancelled"])


@webhook_app.command("ping")
def webhook_ping(hook: int, as_json: bool = typer.Option(False, "--json")) -> None:
    """Send a signed ``ping`` event to one webhook."""
    with client() as c:
        res = call(lambda: c.post(f"/api/v1/webhooks/{hook}/ping"))
    emit(res, as_json, ["webhook", "event_id"])


@webhook_app.command("deliveries")
def webhook_deliveries(
    webhook: int | None = typer.Option(None, "--webhook", help="Only this webhook's."),
    state: str | None = typer.Option(None, "--state", help="pending, delivered, failed or cancelled."),
    event: str | None = typer.Option(None, "--event"),
    limit: int = typer.Option(50, "--limit", min=1),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Deliveries, newest first, with their state, attempts and last error (alert rules' own URLs too)."""
    params = {"webhook": webhook, "state": state, "event": event, "limit": limit}
    res = get("/api/v1/webhooks/deliveries", **params)
    emit(res, as_json, ["id", "event", "webhook", "url", "state", "attempts", "last_status", "last_error"])


@webhook_app.command("redeliver")
def webhook_redeliver(delivery: int, as_json: bool = typer.Option(False, "--json")) -> None:
    """Send a delivery again, with a fresh set of attempts."""
    with client() as c:
        res = call(lambda: c.post(f"/api/v1/webhooks/deliveries/{delivery}/redeliver"))
    emit(res, as_json, ["id", "event", "url", "state"])
