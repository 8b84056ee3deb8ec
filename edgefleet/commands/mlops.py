"""Registry aliases and evaluation: ``model alias set|delete|list|get``, ``model evaluate``, ``model metrics``.

``model evaluate`` exits 0 when the version passes, 3 when a threshold does not hold or it is worse than
the version it is compared with (EXIT_GATE), 1 when it could not be evaluated (docs/cicd.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table as RichTable

from edgefleet.cli_common import call, client, emit, err, escape, get
from edgefleet.client import HubClient, HubError
from edgefleet.commands.registry import model_app, parse_model_ref

EXIT_GATE = 3

alias_app = typer.Typer(rich_markup_mode=None, help="Aliases (champion, challenger, …) naming one version of a model.", no_args_is_help=True)
model_app.add_typer(alias_app, name="alias")


def resolve_model(c: HubClient, ref: str) -> tuple[str, int]:
    """``NAME:VERSION``, ``NAME@ALIAS`` or ``NAME`` (the newest version)."""
    if "@" in ref:
        name, _, alias = ref.rpartition("@")
        return name, call(lambda: c.get(f"/api/v1/models/{name}/aliases/{alias}"))["version"]
    name, version = parse_model_ref(ref, need_version=False)
    if version is None:
        version = call(lambda: c.get(f"/api/v1/models/{name}/aliases/latest"))["version"]
    return name, version


# --- aliases -------------------------------------------------------------------------------------


@alias_app.command("set")
def alias_set(
    name: str, alias: str, version: int = typer.Argument(..., min=1),
    expect: str | None = typer.Option(None, "--expect", help="Move only if the alias now names this version "
                                                             "('none': only if unset); exit 1 otherwise."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Point NAME@ALIAS at VERSION (the explicit move; CI does it after a passed gate)."""
    body: dict[str, Any] = {"version": version}
    if expect is not None:
        if expect.lower() != "none" and not expect.isdigit():
            raise typer.BadParameter("--expect takes a version number or 'none'")
        body["expect"] = 0 if expect.lower() == "none" else int(expect)
    with client() as c:
        res = call(lambda: c.request("PUT", f"/api/v1/models/{name}/aliases/{alias}", json=body))
    if as_json:
        emit(res, True)
    else:
        was = f" (was {res['previous']})" if res["previous"] else " (new)"
        print(f"{name}@{alias} -> {name}:{version}" + (was if res["moved"] else " (unchanged)"))


@alias_app.command("delete")
def alias_delete(name: str, alias: str, as_json: bool = typer.Option(False, "--json")) -> None:
    with client() as c:
        res = call(lambda: c.request("DELETE", f"/api/v1/models/{name}/aliases/{alias}"))
    emit(res, as_json, ["name", "alias", "previous", "deleted"])


@alias_app.command("list")
def alias_list(name: str, as_json: bool = typer.Option(False, "--json")) -> None:
    res = get(f"/api/v1/models/{name}/aliases")
    emit(res, as_json, ["alias", "version", "updated_at", "updated_by"])


@alias_app.command("get")
def alias_get(name: str, alias: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """The version NAME@ALIAS names (plain: just the number, for scripts)."""
    res = get(f"/api/v1/models/{name}/aliases/{alias}")
    if as_json:
        emit(res, True)
    else:
        print(res["version"])


# --- evaluation ----------------------------------------------------------------------------------


@model_app.command("metrics")
def model_metrics(ref: str = typer.Argument(..., help="NAME:VERSION or NAME@ALIAS"),
                  as_json: bool = typer.Option(False, "--json")) -> None:
    """Recorded evaluations of a model version, newest first."""
    with client() as c:
        name, version = resolve_model(c, ref)
        res = call(lambda: c.get(f"/api/v1/models/{name}/versions/{version}/metrics"))
    rows = [r | {"dataset": r["dataset"].get("name", ""), "sha256": r["dataset"].get("sha256", "")[:12]} for r in res]
    emit(res if as_json else rows, as_json, ["id", "metrics", "dataset", "sha256", "created_at", "created_by"])


def _pos_label(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        return text


@model_app.command("evaluate")
def model_evaluate(
    ref: str = typer.Argument(..., help="NAME:VERSION, NAME@ALIAS or NAME (the newest)"),
    data: Path = typer.Option(..., "--data", exists=True, dir_okay=False, help="CSV (with a header) or Parquet."),
    label: str = typer.Option(..., "--label", help="The column holding the true label (or value)."),
    metric: list[str] = typer.Option([], "--metric", help="accuracy, precision, recall, f1, auc, log_loss, mse, rmse,"
                                                           " mae, r2; repeatable (default accuracy)."),
    threshold: list[str] = typer.Option([], "--threshold", help="e.g. accuracy>=0.9 or rmse<=2.5; repeatable."),
    against: str | None = typer.Option(None, "--against", help="Compare with ALIAS of this model (e.g. champion), "
                                                               "or NAME:VERSION / NAME@ALIAS."),
    tolerance: float = typer.Option(0.0, "--tolerance", min=0, help="How much worse than --against still passes."),
    feature: list[str] = typer.Option([], "--feature", help="Feature column, in the model's order; repeatable "
                                                             "(default: every column but the label)."),
    output: str | None = typer.Option(None, "--output", help="The model output to read (default: see docs/cicd.md)."),
    decision: float = typer.Option(0.5, "--decision-threshold", help="Probability at or above which a row is "
                                                                       "the positive class."),
    pos_label: str = typer.Option("1", "--pos-label", help="The positive class (precision, recall, f1, auc)."),
    record: bool = typer.Option(True, "--record/--no-record", help="Record the metrics on the version."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Run a model version on labelled data here, record its metrics on the version, compare; exit 3 if it fails."""
    from edgefleet.evalmetrics import EvaluationError, check_metrics, judge, parse_threshold
    from edgefleet.evaluation import evaluate_version, read_table
    from modules.errors import ModelError

    try:
        limits = [parse_threshold(t) for t in threshold]
        names = check_metrics(metric + [t.metric for t in limits]) or ["accuracy"]
        table = read_table(data)
    except (EvaluationError, OSError) as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(1) from None
    dataset = {"name": table.name, "sha256": table.sha256, "rows": table.rows, "label": label}
    run = {"label": label, "features": feature or None, "metrics": names, "output": output, "decision": decision,
           "pos_label": _pos_label(pos_label)}
    with client() as c:
        name, version = resolve_model(c, ref)
        try:
            mine = evaluate_version(c, name, version, table, **run)
            champion = _champion(c, name, version, against, table, dataset, run, record)
        except (EvaluationError, ModelError) as exc:
            err.print(f"[red]cannot evaluate {name}:{version}:[/] {escape(str(exc))}")
            raise typer.Exit(1) from None
        if record:
            call(lambda: c.post(f"/api/v1/models/{name}/versions/{version}/metrics",
                                {"metrics": mine, "dataset": dataset}))
    rows = judge(mine, champion["metrics"] if champion else None, limits, tolerance)
    passed = not any(r.failed for r in rows)
    result = {"model": f"{name}:{version}", "name": name, "version": version, "metrics": mine, "dataset": dataset,
              "against": champion, "passed": passed,
              "rows": [{"metric": r.metric, "candidate": r.candidate, "against": r.champion,
                        "threshold": str(r.threshold) if r.threshold else None, "verdict": r.verdict} for r in rows]}
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        _print_table(result, champion)
    if not passed:
        raise typer.Exit(EXIT_GATE)


def _champion(c: HubClient, name: str, version: int, against: str | None, table: Any, dataset: dict[str, Any],
              run: dict[str, Any], record: bool) -> dict[str, Any] | None:
    """The metrics to beat: recorded on the same data if they are, else measured now (and recorded)."""
    from edgefleet.evaluation import evaluate_version

    if against is None:
        return None
    ref = against if (":" in against or "@" in against) else f"{name}@{against}"
    try:
        other, other_version = _resolve_quiet(c, ref)
    except HubError as exc:
        if "404" in str(exc):
            err.print(f"{ref} is not set: nothing to compare with (the first version to pass becomes it)")
            return None
        raise
    names = run["metrics"]
    merged: dict[str, float] = {}
    for e in reversed(call(lambda: c.get(f"/api/v1/models/{other}/versions/{other_version}/metrics",
                                         dataset_sha256=dataset["sha256"]))):
        merged |= e["metrics"]
    source = "recorded on the same data"
    if not all(n in merged for n in names):
        merged = evaluate_version(c, other, other_version, table, **run)
        source = "measured now on the same data"
        if record:
            call(lambda: c.post(f"/api/v1/models/{other}/versions/{other_version}/metrics",
                                {"metrics": merged, "dataset": dataset}))
    return {"ref": ref, "model": f"{other}:{other_version}", "metrics": {n: merged[n] for n in names},
            "source": source}


def _resolve_quiet(c: HubClient, ref: str) -> tuple[str, int]:
    if "@" in ref:
        other, _, alias = ref.rpartition("@")
        return other, c.get(f"/api/v1/models/{other}/aliases/{alias}")["version"]
    other, v = parse_model_ref(ref)
    return other, int(v or 0)


def _print_table(result: dict[str, Any], champion: dict[str, Any] | None) -> None:
    title = f"{result['model']} on {result['dataset']['name']} ({result['dataset']['rows']} rows)"
    table = RichTable(title=title)
    for col in ("metric", result["model"], champion["model"] if champion else "against", "threshold", "verdict"):
        table.add_column(col)
    for r in result["rows"]:
        style = "red" if r["verdict"] in ("worse", "fails threshold") else ""
        table.add_row(r["metric"], f"{r['candidate']:.4f}", "" if r["against"] is None else f"{r['against']:.4f}",
                      r["threshold"] or "", f"[{style}]{r['verdict']}[/]" if style else r["verdict"])
    Console().print(table)
    if champion:
        print(f"compared with {champion['ref']} = {champion['model']} ({champion['source']})")
    print("PASSED" if result["passed"] else "FAILED: the version does not pass the evaluation gate")
