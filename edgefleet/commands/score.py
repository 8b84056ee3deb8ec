"""``edgefleet score``: batch scoring of a table with a module's signed bundle (see docs/batch.md)."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import typer

from edgefleet.cli_common import client, emit, err, escape


class Progress:
    """A bar on a terminal; plain lines (at most one a second, and the last) anywhere else."""

    def __init__(self, total: int, done: int, quiet: bool, ndjson: bool = False) -> None:
        self.total, self.done, self.quiet, self.ndjson = total, done, quiet, ndjson
        self.started, self.start_done, self.last = time.monotonic(), done, 0.0
        self._lock = threading.Lock()
        self.bar: Any = None
        if not quiet and not ndjson and err.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

            self.bar = Progress("scoring", BarColumn(), MofNCompleteColumn(), "rows", "[cyan]{task.fields[rate]}",
                                TimeRemainingColumn(), console=err, transient=False)
            self.task = self.bar.add_task("score", total=total, completed=done, rate="")
            self.bar.start()

    def rate(self) -> float:
        return (self.done - self.start_done) / max(time.monotonic() - self.started, 1e-9)

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n
            now = time.monotonic()
            if self.bar is not None:
                self.bar.update(self.task, completed=self.done, rate=f"{self.rate():,.0f} rows/s")
            elif not self.quiet and (now - self.last >= 1.0 or self.done >= self.total):
                self.last = now
                if self.ndjson:  # for a program watching the job (the hub's batch jobs)
                    print(json.dumps({"rows_done": self.done, "rows_total": self.total,
                                      "rows_per_s": round(self.rate())}), file=sys.stderr, flush=True)
                    return
                pct = 100.0 * self.done / self.total if self.total else 100.0
                print(f"score: {self.done}/{self.total} rows ({pct:.0f}%), {self.rate():,.0f} rows/s",
                      file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _bundle(ref: str | None, bundle: Path | None, root: Path | None, dest: Path) -> tuple[Any, Path, Any]:
    """(manifest, bundle directory, pinned root or None): pulled from the hub, or a local bundle, verified."""
    from modules.bundle import ROOT_FILE, verify_pulled
    from protocol.signing import load_trusted_root

    pinned = json.loads(root.read_text()) if root else None
    if bundle is not None:
        if ref:
            raise typer.BadParameter("give MODULE:VERSION or --bundle DIR, not both")
        if pinned is None:
            err.print(f"[yellow]warning:[/] no --root given: trusting the root shipped in {bundle} (integrity only)",
                      soft_wrap=True)
        trusted = pinned if pinned is not None else json.loads((bundle / ROOT_FILE).read_bytes())
        return verify_pulled(bundle, load_trusted_root(trusted)), bundle.resolve(), pinned
    if not ref:
        raise typer.BadParameter("give MODULE:VERSION (pulled from the hub) or --bundle DIR")
    from edgefleet.commands.registry import parse_model_ref

    name, version = parse_model_ref(ref)
    with client() as c:
        manifest = c.pull_bundle(name, version or 0, dest, pinned)
    return manifest, dest, pinned


def _monitoring(records: list[dict[str, Any]], manifest: Any, post: bool, name: str,
                file: Path | None) -> dict[str, Any]:
    """Write the sample to ``file`` and/or send it to the hub (``POST /api/v1/batch-data``), in pieces."""
    from modules.batch.monitor import sample_rows

    if file is not None:
        file.write_text("".join(json.dumps(r) + "\n" for r in records))
    out: dict[str, Any] = {"rows": sample_rows(records), "records": len(records)}
    if post:
        with client() as c:
            for i in range(0, max(len(records), 1), 200):
                c.post("/api/v1/batch-data", {"name": name, "module": manifest.name, "version": manifest.version,
                                              "records": records[i:i + 200]})
        out["name"] = name
    return out


def score(
    ref: str | None = typer.Argument(None, help="MODULE:VERSION to pull from the hub (or give --bundle DIR)."),
    input_path: str = typer.Option(..., "--input", "-i", help="A CSV or Parquet file, a directory of Parquet files, "
                                                             "or an http(s) URL of a file (fetched once into the job)."),
    output: Path = typer.Option(..., "--output", "-o",
                                help="out.parquet or out.csv (one file), or a directory of Parquet part files."),
    bundle: Path | None = typer.Option(None, "--bundle", exists=True, file_okay=False,
                                       help="Score with a local bundle directory instead of the hub's."),
    root: Path | None = typer.Option(None, "--root", exists=True, dir_okay=False,
                                     help="Pinned root.json to verify the bundle against (default: trust on first use)."),
    columns: list[str] = typer.Option([], "--columns", help="INPUT=COL,COL,...: the columns feeding a model input."),
    keep: str = typer.Option("all", "--keep", help="Input columns copied to the output: all, none, or COL,COL."),
    workers: int = typer.Option(0, "--workers", min=0,
                                help="Worker processes; 1: in this process, the model on one thread (default: in this "
                                     "process on 2 cores or fewer, else one process per core)."),
    scheduler: str | None = typer.Option(None, "--scheduler", help="Run on Dask distributed: tcp://HOST:8786."),
    part_rows: int = typer.Option(262_144, "--part-rows", min=1, help="Rows per part file (the unit of resuming)."),
    batch_rows: int = typer.Option(65_536, "--batch-rows", min=1, help="Rows per model call."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Discard an existing output or unfinished job."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display."),
    as_json: bool = typer.Option(False, "--json", help="A JSON summary on stdout."),
    progress_json: bool = typer.Option(False, "--progress-json", help="Progress as JSON lines on stderr."),
    monitor: bool = typer.Option(False, "--monitor", help="Send a sample of inputs/outputs to the hub's monitoring "
                                                          "store (drift against the model's baseline)."),
    monitor_name: str | None = typer.Option(None, "--monitor-name", help="The sample's name at the hub "
                                                                          "(default: the output's file name)."),
    monitor_rows: int = typer.Option(5000, "--monitor-rows", min=1, help="About how many rows to sample."),
    monitor_file: Path | None = typer.Option(None, "--monitor-file", help="Also write the sample here (JSON lines)."),
    max_input_bytes: int = typer.Option(20 * 1024**3, "--max-input-bytes", min=1,
                                        help="Refuse a URL input larger than this (bytes)."),
) -> None:
    """Score a table with a module: streamed in parts, on this machine's cores or a Dask cluster; resumable.

    A job stopped for any reason (even kill -9) continues where it stopped when the same command runs again.
    """
    from edgefleet.client import HubError

    try:
        from modules.batch.columns import BatchError, parse_columns
        from modules.batch.job import claim, finish, layout_for, prepare
    except ImportError as exc:
        err.print(f"[red]error:[/] edgefleet score needs pyarrow ({exc}): pip install 'edgefleet[batch]'")
        raise typer.Exit(1) from None
    from modules.errors import ModelError
    from protocol.encoding import ProtocolError

    started = time.monotonic()
    layout = layout_for(output)
    from modules.batch.engine import InlineEngine, LocalEngine

    cores = os.cpu_count() or 1
    n_workers = workers or cores
    # in this process where worker processes gain nothing (onnxruntime's own threads use the cores); a pool
    # starts up while the bundle is verified and the input planned, and is dropped if one part is all there is
    local: InlineEngine | LocalEngine | None = None
    if not scheduler:
        local = InlineEngine(1 if workers == 1 else cores) if n_workers == 1 or (cores <= 2 and not workers) \
            else LocalEngine(n_workers)
    try:
        claim(layout, overwrite)
        from modules.batch.remote import fetch_input, is_url

        source = fetch_input(input_path, layout.work, max_input_bytes) if is_url(input_path) else Path(input_path)
        manifest, bundle_dir, pinned = _bundle(ref, bundle, root, layout.bundle)
        if isinstance(local, LocalEngine):
            local.preload(str(bundle_dir), pinned, manifest.digest())
        job, parts, todo = prepare(source, layout, manifest, bundle_dir, pinned, columns=parse_columns(columns),
                                   keep=keep, part_rows=part_rows, batch_rows=batch_rows)
        if isinstance(local, LocalEngine) and len(todo) < 2:
            local.close()
            local = InlineEngine(n_workers)
        if isinstance(local, InlineEngine):
            local.load(bundle_dir, manifest)  # verified above, in this process: once
            n_workers = 1
        total = sum(p.rows for p in parts)
        sampling = monitor or monitor_file is not None
        if sampling:
            from modules.batch.monitor import sample_every

            job.sample_every = sample_every(total, monitor_rows)
        progress = Progress(total, total - sum(p.rows for p in todo), quiet, progress_json)
        try:
            if local is not None:
                engine = "local"
                local.run(job, todo, progress.add)
            else:
                from modules.batch.distributed import run_dask

                engine, n_workers = "dask", run_dask(job, todo, scheduler or "", progress.add)
        finally:
            progress.close()
        records: list[dict[str, Any]] = []
        if sampling:
            from modules.batch.monitor import collect

            records = collect(layout.work)
        rows = finish(layout, parts)
        sent = _monitoring(records, manifest, monitor, monitor_name or layout.output.name, monitor_file)
    except (BatchError, ModelError, ProtocolError, HubError, OSError, ValueError) as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    finally:
        if local is not None:
            local.close()
    seconds = time.monotonic() - started
    scored = sum(p.rows for p in todo)
    summary = {"module": f"{manifest.name}:{manifest.version}", "digest": manifest.digest(), "input": input_path,
               "output": str(layout.output), "rows": rows, "parts": len(parts), "parts_resumed": len(parts) - len(todo),
               "rows_scored_now": scored, "engine": engine, "workers": n_workers,
               "in_process": isinstance(local, InlineEngine), "seconds": round(seconds, 3),
               "rows_per_s": round(scored / seconds) if seconds > 0 else 0,
               **({"monitor": sent} if sampling else {})}
    if as_json:
        emit(summary, True)
    else:
        how = (f"{engine} x{n_workers}" if not isinstance(local, InlineEngine)
               else f"in this process, the model on {local.threads} thread(s)")
        err.print(f"scored {rows} rows into {layout.output} ({len(parts)} parts, {len(parts) - len(todo)} from an "
                  f"earlier run) in {seconds:.1f}s, {how}", highlight=False)
