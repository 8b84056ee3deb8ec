"""Monitoring commands: time series, drift reports, alerts, collected-data export."""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from edgefleet.cli_common import CTX, call, client, emit, err, escape, get, parse_duration, parse_time

if TYPE_CHECKING:
    import httpx

metrics_app = typer.Typer(rich_markup_mode=None, help="Telemetry time series from the hub.", no_args_is_help=True)
drift_app = typer.Typer(rich_markup_mode=None, help="Input and prediction drift against a model's baseline.", no_args_is_help=True)
alert_app = typer.Typer(rich_markup_mode=None, help="Alert rules and the events they raise.", no_args_is_help=True)
data_app = typer.Typer(rich_markup_mode=None, help="Collected inputs and predictions.", no_args_is_help=True)


@metrics_app.command("series")
def metrics_series(
    device: str | None = typer.Option(None, "--device"),
    deployment: str | None = typer.Option(None, "--deployment"),
    endpoint: str | None = typer.Option(None, "--endpoint", help="A web endpoint's traffic (cloud)."),
    module: str | None = typer.Option(None, "--module", help="MODULE or MODULE:VERSION"),
    step: str = typer.Option("1m", "--step", help="Bucket size, e.g. 10s, 1m, 1h."),
    since: str = typer.Option("1h", "--since", help="Unix time, ISO 8601, or an age like 1h."),
    until: str | None = typer.Option(None, "--until"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Inferences, errors, error rate and latency percentiles per time bucket."""
    name, _, version = (module or "").partition(":")
    with client() as c:
        rows = call(lambda: c.get("/api/v1/metrics/series", device=device, deployment=deployment, endpoint=endpoint,
                                  module=name or None, version=int(version) if version else None,
                                  step=parse_duration(step), since=parse_time(since), until=parse_time(until)))
    emit(rows, as_json, ["t", "devices", "inferences", "errors", "error_rate", "p50", "p95", "p99"])


@drift_app.command("report")
def drift_report(
    deployment: str,
    window: str = typer.Option("1h", "--window", help="How far back to look."),
    threshold: float = typer.Option(0.2, "--threshold", help="PSI above which a feature counts as drifted."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Per-feature PSI and KS / chi-square for a deployment's collected inputs (and predictions)."""
    with client() as c:
        report = call(lambda: c.get(f"/api/v1/drift/{deployment}", window=parse_duration(window),
                                    threshold=threshold))
    if as_json:
        emit(report, True)
        return
    err.print(f"{report['module']}: {report['rows']} rows; drifted: {', '.join(report['drifted']) or 'none'}",
              markup=False)
    if report.get("note"):  # the baseline is an earlier version's
        err.print(report["note"], markup=False)
    emit(report["features"] + report["predictions"], False,
         ["feature", "kind", "psi", "statistic", "p_value", "n_baseline", "n_current"])


@alert_app.command("add")
def alert_add(
    name: str,
    kind: str = typer.Option(..., "--kind", help="drift | error_rate | offline | stale | key_expiry"),
    deployment: str | None = typer.Option(None, "--deployment"),
    threshold: float | None = typer.Option(
        None, "--threshold", help="PSI or error-rate fraction (default 0.2), revisions behind (stale: 0), "
                                  "days ahead (key_expiry: 30)."),
    for_: str | None = typer.Option(None, "--for", help="How long the condition must hold (offline: the threshold; "
                                                        "default 0s, stale: 10m)."),
    window: str = typer.Option("5m", "--window"),
    webhook: str | None = typer.Option(None, "--webhook", help="URL that receives each event as JSON."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Add an alert rule."""
    body = {"name": name, "kind": kind, "deployment": deployment, "window_s": parse_duration(window),
            "webhook": webhook}
    if for_ is not None:
        body["for_s"] = parse_duration(for_)
    if threshold is not None:
        body["threshold"] = threshold
    with client() as c:
        emit(call(lambda: c.post("/api/v1/alerts/rules", body)), as_json)


@alert_app.command("list")
def alert_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """Alert rules, and what is firing now."""
    with client() as c:
        rules = call(lambda: c.get("/api/v1/alerts/rules"))
        firing = call(lambda: c.get("/api/v1/alerts/firing"))
    if as_json:
        emit({"rules": rules, "firing": firing}, True)
        return
    emit(rules, False, ["name", "kind", "deployment", "threshold", "for_s", "window_s", "webhook", "status"], "rules")
    emit(firing, False, ["rule", "key", "since", "value"], "firing")


@alert_app.command("events")
def alert_events(rule: str | None = typer.Option(None, "--rule"), limit: int = typer.Option(50, "--limit"),
                 as_json: bool = typer.Option(False, "--json")) -> None:
    """Alert events, newest first, with webhook delivery status."""
    with client() as c:
        emit(call(lambda: c.get("/api/v1/alerts/events", rule=rule, limit=limit)), as_json,
             ["id", "rule", "key", "state", "value", "message", "delivered", "attempts"])


@alert_app.command("delete")
def alert_delete(name: str, as_json: bool = typer.Option(False, "--json")) -> None:
    with client() as c:
        emit(call(lambda: c.request("DELETE", f"/api/v1/alerts/rules/{name}")), as_json)


@data_app.command("export")
def data_export(
    out: Path = typer.Option(..., "--out", help="File to write."),
    fmt: str = typer.Option("jsonl", "--format", help="csv | jsonl | parquet"),
    deployment: str | None = typer.Option(None, "--deployment"),
    endpoint: str | None = typer.Option(None, "--endpoint"),
    model: str | None = typer.Option(None, "--model", help="MODULE or MODULE:VERSION whose data to export."),
    since: str | None = typer.Option(None, "--since"),
    until: str | None = typer.Option(None, "--until"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Stream collected inputs/predictions to a file in constant memory, with a progress bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    if fmt not in ("csv", "jsonl", "parquet"):
        raise typer.BadParameter("--format is csv, jsonl or parquet")
    name, _, version = (model or "").partition(":")
    params = {k: v for k, v in {"format": "jsonl" if fmt == "jsonl" else "csv", "deployment": deployment,
                                "endpoint": endpoint, "module": name or None,
                                "version": int(version) if version else None, "since": parse_time(since),
                                "until": parse_time(until)}.items() if v is not None}
    import httpx

    headers = {"Authorization": f"Bearer {CTX.token}"} if CTX.token else {}
    tmp = out.with_name(out.name + ".partial")
    rows = 0
    try:
        with httpx.stream("GET", f"{CTX.hub.rstrip('/')}/api/v1/data/export", params=params, headers=headers,
                          timeout=httpx.Timeout(30.0, read=300.0)) as resp:
            if resp.status_code >= 400:
                resp.read()
                err.print(f"[red]error:[/] export -> {resp.status_code}: {escape(resp.text)}")
                raise typer.Exit(1)
            total = int(resp.headers.get("x-total-count", "0"))
            with Progress("exporting", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=err,
                          transient=True, disable=as_json) as bar:
                task = bar.add_task("rows", total=total)
                rows = _write(resp, fmt, tmp, lambda n: bar.advance(task, n))
        tmp.replace(out)  # a failed export never leaves a half-written file under the requested name
    except httpx.HTTPError as exc:
        err.print(f"[red]error:[/] cannot reach the hub at {CTX.hub}: {escape(str(exc))}")
        raise typer.Exit(1) from None
    finally:
        tmp.unlink(missing_ok=True)
    emit({"out": str(out), "format": fmt, "rows": rows}, as_json)


def _write(resp: httpx.Response, fmt: str, path: Path, advance: Any) -> int:
    """Write the streamed export as ``fmt``; memory stays bounded by one block or batch."""
    if fmt == "parquet":
        from hub.monitoring.export import StreamReader, write_parquet_from_csv

        return write_parquet_from_csv(io.BufferedReader(StreamReader(resp.iter_bytes()), 1 << 20), path, advance)
    n = 0
    with path.open("wb") as f:
        for block in resp.iter_bytes():
            f.write(block)
            lines = block.count(b"\n")
            n += lines
            advance(lines)
    return n - 1 if fmt == "csv" else n  # the CSV header is not a row


quality_app = typer.Typer(help="Ground truth: labels, accuracy per version, fleet A/B.", no_args_is_help=True)


@quality_app.command("label")
def quality_label(
    file: Path = typer.Argument(..., help='JSON lines {"sample": "device/request-id", "label": value}'),
) -> None:
    """Send labels for sampled predictions (by sample id: device/request-id, or device/seq/idx from data export)."""
    import json

    items = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    with client() as c:
        stored = matched = 0
        for i in range(0, len(items), 10_000):
            res = call(lambda part=items[i:i + 10_000]: c.post("/api/v1/labels", {"labels": part}))
            stored, matched = stored + res["stored"], matched + res["matched"]
    err.print(f"{stored} label(s) stored, {matched} matched a sampled prediction", markup=False)


@quality_app.command("accuracy")
def quality_accuracy(
    module: str | None = typer.Option(None, "--module"),
    step: str = typer.Option("1h", "--step"),
    since: str = typer.Option("24h", "--since"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Accuracy (classes) and mean absolute error (regression) per module version and time bucket."""
    with client() as c:
        rows = call(lambda: c.get("/api/v1/accuracy", module=module, step=parse_duration(step),
                                  since=parse_time(since)))
    emit(rows, as_json, ["module", "version", "ts", "labelled", "correct", "accuracy", "mae"])


@quality_app.command("ab")
def quality_ab(
    a: str, b: str,
    metric: str = typer.Option("accuracy", "--metric", help="accuracy (labels) or success (no inference error)"),
    since: str = typer.Option("24h", "--since"),
    alpha: float = typer.Option(0.05, "--alpha"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Compare deployments A and B (disjoint device groups) with always-valid intervals: stop when it decides."""
    res = get("/api/v1/ab", a=a, b=b, metric=metric, since=parse_time(since), alpha=alpha)
    if as_json:
        emit(res, True)
        return
    for arm in res["arms"]:
        rate = "n/a" if arm["rate"] is None else f"{arm['rate']:.4f}"
        err.print(f"{arm['name']}: {arm['successes']}/{arm['trials']} = {rate}"
                  f" [{arm['interval'][0]:.4f}, {arm['interval'][1]:.4f}]", markup=False)
    lo, hi = res["interval"]
    err.print(f"difference b - a in [{lo:.4f}, {hi:.4f}] at alpha {res['alpha']:g}: "
              + (f"{res['winner']} wins" if res["decided"] else "undecided, keep collecting"), markup=False)
