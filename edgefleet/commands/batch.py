"""``edgefleet batch``: batch scoring jobs run on the hub's machine (``/api/v1/batch-jobs``), and batch drift."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer

from edgefleet.cli_common import call, client, emit, err

batch_app = typer.Typer(help="Batch scoring jobs on the hub's machine, and the drift of scored samples.",
                        no_args_is_help=True)

COLUMNS = ["id", "module", "state", "rows_done", "rows_total", "progress", "output", "error"]


@batch_app.command("submit")
def submit(
    ref: str = typer.Argument(..., help="MODULE:VERSION or MODULE@ALIAS."),
    input_path: str = typer.Option(..., "--input", "-i", help="CSV/Parquet file or directory, on the hub's machine."),
    output: str = typer.Option(..., "--output", "-o", help="out.parquet, out.csv or a directory, on the hub's machine."),
    columns: list[str] = typer.Option([], "--columns", help="INPUT=COL,COL,... (as edgefleet score)."),
    keep: str = typer.Option("all", "--keep"),
    workers: int = typer.Option(1, "--workers", min=1),
    overwrite: bool = typer.Option(False, "--overwrite"),
    monitor: bool = typer.Option(False, "--monitor", help="Store a sample for drift reports (edgefleet batch drift)."),
    wait: bool = typer.Option(False, "--wait", help="Wait for the job to end; exit non-zero unless it succeeded."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Start a batch scoring job on the hub (paths are the hub machine's; relative ones are made absolute here)."""
    body = {"module": ref, "input": str(Path(input_path).absolute()), "output": str(Path(output).absolute()),
            "columns": columns, "keep": keep, "workers": workers, "overwrite": overwrite, "monitor": monitor}
    with client() as c:
        job = call(lambda: c.post("/api/v1/batch-jobs", body))
        if wait:
            job = _wait(c, job)
    emit(job, as_json, COLUMNS)
    if wait and job["state"] != "succeeded":
        raise typer.Exit(1)


def _wait(c: Any, job: dict[str, Any]) -> dict[str, Any]:
    """Poll until the job ends, a line whenever its progress moved."""
    last, path = -1, f"/api/v1/batch-jobs/{job['id']}"
    while job["state"] == "running":
        if job["rows_done"] != last:
            last = job["rows_done"]
            err.print(f"job {job['id']}: {job['rows_done']}/{job['rows_total'] or '?'} rows", highlight=False)
        time.sleep(0.5)
        job = call(lambda: c.get(path))
    return job


@batch_app.command("list")
def list_jobs(as_json: bool = typer.Option(False, "--json")) -> None:
    """Batch jobs, newest first, with their progress."""
    with client() as c:
        emit(call(lambda: c.get("/api/v1/batch-jobs")), as_json, COLUMNS)


@batch_app.command("show")
def show(job: int, wait: bool = typer.Option(False, "--wait", help="Wait for the job to end."),
         as_json: bool = typer.Option(False, "--json")) -> None:
    """A job's state, progress, output and summary."""
    with client() as c:
        found = call(lambda: c.get(f"/api/v1/batch-jobs/{job}"))
        if wait:
            found = _wait(c, found)
    emit(found, as_json, [*COLUMNS, "summary"])
    if wait and found["state"] != "succeeded":
        raise typer.Exit(1)


@batch_app.command("cancel")
def cancel(job: int, as_json: bool = typer.Option(False, "--json")) -> None:
    """Stop a running job (its worker processes too); nothing is written to its output."""
    with client() as c:
        emit(call(lambda: c.post(f"/api/v1/batch-jobs/{job}/cancel")), as_json, COLUMNS)


@batch_app.command("drift")
def drift(name: str = typer.Argument(..., help="The sample's name: job-ID for a hub job, or score's --monitor-name."),
          threshold: float = typer.Option(0.2, "--threshold"), as_json: bool = typer.Option(False, "--json")) -> None:
    """Input and prediction drift of a batch sample against the model's baseline."""
    with client() as c:
        report = call(lambda: c.get(f"/api/v1/batch-data/{name}/drift", threshold=threshold))
    if as_json:
        emit(report, True)
        return
    emit(report["features"] + report["predictions"], False,
         ["feature", "kind", "psi", "statistic", "p_value", "n_baseline", "n_current"])
