"""Fleet commands: deployments, devices, status."""

from __future__ import annotations

import typer

from edgefleet.cli_common import call, client, emit, parse_kv

deploy_app = typer.Typer(help="Deploy modules to devices and to the cloud.", no_args_is_help=True)
device_app = typer.Typer(help="Devices and enrolment tokens.", no_args_is_help=True)

@deploy_app.command("edge")
def deploy_edge(
    name: str,
    module: str = typer.Option(..., "--module", help="MODULE:VERSION"),
    target: str = typer.Option("*", "--target", help="'*', device ids, or labels like site=berlin,tier!=dev"),
    priority: int = typer.Option(0, "--priority"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Deploy a module to the devices a selector matches."""
    with client() as c:
        res = call(lambda: c.post("/api/v1/deployments", {"name": name, "module": module, "target": target,
                                                          "priority": priority}))
    emit(res, as_json)


@device_app.command("token")
def device_token(
    label: list[str] = typer.Option([], "--label", help="key=value given to the device, repeatable."),
    expires: int = typer.Option(3600, "--expires", help="Seconds until the token expires."),
    count: int = typer.Option(1, "--count", min=1),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Create single-use enrolment tokens."""
    with client() as c:
        res = call(lambda: c.post("/api/v1/enrollment-tokens", {"count": count, "labels": parse_kv(label),
                                                                "expires_in": expires}))
    out = {"token": res["tokens"][0], "tokens": res["tokens"], "expires_at": res.get("expires_at")}
    if as_json:
        emit(out, True)
    else:
        for t in res["tokens"]:
            print(t)


@device_app.command("list")
def device_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """Devices with their state, modules and inference counts."""
    with client() as c:
        res = call(lambda: c.get("/api/v1/devices"))
    emit(res, as_json, ["id", "online", "state", "labels", "modules", "inferences", "last_seen"])


@device_app.command("show")
def device_show(device_id: str, as_json: bool = typer.Option(False, "--json")) -> None:
    with client() as c:
        res = call(lambda: c.get(f"/api/v1/devices/{device_id}"))
    emit(res, as_json)


def status(as_json: bool = typer.Option(False, "--json")) -> None:
    """Fleet summary from the hub."""
    with client() as c:
        res = call(lambda: c.get("/api/v1/fleet/summary"))
    emit(res, as_json)


