"""Device commands: enrolment tokens, the fleet list with filters, one device, labels (one or many), decommission,
and signed diagnostics (logs, support bundle, module restart)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from edgefleet.cli_common import call, client, emit, err, fail, get, parse_duration, parse_kv

device_app = typer.Typer(rich_markup_mode=None, help="Devices and enrolment tokens.", no_args_is_help=True)


# `device token` itself is a group (list, revoke) whose bare form calls this: edgefleet/commands/tokens.py
def device_token(
    label: list[str] = typer.Option([], "--label", help="key=value given to the device, repeatable."),
    expires: str = typer.Option("1h", "--expires", help="Lifetime: 30s, 10m, 1h, 7d (or seconds)."),
    count: int = typer.Option(1, "--count", min=1),
    uses: int = typer.Option(1, "--uses", min=1, help="Enrolments per token (>1: a group token for provisioning)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Create enrolment tokens (single-use unless --uses)."""
    expires_in = int(parse_duration(expires))
    with client() as c:
        res = call(lambda: c.post("/api/v1/enrollment-tokens", {"count": count, "labels": parse_kv(label),
                                                                "expires_in": expires_in, "uses": uses}))
    out = {"token": res["tokens"][0], "tokens": res["tokens"], "expires_at": res.get("expires_at"),
           "uses": res.get("uses", 1)}
    if as_json:
        emit(out, True)
    else:
        for t in res["tokens"]:
            print(t)


STATUS_HELP = "online, offline, idle, pending (told, not yet reported), installing, running, failed; repeatable (any)"


@device_app.command("list")
def device_list(
    status: list[str] = typer.Option([], "--status", help=STATUS_HELP),
    label: list[str] = typer.Option([], "--label", help="k=v (or k!=v) the device's labels must hold, repeatable."),
    selector: str | None = typer.Option(None, "--selector", help="A deployment target: '*', ids or k=v,k2!=v2."),
    search: str | None = typer.Option(None, "--search", "-q", help="Part of the id, a label, or a module name's start."),
    deployment: str | None = typer.Option(None, "--deployment", help="Only devices given a module by it."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Devices with their state, modules (and which deployment supplies each) and inference counts."""
    params = {"label": ",".join(label) or None, "selector": selector, "q": search, "deployment": deployment}
    with client() as c:  # the hub filters one status at a time: a device with any of them, once, by id
        found = {d["id"]: d for s in (status or [None]) for d in call(lambda s=s: c.get("/api/v1/devices", status=s,
                                                                                        **params))}
    res = [found[k] for k in sorted(found)]
    if as_json:
        emit(res, True)
        return
    rows = [d | {"modules": "\n".join(f"{m['name']}:{m['version']} ({m['state']}, {m['deployment'] or '-'})"
                                      for m in d["modules"])} for d in res]
    emit(rows, False, ["id", "online", "state", "labels", "modules", "inferences", "last_seen"])


@device_app.command("show")
def device_show(device_id: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """One device: state, labels, facts, modules, last seen."""
    res = get(f"/api/v1/devices/{device_id}")
    emit(res, as_json)


@device_app.command("label")
def device_label(
    device_id: str | None = typer.Argument(None, help="The device (or --selector for many)."),
    changes: list[str] = typer.Argument(None, help="k=v sets, k- removes"),
    selector: str | None = typer.Option(None, "--selector", help="Every device this target matches: '*', ids or "
                                                                  "k=v,k2!=v2."),
    status: list[str] = typer.Option([], "--status", help="With --selector: only devices with this status."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Set or remove labels of one device, or of every device --selector matches (deployments follow)."""
    if selector is not None and device_id is not None:  # with --selector the first argument is a change too
        changes, device_id = [device_id, *(changes or [])], None
    if not changes or (device_id is None) == (selector is None):
        raise typer.BadParameter("give DEVICE_ID k=v… or --selector S k=v…")
    labels: dict[str, str | None] = {}
    for ch in changes:
        if ch.endswith("-") and "=" not in ch:
            labels[ch[:-1]] = None
        else:
            labels |= parse_kv([ch])
    with client() as c:
        if selector is not None:
            res = call(lambda: c.post("/api/v1/devices/labels", {"selector": selector, "status": status,
                                                                  "labels": labels}))
            if not as_json:
                err.print(f"{res['matched']} device(s) relabelled", markup=False)
            emit(res if as_json else [{"id": d} for d in res["devices"]], as_json, None if as_json else ["id"])
            return
        res = call(lambda: c.request("PATCH", f"/api/v1/devices/{device_id}", json={"labels": labels}))
    emit(res if as_json else {"id": res["id"], "labels": res["labels"]}, as_json)


@device_app.command("decommission")
def device_decommission(device_id: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """Forget a device and revoke its broker credentials."""
    with client() as c:
        res = call(lambda: c.request("DELETE", f"/api/v1/devices/{device_id}"))
    emit(res, as_json)


# --- signed diagnostic commands (docs/protocol.md §5a) -------------------------------------------

WAIT_HELP = "Seconds to wait for the device's answer (it stays at the hub: device commands ID)."


def _command(device_id: str, name: str, args: dict[str, Any], wait: float) -> dict[str, Any]:
    """Send, then wait for the answer; exit 5 if none came in time (the result is kept at the hub)."""
    import time

    with client() as c:
        sent = call(lambda: c.post(f"/api/v1/devices/{device_id}/commands", {"name": name, "args": args}))
        deadline = time.monotonic() + wait
        res = sent
        while res["state"] == "sent" and time.monotonic() < deadline:
            time.sleep(0.2)
            res = call(lambda: c.get(f"/api/v1/commands/{sent['id']}"))
    if res["state"] == "sent":
        fail(f"no answer from {device_id} within {wait:g}s (offline?); command {res['id']} stays at the hub: "
             f"edgefleet device commands {device_id}", "waiting:", 5)
    if res["state"] != "done":
        fail(f"{name} on {device_id}: {res['state']}: {res['error']}")
    return res


@device_app.command("logs")
def device_logs(device_id: str, module: str | None = typer.Option(None, "--module", help="Only lines naming it."),
                lines: int = typer.Option(200, "--lines", min=1, max=500),
                wait: float = typer.Option(30.0, "--wait", min=0, help=WAIT_HELP),
                as_json: bool = typer.Option(False, "--json")) -> None:
    """The device's recent agent log lines (a signed command the device answers)."""
    res = _command(device_id, "logs", {"module": module, "lines": lines}, wait)
    if as_json:
        emit(res, True)
    else:
        print("\n".join(res["result"]["lines"]))


@device_app.command("support-bundle")
def device_support_bundle(device_id: str, out: Path | None = typer.Option(None, "--out", help="Write it here (JSON)."),
                          wait: float = typer.Option(30.0, "--wait", min=0, help=WAIT_HELP)) -> None:
    """Facts, state, install journal, counters and recent logs of a device, as one JSON document."""
    res = _command(device_id, "support_bundle", {}, wait)
    text = json.dumps(res["result"], indent=2, default=str)
    if out is None:
        print(text)
    else:
        out.write_text(text)
        err.print(f"support bundle of {device_id} written to {out} ({len(text)} bytes)", markup=False)


@device_app.command("restart-module")
def device_restart_module(device_id: str, module: str, wait: float = typer.Option(30.0, "--wait", min=0,
                                                                                  help=WAIT_HELP),
                          as_json: bool = typer.Option(False, "--json")) -> None:
    """Restart one module on a device (its worker process starts afresh)."""
    res = _command(device_id, "restart_module", {"module": module}, wait)
    emit(res if as_json else res["result"], as_json)


@device_app.command("commands")
def device_commands(device_id: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """The diagnostic commands sent to a device, newest first, with their state."""
    res = get(f"/api/v1/devices/{device_id}/commands")
    emit(res, as_json, ["id", "name", "state", "error", "created_at", "created_by", "replied_at"])
