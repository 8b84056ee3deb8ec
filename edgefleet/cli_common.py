"""What every CLI command shares: the hub client, error handling, output as table or JSON.

Everything shown comes from users (tags, labels, descriptions, hub error texts): it is printed as plain
text, never read as rich markup, so ``[/]`` or ``[null, 4]`` shows as typed and cannot crash a command.
"""

from __future__ import annotations

import json
from datetime import UTC
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

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
        fail(str(exc))


def get(path: str, **params: Any) -> Any:
    """GET ``path`` from the hub; on a refusal print why and exit 1."""
    with client() as c:
        return call(lambda: c.get(path, **params))


def fail(text: str, prefix: str = "error:", code: int = 1) -> NoReturn:
    """Print ``prefix text`` in one line on stderr (``text`` shown as typed) and exit with ``code``."""
    err.print(f"[red]{escape(prefix)}[/] {escape(text)}", soft_wrap=True, highlight=False)
    raise typer.Exit(code)


def emit(data: Any, as_json: bool, columns: list[str] | None = None, title: str = "") -> None:
    """``data`` as JSON (raw values), or for people: a list as a table of ``columns``, one record (a dict with
    no ``columns``) as field/value lines that fit the terminal; times shown as ISO and relative."""
    if as_json:
        print(json.dumps(data, indent=2, default=str))
        return
    if isinstance(data, dict) and columns is None:
        data, columns = [{"field": k, "value": v} for k, v in data.items()], ["field", "value"]
    rows = data if isinstance(data, list) else [data]
    cols = columns or (list(rows[0].keys()) if rows and isinstance(rows[0], dict) else [])
    table = Table(title=Text(title) if title else None)
    for c in cols:
        table.add_column(c, no_wrap=c == "field", overflow="fold")
    for r in rows:
        key = r.get("field") if cols == ["field", "value"] else None
        table.add_row(*(Text(_cell(c if key is None else str(key), r.get(c))) for c in cols))
    Console().print(table)


TIME_KEYS = {"ts", "last_seen", "since", "until", "time"}


def is_time_key(key: str) -> bool:
    return key in TIME_KEYS or key.endswith("_at")


def human_time(ts: float, now: float | None = None) -> str:
    """``2026-11-30 01:57:33Z (3m ago)``: a unix time for people (UTC, so every reader sees the same)."""
    import time
    from datetime import datetime

    delta = (time.time() if now is None else now) - ts
    when = datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    return f"{when} ({human_age(abs(delta))} {'ago' if delta >= 0 else 'from now'})"


def human_age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _value(key: str, v: Any) -> Any:
    """``v`` with the times inside it (keys named like times, holding unix seconds) made readable."""
    if isinstance(v, (int, float)) and not isinstance(v, bool) and is_time_key(key) and v > 1e8:
        return human_time(float(v))
    if isinstance(v, dict):
        return {k: _value(str(k), x) for k, x in v.items()}
    if isinstance(v, list):
        return [_value(key, x) for x in v]
    return v


def _cell(key: str, v: Any) -> str:
    v = _value(key, v)
    if isinstance(v, dict):  # one "k: v" per line: a narrow column folds less than a line of JSON
        return "\n".join(f"{k}: {_inline(x)}" for k, x in v.items()) if v else "{}"
    if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
        return "\n".join(_inline(x) for x in v)
    return _inline(v)


def _inline(v: Any) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k}={_inline(x)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return json.dumps(v, default=str) if any(x is None for x in v) else ", ".join(_inline(x) for x in v)
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
