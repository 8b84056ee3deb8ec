"""``edgefleet serve BUNDLE_DIR``: one endpoint without the hub (a container, a Kubernetes Deployment).

The same Gateway, pools and workers the hub runs; the spec comes from flags instead of the hub.
Workers run in the best sandbox the host offers (modules/sandbox.py, setting "auto"), or none with
``--no-sandbox``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hub.endpoints.codec import read_manifest
from hub.endpoints.gateway import Gateway
from hub.endpoints.httpserver import bind, new_loop
from modules.sandbox import detect

log = logging.getLogger("edgefleet.endpoint.serve")


def standalone_spec(bundle_dir: Path, keys: list[str], workers: int = 1, max_batch: int = 64,
                    max_wait_ms: float = 2.0, collect_db: str = "", threads: int = 1) -> tuple[str, dict[str, Any]]:
    """(endpoint name, spec): the endpoint is named after the bundle's module."""
    manifest = read_manifest(bundle_dir)
    spec = {"keys": keys, "replicas": workers, "max_batch": max_batch, "max_wait_ms": max_wait_ms,
            "threads": threads, "collect_db": collect_db,
            "versions": [{"label": f"{manifest.name}:{manifest.version}", "bundle_dir": str(bundle_dir.resolve()),
                          "weight": 100}]}
    return manifest.name, spec


async def run(bundle_dir: Path, root_file: Path | None, keys: list[str], host: str = "0.0.0.0", port: int = 8000,
              workers: int = 1, max_batch: int = 64, max_wait_ms: float = 2.0, collect_db: str = "",
              name: str | None = None, on_ready: Callable[[str, int], None] | None = None,
              sock: socket.socket | None = None, sandbox: str = "auto", memory_mb: int = 0, threads: int = 1) -> None:
    """Verify and load the bundle, serve until SIGTERM/SIGINT, then drain."""
    bundle_dir = Path(bundle_dir)
    module, spec = standalone_spec(bundle_dir, keys, workers, max_batch, max_wait_ms, collect_db, threads)
    spec["memory_mb"] = memory_mb
    root = json.loads(root_file.read_text()) if root_file else None
    if root is None:
        log.warning("no --root given: trusting the root shipped in %s (trust on first use)", bundle_dir)
    box = detect(sandbox)
    log.info("workers' sandbox: %s", box.describe())
    gateway = Gateway(name or module, root, sandbox=box, metrics=True)
    await gateway.apply(spec)  # verification, load and health check before the port opens
    sock = sock or bind(host, port)
    await gateway.serve(sock)
    if on_ready is not None:
        on_ready(gateway.name, sock.getsockname()[1])
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping: draining in-flight requests")
    await gateway.close()


def serve(**kwargs: Any) -> None:
    loop = new_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(run(**kwargs))
    finally:
        loop.close()
