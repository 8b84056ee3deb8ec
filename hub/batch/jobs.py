"""Batch scoring jobs started on the hub (``/api/v1/batch-jobs``): ``edgefleet score`` in a sandboxed subprocess.

The hub never loads module code: it copies the module's bundle from its own store, verified under its
root, into a scratch directory outside its data directory, and runs ``python -m edgefleet score``
there through the operator-code sandbox (``modules/sandbox.py``): the input (a path on the hub's
machine) and the bundle read-only, only the scratch ``out/`` writable. The child reports progress as
JSON lines (``--progress-json``); when it succeeds the hub moves the result to the output path asked
for and, with ``monitor``, stores its sample for drift reports (``hub/batch/data.py``).

States: ``running`` -> ``succeeded`` | ``failed`` | ``cancelled``. A job running when the hub
stopped is ``failed`` at the next start (submit it again: nothing was written to its output).
With hub replicas a job belongs to the replica that runs it (``owner``, its MQTT client id): a
replica restarting fails only its own, and the leader fails those of a replica that stopped beating
(``mqtt_sessions``, hub/ingest/sessions.py). A job cancelled on another replica is stopped by its
owner at its next progress report.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from hub.batch.data import store_sample
from hub.errors import Conflict, Invalid, NotFound
from hub.registry.bundles import parse_ref
from hub.store import Database, dumps, loads
from hub.store.blobs import blocks
from modules.bundle import pull_bundle, verify_bundle_dir
from modules.sandbox import CODE_ROOT
from protocol.encoding import ProtocolError, canonical_json
from protocol.manifest import FileEntry

if TYPE_CHECKING:
    from hub.context import Hub

log = logging.getLogger("edgefleet.hub.batch")

TERMINAL = ("succeeded", "failed", "cancelled")
STOP_GRACE_S = 10.0
STOPPED = "the hub stopped while the job ran: submit it again"


def fail_stopped(db: Database, owner: str | None) -> int:
    """Jobs an earlier process left running, which nobody watches now: every one (``owner`` None: one hub per
    SQLite data directory), or with replicas those of ``owner`` (this replica, restarted)."""
    mine, params = ("", ()) if owner is None else (" AND owner = ?", (owner,))
    with db.transaction() as tx:
        return tx.execute("UPDATE batch_jobs SET state = 'failed', finished_at = ?, error = ? WHERE state = 'running'"
                          + mine, (time.time(), STOPPED, *params)).rowcount


def fail_orphaned(db: Database, stale_s: float) -> int:
    """Leader among replicas: fail the running jobs of replicas whose heartbeat stopped ``stale_s`` ago (or ended)."""
    with db.transaction() as tx:
        cutoff = tx.clock() - stale_s
        return tx.execute("UPDATE batch_jobs SET state = 'failed', finished_at = ?, error = ? WHERE state = 'running'"
                          " AND NOT EXISTS (SELECT 1 FROM mqtt_sessions s WHERE s.client_id = batch_jobs.owner"
                          " AND s.seen_at >= ?)", (time.time(), STOPPED, cutoff)).rowcount


class BatchJobRequest(BaseModel):
    module: str = Field(max_length=200, description='"module:version" or "module@alias" (resolved now)')
    input: str = Field(min_length=1, max_length=4096, description="CSV/Parquet file or directory on the hub's machine")
    output: str = Field(min_length=1, max_length=4096,
                        description="out.parquet / out.csv (one file) or a directory of parts, on the hub's machine")
    columns: list[str] = Field(default=[], max_length=64, description="INPUT=COL,COL... (as edgefleet score)")
    keep: str = Field(default="all", max_length=4096)
    workers: int = Field(default=1, ge=1, le=64)
    part_rows: int = Field(default=262_144, ge=1)
    batch_rows: int = Field(default=65_536, ge=1)
    overwrite: bool = False
    monitor: bool = Field(default=False, description="store a sample of inputs/outputs for drift reports")


class BatchJobs:
    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.db = hub.db
        self._procs: dict[int, subprocess.Popen[str]] = {}
        self._cancelled: set[int] = set()
        self._lock = threading.Lock()
        self.owner = hub.config.mqtt_client_id  # distinct per replica (HubConfig)
        fail_stopped(self.db, self.owner if hub.clustered else None)  # an earlier process's jobs are not watched

    # --- the API ------------------------------------------------------------------------------

    def submit(self, req: BatchJobRequest, who: str = "") -> dict[str, Any]:
        ref, _note = self.hub.aliases.module_ref(req.module)
        name, version = parse_ref(ref)
        info = self.hub.modules.get(name, version)
        src, out = Path(req.input), Path(req.output)
        if not src.is_absolute() or not out.is_absolute():
            raise Invalid("input and output must be absolute paths on the hub's machine")
        if not src.exists():
            raise Invalid(f"input {src} does not exist on the hub's machine")
        if not out.parent.is_dir():
            raise Invalid(f"the output's directory {out.parent} does not exist on the hub's machine")
        if out.exists() and not req.overwrite:
            raise Conflict(f"output {out} exists: remove it or give overwrite")
        data = self.hub.config.data_dir.resolve()
        if any(p.resolve().is_relative_to(data) for p in (src, out)):
            raise Invalid("input and output must be outside the hub's data directory")
        options = req.model_dump(exclude={"module", "input", "output"})
        with self.db.transaction() as tx:
            job = tx.scalar("INSERT INTO batch_jobs (module_name, module_version, digest, requested, input, output, "
                            "options, state, created_at, created_by, started_at, owner) VALUES (?, ?, ?, ?, ?, ?, ?, "
                            "'running', ?, ?, ?, ?) RETURNING id",
                            (name, version, info["digest"], req.module, str(src), str(out), dumps(options),
                             time.time(), who, time.time(), self.owner))
        threading.Thread(target=self._run, args=(job, info, options), name=f"batch-job-{job}", daemon=True).start()
        return self.get(job)

    def get(self, job: int) -> dict[str, Any]:
        row = self.db.one("SELECT * FROM batch_jobs WHERE id = ?", (job,))
        if row is None:
            raise NotFound(f"no batch job {job}")
        return _view(row)

    def list(self, limit: int = 100) -> list[dict[str, Any]]:
        return [_view(r) for r in self.db.query("SELECT * FROM batch_jobs ORDER BY id DESC LIMIT ?", (limit,))]

    def cancel(self, job: int) -> dict[str, Any]:
        if self.get(job)["state"] in TERMINAL:
            raise Conflict(f"batch job {job} has ended ({self.get(job)['state']})")
        with self._lock:
            self._cancelled.add(job)
            proc = self._procs.get(job)
        if proc is not None:
            _stop(proc)
        self._finish(job, "cancelled", error="cancelled")
        return self.get(job)

    def stop(self) -> None:
        """The hub stops: end every job's process (the jobs are marked failed at the next start)."""
        with self._lock:
            procs = list(self._procs.values())
        for proc in procs:
            _stop(proc)

    # --- running one job ----------------------------------------------------------------------

    def _run(self, job: int, info: dict[str, Any], options: dict[str, Any]) -> None:
        scratch: Path | None = None
        try:
            scratch = self._stage(job, info)
            result = self._score(job, scratch, options)
            if result is None:
                return  # cancelled
            out = Path(self.get(job)["output"])
            if options["overwrite"]:
                shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
            shutil.move(str(scratch / "out" / out.name), out)
            summary = {k: result.get(k) for k in ("rows", "parts", "engine", "workers", "seconds", "rows_per_s")}
            if options["monitor"]:
                records = [json.loads(line) for line in (scratch / "out" / "sample.jsonl").read_text().splitlines()
                           if line.strip()]
                for i in range(0, len(records), 500):
                    store_sample(self.db, f"job-{job}", info["name"], info["version"], records[i:i + 500])
                summary["monitor"] = {"name": f"job-{job}", "records": len(records), **(result.get("monitor") or {})}
            self._finish(job, "succeeded", summary=summary, rows_done=result.get("rows"))
        except Exception as exc:
            log.warning("batch job %d failed: %s", job, exc)
            self._finish(job, "failed", error=str(exc) or repr(exc))
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)

    def _stage(self, job: int, info: dict[str, Any]) -> Path:
        """The bundle (verified under the hub's root) and the root, copied where the sandbox can read them."""
        hub = self.hub
        with tempfile.TemporaryDirectory(prefix=f"edgefleet-batch-{job}-") as tmp:
            bundle = Path(tmp) / "bundle"

            def fetch(entry: FileEntry) -> Any:
                return blocks(hub.store, entry.sha256)

            try:
                pull_bundle(bundle, info["envelope"], hub.keys.root, fetch, digest=info["digest"], name=info["name"],
                            version=info["version"], extra={"root.json": canonical_json(hub.keys.root_envelope)})
                verify_bundle_dir(bundle, hub.keys.root)
            except (ProtocolError, OSError) as exc:
                raise Invalid(f"bundle of {info['name']}:{info['version']} failed verification: {exc}") from None
            (Path(tmp) / "root.json").write_bytes(canonical_json(hub.keys.root_envelope))
            staged = hub.sandbox.stage(Path(tmp), follow_symlinks=True)
        out = staged / "out"
        out.mkdir()
        if hub.sandbox.uid >= 0:  # the only directory the job may write
            os.chown(out, hub.sandbox.uid, hub.sandbox.gid)
        return staged

    def _score(self, job: int, scratch: Path, options: dict[str, Any]) -> dict[str, Any] | None:
        row = self.get(job)
        argv = [sys.executable, "-m", "edgefleet", "score", "--bundle", str(scratch / "bundle"),
                "--root", str(scratch / "root.json"), "--input", row["input"],
                "--output", str(scratch / "out" / Path(row["output"]).name), "--workers", str(options["workers"]),
                "--keep", options["keep"], "--part-rows", str(options["part_rows"]),
                "--batch-rows", str(options["batch_rows"]), "--json", "--progress-json",
                *[a for c in options["columns"] for a in ("--columns", c)]]
        if options["monitor"]:
            argv += ["--monitor-file", str(scratch / "out" / "sample.jsonl")]
        sandbox = self.hub.sandbox
        env = None
        if not sandbox.active:
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(CODE_ROOT), env.get("PYTHONPATH", "")) if p)
        launch = sandbox.launch(argv, read_only=[row["input"], scratch], writable=[scratch / "out"], cwd=scratch,
                                env=env)
        try:
            with self._lock:
                if job in self._cancelled:
                    return None
                proc = subprocess.Popen(launch.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, start_new_session=True, **launch.kwargs())
                self._procs[job] = proc
            with self.db.transaction() as tx:
                tx.execute("UPDATE batch_jobs SET pid = ? WHERE id = ?", (proc.pid, job))
            tail = self._follow(job, proc)
            stdout = proc.stdout.read() if proc.stdout else ""
            code = proc.wait()
        finally:
            with self._lock:
                self._procs.pop(job, None)
            launch.cleanup()
        if job in self._cancelled:
            return None
        if code != 0:
            why = " ".join(line.removeprefix("error: ") for line in tail if line) or f"exit code {code}"
            raise RuntimeError(why)
        return json.loads(stdout)

    def _follow(self, job: int, proc: subprocess.Popen[str]) -> list[str]:
        """Progress lines into the job's row; returns the last other lines (the error, if it fails)."""
        tail: collections.deque[str] = collections.deque(maxlen=10)
        assert proc.stderr is not None
        for line in proc.stderr:
            line = line.strip()
            try:
                p = json.loads(line) if line.startswith("{") else None
            except ValueError:
                p = None
            if isinstance(p, dict) and "rows_done" in p:
                with self.db.transaction() as tx:
                    running = tx.execute("UPDATE batch_jobs SET rows_done = ?, rows_total = ?, rows_per_s = ?"
                                         " WHERE id = ? AND state = 'running'",
                                         (p["rows_done"], p["rows_total"], p.get("rows_per_s"), job)).rowcount
                if not running:  # cancelled (or failed as orphaned) elsewhere: another replica's API
                    with self._lock:
                        self._cancelled.add(job)
                    _stop(proc)
            elif line:
                tail.append(line)
        return list(tail)

    def _finish(self, job: int, state: str, *, error: str = "", summary: dict[str, Any] | None = None,
                rows_done: int | None = None) -> None:
        with self.db.transaction() as tx:
            tx.execute("UPDATE batch_jobs SET state = ?, error = ?, summary = ?, finished_at = ?, "
                       "rows_done = coalesce(?, rows_done), rows_total = coalesce(?, rows_total) "
                       "WHERE id = ? AND state = 'running'",
                       (state, error[:4000], dumps(summary) if summary else None, time.time(), rows_done, rows_done,
                        job))


def _stop(proc: subprocess.Popen[str]) -> None:
    """SIGTERM to the job's process group (its worker processes too), SIGKILL after a grace period."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _view(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: row[k] for k in ("id", "requested", "input", "output", "state", "rows_done", "rows_total",
                               "rows_per_s", "error", "created_at", "created_by", "started_at", "finished_at")}
    out["module"] = f"{row['module_name']}:{row['module_version']}"
    out["options"] = loads(row["options"], {})
    out["summary"] = loads(row["summary"])
    total = row["rows_total"]
    out["progress"] = round(row["rows_done"] / total, 4) if total else (1.0 if row["state"] == "succeeded" else 0.0)
    return out
