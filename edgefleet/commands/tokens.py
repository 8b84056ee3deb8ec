"""Tokens and the audit log: API tokens (create, list, revoke), enrolment tokens after issue, ``audit verify``."""

from __future__ import annotations

import typer

from edgefleet.cli_common import call, client, emit, err, get, parse_duration
from edgefleet.commands import devices, fleet

token_app = typer.Typer(rich_markup_mode=None, help="API tokens: create, list, revoke (admin).", no_args_is_help=True)
enrolment_app = typer.Typer(rich_markup_mode=None, help="Enrolment tokens: create (no subcommand), list, revoke.")

TOKEN_COLUMNS = ["id", "name", "role", "state", "source", "expires_at", "created_by"]


@token_app.command("create")
def token_create(
    name: str = typer.Option(..., "--name", help="Unique among active tokens; shown in the audit log as the actor."),
    role: str = typer.Option(..., "--role", help="admin, operator or viewer (docs/security.md)."),
    expires: str | None = typer.Option(None, "--expires", help="Lifetime: 30d, 12h, 90m (default: never)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Create a token; it is printed once (the hub keeps only its hash)."""
    body = {"name": name, "role": role} | ({"expires_in": int(parse_duration(expires))} if expires else {})
    with client() as c:
        res = call(lambda: c.post("/api/v1/tokens", body))
    if as_json:
        emit(res, True)
    else:
        err.print(f"token {res['id']} ({res['name']}, {res['role']}): shown once, keep it now")
        print(res["token"])


@token_app.command("list")
def token_list(all_: bool = typer.Option(False, "--all", help="Also revoked and expired tokens."),
               as_json: bool = typer.Option(False, "--json")) -> None:
    """Tokens by id, name, role and state (never the token itself)."""
    res = get("/api/v1/tokens", all=str(all_).lower())
    emit(res, as_json, TOKEN_COLUMNS)


@token_app.command("revoke")
def token_revoke(ref: str = typer.Argument(..., help="The token's name or id (8+ hex digits)."),
                 as_json: bool = typer.Option(False, "--json")) -> None:
    """Revoke a token at once."""
    with client() as c:
        res = call(lambda: c.request("DELETE", f"/api/v1/tokens/{ref}"))
    emit(res, as_json, TOKEN_COLUMNS)


@enrolment_app.callback(invoke_without_command=True)
def enrolment_tokens(
    ctx: typer.Context,
    label: list[str] = typer.Option([], "--label", help="key=value given to the device, repeatable."),
    expires: str = typer.Option("1h", "--expires", help="Lifetime: 30s, 10m, 1h, 7d (or seconds)."),
    count: int = typer.Option(1, "--count", min=1),
    uses: int = typer.Option(1, "--uses", min=1, help="Enrolments per token (>1: a group token for provisioning)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Create enrolment tokens (single-use unless --uses); `device token list|revoke` for issued ones."""
    if ctx.invoked_subcommand is None:
        devices.device_token(label, expires, count, uses, as_json)


@enrolment_app.command("list")
def enrolment_list(all_: bool = typer.Option(False, "--all", help="Also used, expired and revoked tokens."),
                   as_json: bool = typer.Option(False, "--json")) -> None:
    """Enrolment tokens by id (never the token): uses, labels, expiry, state."""
    res = get("/api/v1/enrollment-tokens", all=str(all_).lower())
    emit(res, as_json, ["id", "state", "uses", "used", "used_by", "labels", "expires_at", "created_by"])


@enrolment_app.command("revoke")
def enrolment_revoke(ref: str = typer.Argument(..., help="The token's id (8+ hex digits, from `device token list`)."),
                     as_json: bool = typer.Option(False, "--json")) -> None:
    """Revoke an enrolment token: no device enrols with it any more."""
    with client() as c:
        res = call(lambda: c.request("DELETE", f"/api/v1/enrollment-tokens/{ref}"))
    emit(res, as_json, ["id", "state", "uses", "used", "revoked_at"])


def audit_verify(as_json: bool = typer.Option(False, "--json")) -> None:
    """Check the audit log's hash chain; exit 1 naming the first row that was edited or follows a deleted one."""
    res = get("/api/v1/audit/verify")
    if as_json:
        emit(res, True)
    elif res["ok"]:
        print(f"audit log intact: {res['rows']} rows, head row {res['head']['id']} hash {res['head']['hash']}")
    else:
        err.print(f"[red]audit log broken:[/] {res['broken']['reason']} ({res['rows']} rows intact before it)")
    if not res["ok"]:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.add_typer(token_app, name="token")
    devices.device_app.add_typer(enrolment_app, name="token")
    fleet.audit_app.command("verify")(audit_verify)
