"""What every CLI command shares: the hub client, error handling, output as table or JSON."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from edgefleet.client import HubClient, HubError

err = Console(stderr=True)


class Ctx:
    hub: str = "http://127.0.0.1:8080"
    token: str | None = None
    hub_ca: str | None = None


CTX = Ctx()


def client() -> HubClient:
    return HubClient(CTX.hub, CTX.token, ca=CTX.hub_ca)


def call(fn: Any) -> Any:
    """Run a hub call; on a refusal print why and exit 1 (no traceback for expected failures)."""
    try:
        return fn()
    except HubError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None


def emit(data: Any, as_json: bool, columns: list[str] | None = None, title: str = "") -> None:
    if as_json:
        print(json.dumps(data, indent=2, default=str))
        return
    rows = data if isinstance(data, list) else [data]
    cols = columns or (list(rows[0].keys()) if rows and isinstance(rows[0], dict) else [])
    table = Table(title=title or None)
    for c in cols:
        table.add_column(c)
    for r in rows:
        table.add_row(*(_cell(r.get(c)) for c in cols))
    Console().print(table)


def _cell(v: Any) -> str:
    if isinstance(v, (dict, list)):
        return json.dumps(v, default=str)
    return "" if v is None else str(v)


def parse_kv(pairs: list[str]) -> dict[str, str]:
    out = {}
    for p in pairs:
        if "=" not in p:
            raise typer.BadParameter(f"{p!r} is not key=value")
        k, v = p.split("=", 1)
        out[k] = v
    return out




DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``90``, ``30s``, ``10m``, ``1h``, ``7d`` -> seconds."""
    text = text.strip()
    unit = DURATION_UNITS.get(text[-1:].lower())
    try:
        return float(text[:-1]) * unit if unit else float(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a duration like 30s, 10m, 1h or 7d") from None


def parse_time(text: str | None) -> float | None:
    """A point in time: unix seconds, ISO 8601 (``2026-11-25T08:00``), or an age such as ``1h`` (one hour ago)."""
    if text is None:
        return None
    import time
    from datetime import datetime

    try:
        return float(text)
    except ValueError:
        pass
    if text[-1:].lower() in DURATION_UNITS and text[:-1].replace(".", "", 1).isdigit():
        return time.time() - parse_duration(text)
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a time: use unix seconds, ISO 8601 or an age like 1h") from None
