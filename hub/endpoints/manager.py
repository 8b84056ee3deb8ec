"""The hub's side of web endpoints: the endpoints table, keys, bundles pulled from the hub's own store,
and one gateway process per endpoint, steered over its control path.

A gateway is a child of the hub with its stdin held open: if the hub dies, stdin ends and the
gateway stops with it; a gateway that dies alone is restarted by the monitor thread. Active
endpoints are started again when the hub starts. A gateway runs only the hub's own code (HTTP,
keys, the traffic split, writing telemetry and samples to the database) with an allow-listed
environment; it starts the workers, which run the module's code, in the hub's sandbox.
"""

from __future__ import annotations

import logging
import os
import queue
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from hub.bounds import check_api_name
from hub.context import Hub
from hub.endpoints.autocanary import AutoCanaries
from hub.endpoints.pool import REPO_ROOT
from hub.errors import HubError, Invalid, NotFound
from hub.registry.bundles import parse_ref
from hub.store import dumps, loads, now
from hub.store.blobs import blocks
from modules.bundle import pull_bundle, verify_bundle_dir
from modules.sandbox import Sandbox, scrubbed_env
from protocol.encoding import ProtocolError, canonical_json
from protocol.manifest import FileEntry

log = logging.getLogger("edgefleet.hub.endpoints")

BOOT_TIMEOUT_S = 30.0
APPLY_TIMEOUT_S = 300.0
MONITOR_S = 1.0


class Unavailable(HubError):
    status = 503


def new_key() -> str:
    return secrets.token_urlsafe(32)


def check_name(name: str) -> None:
    check_api_name(name, "endpoint name")  # protocol.names: it names directories and processes


class GatewayProcess:
    """One endpoint's gateway child process and a client for its control path."""

    def __init__(self, name: str, host: str, port: int, root_file: Path, sandbox: Sandbox) -> None:
        self.name = name
        self.control_token = secrets.token_urlsafe(24)
        # the gateway needs no secret of the hub's (the admin token, cloud credentials): only what Python needs
        env = scrubbed_env({"PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p), "HOME": os.environ.get("HOME", "/")})
        self.proc = subprocess.Popen([sys.executable, "-m", "hub.endpoints.gateway"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        boot = {"name": name, "host": host, "port": port, "control_token": self.control_token,
                "root_file": str(root_file), "sandbox": sandbox.to_dict()}
        self.proc.stdin.write(dumps(boot).encode() + b"\n")
        self.proc.stdin.flush()
        lines: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=lambda: lines.put(self.proc.stdout.readline()), daemon=True).start()  # type: ignore[union-attr]
        try:
            line = lines.get(timeout=BOOT_TIMEOUT_S)
            self.port = int(loads(line.decode())["port"])
        except (queue.Empty, ValueError, KeyError) as exc:
            self.stop()
            raise Unavailable(f"the gateway of endpoint {name!r} did not start: {exc!r}") from None
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=APPLY_TIMEOUT_S,
                                 headers={"x-control-token": self.control_token})

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def apply(self, spec: dict[str, Any]) -> dict[str, Any]:
        try:
            resp = self.http.put("/_control/spec", content=dumps(spec))
        except httpx.HTTPError as exc:
            raise Unavailable(f"endpoint {self.name!r}: the gateway did not answer: {exc}") from None
        if resp.status_code != 200:
            raise Invalid(f"endpoint {self.name!r}: {resp.json().get('detail', resp.text)}")
        return resp.json()

    def status(self) -> dict[str, Any]:
        try:
            return self.http.get("/_control/status", timeout=5).json()
        except (httpx.HTTPError, ValueError) as exc:
            return {"error": f"gateway not answering: {exc}"}

    def stop(self, timeout: float = 20.0) -> None:
        """Close stdin (the gateway drains and exits); kill it if it lingers."""
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if hasattr(self, "http"):
            self.http.close()


class EndpointManager:
    def __init__(self, hub: Hub) -> None:
        self.hub, self.db = hub, hub.db
        self.config = hub.config
        self.dir = self.config.data_dir / "endpoints"
        self.root_file = self.config.data_dir / "keys" / "root.json"
        self.gateways: dict[str, GatewayProcess] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._monitor = threading.Thread(target=self._watch, name="endpoint-monitor", daemon=True)
        hub.registry.usage_checks.append(self.models_in_use)
        self.canaries = AutoCanaries(self)  # canaries that move their own weight (hub/endpoints/autocanary.py)

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Bring active endpoints back (in the background: a slow model must not hold up the hub's start)."""
        self._monitor.start()

    def stop(self) -> None:
        self._stop.set()
        if self._monitor.is_alive():
            self._monitor.join(5)
        with self._lock:
            for gw in self.gateways.values():
                gw.stop()
            self.gateways.clear()

    def _watch(self) -> None:
        while not self._stop.is_set():
            for row in self.db.query("SELECT name FROM endpoints"):
                gw = self.gateways.get(row["name"])
                if gw is not None and gw.alive:
                    continue
                with self._lock:
                    if self._stop.is_set() or (row["name"] in self.gateways and self.gateways[row["name"]].alive):
                        continue
                    if self.db.one("SELECT 1 FROM endpoints WHERE name = ?", (row["name"],)) is None:
                        continue  # deleted meanwhile
                    try:
                        if gw is not None:
                            log.warning("the gateway of endpoint %s exited (%s): restarting", row["name"],
                                        gw.proc.returncode)
                        self._launch(self._row(row["name"]))
                    except HubError as exc:
                        log.error("endpoint %s could not start: %s", row["name"], exc)
            self.canaries.tick()
            self._stop.wait(MONITOR_S)

    # --- operations ----------------------------------------------------------------------------

    def deploy(self, name: str, module: str, replicas: int | None = None, max_batch: int | None = None,
               max_wait_ms: float | None = None, traffic: float | None = None, port: int | None = None
               ) -> dict[str, Any]:
        """Create the endpoint, or update it: with ``traffic`` the module joins as a candidate taking that
        percentage; without, it replaces every version (fresh workers, switch when healthy, old ones drain).
        ``port`` moves the endpoint's gateway to that port (default: the one it has, else a free one)."""
        check_name(name)
        module_name, version = parse_ref(module)
        label = f"{module_name}:{version}"
        self.hub.modules.get(module_name, version, with_envelope=False)  # 404 if it does not exist
        if traffic is not None and not 0 <= traffic <= 100:
            raise Invalid("traffic is a percentage between 0 and 100")
        with self._lock:
            row = self.db.one("SELECT * FROM endpoints WHERE name = ?", (name,))
            if row is None:
                row = {"name": name, "versions": [], "replicas": 1, "max_batch": 64, "max_wait_ms": 2.0,
                       "primary_key": new_key(), "secondary_key": new_key(), "port": 0, "created_at": now()}
            else:
                row["versions"] = loads(row["versions"])
            row |= {k: v for k, v in (("replicas", replicas), ("max_batch", max_batch), ("max_wait_ms", max_wait_ms),
                                      ("port", port)) if v is not None}
            if int(row["replicas"]) < 1 or int(row["max_batch"]) < 1 or float(row["max_wait_ms"]) < 0:
                raise Invalid("replicas and max_batch must be >= 1 and max_wait_ms >= 0")
            others = [v for v in row["versions"] if v["module"] != label]
            if traffic is None or not others:
                row["versions"] = [{"module": label, "weight": 100.0, "mirror": 0.0}]
            else:
                rest = sum(v["weight"] for v in others) or 1.0
                row["versions"] = [{**v, "weight": v["weight"] * (100 - traffic) / rest} for v in others]
                row["versions"].append({"module": label, "weight": float(traffic), "mirror": 0.0})
            self._commit(row)
        return self.get(name) | {"keys": self.keys(name)}

    def set_traffic(self, name: str, weights: dict[str, float], mirror: dict[str, float] | None = None) -> dict[str, Any]:
        """Change the split live; a version given weight 0 keeps running (e.g. as a mirror target)."""
        with self._lock:
            row = self._row(name)
            known = {v["module"]: v for v in row["versions"]}
            for label in [*weights, *(mirror or {})]:
                if label not in known:
                    raise Invalid(f"{label} is not a version of endpoint {name!r}: deploy it with --traffic first "
                                  f"(versions: {sorted(known)})")
            row["versions"] = [{"module": m, "weight": float(weights.get(m, v["weight"])),
                                "mirror": float((mirror or {}).get(m, v.get("mirror", 0.0)))} for m, v in known.items()]
            row["versions"] = [v for v in row["versions"] if v["weight"] > 0 or v["mirror"] > 0]
            self._commit(row)
        return self.get(name)

    def regenerate(self, name: str, which: str) -> dict[str, Any]:
        """Replace one key; the other keeps working throughout, so clients move over without downtime."""
        if which not in ("primary", "secondary"):
            raise Invalid("regenerate 'primary' or 'secondary'")
        with self._lock:
            row = self._row(name)
            row[f"{which}_key"] = new_key()
            self._commit(row)
        return self.keys(name)

    def keys(self, name: str) -> dict[str, str]:
        row = self._row(name)
        return {"primary": row["primary_key"], "secondary": row["secondary_key"]}

    def delete(self, name: str) -> dict[str, Any]:
        with self._lock:
            self._row(name)
            gw = self.gateways.pop(name, None)
            if gw is not None:
                gw.stop()
            with self.db.transaction() as tx:
                tx.execute("DELETE FROM endpoints WHERE name = ?", (name,))
            shutil.rmtree(self.dir / name, ignore_errors=True)
        return {"name": name, "deleted": True}

    def list(self) -> list[dict[str, Any]]:
        return [self._view(self._row(r["name"]), None) for r in self.db.query("SELECT name FROM endpoints ORDER BY name")]

    def get(self, name: str) -> dict[str, Any]:
        row = self._row(name)
        gw = self.gateways.get(name)
        return self._view(row, gw.status() if gw is not None and gw.alive else None)

    def models_in_use(self, model: str, version: int) -> list[str]:
        """The registry's usage check: web endpoints serving a module built from ``model:version``."""
        users = []
        for row in self.db.query("SELECT name, versions FROM endpoints ORDER BY name"):
            for v in loads(row["versions"]):
                mname, mversion = parse_ref(v["module"])
                if self.db.one("SELECT 1 FROM module_sources WHERE module_name = ? AND module_version = ? AND"
                               " model_name = ? AND model_version = ?", (mname, mversion, model, version)):
                    users.append(f"web endpoint {row['name']!r} (module {v['module']})")
        return users

    # --- internals -----------------------------------------------------------------------------

    def _row(self, name: str) -> dict[str, Any]:
        row = self.db.one("SELECT * FROM endpoints WHERE name = ?", (name,))
        if row is None:
            raise NotFound(f"endpoint {name!r} does not exist")
        return row | {"versions": loads(row["versions"])}

    def _commit(self, row: dict[str, Any]) -> None:
        """Apply ``row`` to the running gateway (starting it if needed), and store it only if that worked."""
        gw = self.gateways.get(row["name"])
        if gw is None or not gw.alive or int(row.get("port") or 0) not in (0, gw.port):  # new, dead or moved
            gw = self._launch(row)  # on failure it leaves nothing running
        else:
            gw.apply(self._spec(row))
        with self.db.transaction() as tx:
            tx.upsert("endpoints", {
                "name": row["name"], "versions": dumps(row["versions"]), "replicas": int(row["replicas"]),
                "max_batch": int(row["max_batch"]), "max_wait_ms": float(row["max_wait_ms"]),
                "primary_key": row["primary_key"], "secondary_key": row["secondary_key"], "port": gw.port,
                "created_at": row["created_at"], "updated_at": now()}, key=["name"])

    def _launch(self, row: dict[str, Any]) -> GatewayProcess:
        spec = self._spec(row)  # pull before spawning: a bad bundle costs no process
        old = self.gateways.pop(row["name"], None)
        if old is not None:
            old.stop()
        gw = GatewayProcess(row["name"], self.config.endpoint_host, int(row.get("port") or 0), self.root_file,
                            self.hub.sandbox)
        try:
            gw.apply(spec)
        except HubError:
            gw.stop()
            raise
        self.gateways[row["name"]] = gw
        log.info("endpoint %s serving on port %d", row["name"], gw.port)
        return gw

    def _spec(self, row: dict[str, Any]) -> dict[str, Any]:
        versions = [{"label": v["module"], "bundle_dir": str(self._pull(row["name"], v["module"])),
                     "weight": v["weight"], "mirror": v.get("mirror", 0.0)} for v in row["versions"]]
        return {"versions": versions, "keys": [row["primary_key"], row["secondary_key"]],
                "replicas": int(row["replicas"]), "max_batch": int(row["max_batch"]),
                "max_wait_ms": float(row["max_wait_ms"]), "threads": self.config.endpoint_threads,
                "collect_db": self.db.location, "queue_timeout_s": self.config.endpoint_queue_timeout_s,
                "memory_mb": self.config.endpoint_memory_mb,
                "telemetry_interval_s": self.config.endpoint_telemetry_s}

    def _pull(self, endpoint: str, module: str) -> Path:
        """The module's bundle, copied from the hub's own blob store and verified under the hub's root."""
        name, version = parse_ref(module)
        dest = self.dir / endpoint / f"{name}-{version}"
        info = self.hub.modules.get(name, version)
        if dest.is_dir():
            try:
                verify_bundle_dir(dest, self.hub.keys.root)
                return dest
            except ProtocolError:
                shutil.rmtree(dest)

        def fetch(entry: FileEntry) -> Any:
            return blocks(self.hub.store, entry.sha256)

        try:
            pull_bundle(dest, info["envelope"], self.hub.keys.root, fetch, digest=info["digest"], name=name,
                        version=version, extra={"root.json": canonical_json(self.hub.keys.root_envelope)})
            verify_bundle_dir(dest, self.hub.keys.root)
        except (ProtocolError, OSError) as exc:
            raise Invalid(f"bundle of {module} failed verification: {exc}") from None
        return dest

    def _view(self, row: dict[str, Any], status: dict[str, Any] | None) -> dict[str, Any]:
        host = self.config.endpoint_url_host or self.config.endpoint_host
        if host in ("0.0.0.0", "::"):
            host = socket.gethostname()
        base = f"http://{host}:{row['port']}/endpoints/{row['name']}"
        out = {"name": row["name"], "url": base + "/score", "info_url": base, "port": row["port"],
               "versions": row["versions"], "replicas": row["replicas"], "max_batch": row["max_batch"],
               "max_wait_ms": row["max_wait_ms"], "created_at": row["created_at"], "updated_at": row["updated_at"]}
        if status is not None:
            out["status"] = status
        return out


def wait_ready(url: str, key: str, timeout: float = 30.0) -> bool:
    """Poll an endpoint's description until it says ready (for tests and scripts)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url, headers={"api-key": key}, timeout=2)
            if r.status_code == 200 and r.json().get("status") == "ready":
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    return False
