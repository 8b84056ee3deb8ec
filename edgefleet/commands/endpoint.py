"""Web endpoint commands: ``deploy web``, ``endpoint list|show|keys|traffic|delete`` and ``serve``."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

import typer

from edgefleet.cli_common import call, client, emit, err, fail, get
from edgefleet.commands import oneshot
from edgefleet.commands.fleet import deploy_app

endpoint_app = typer.Typer(rich_markup_mode=None, help="Web endpoints: models served over HTTP by the hub.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Attach ``endpoint …`` and ``serve`` to the top-level app (``deploy web`` attaches itself to ``deploy``)."""
    app.add_typer(endpoint_app, name="endpoint")
    app.command("serve")(serve)


def parse_weights(pairs: list[str]) -> dict[str, float]:
    out = {}
    for pair in pairs:
        ref, sep, value = pair.rpartition("=")
        try:
            out[ref] = float(value)
        except ValueError:
            sep = ""
        if not sep or not ref:
            raise typer.BadParameter(f"{pair!r} is not MODULE:VERSION=NUMBER")
    return out


@deploy_app.command("web")
def deploy_web(
    name: str,
    module: str | None = oneshot.MODULE_OPT,
    model: list[str] = oneshot.MODEL_OPT,
    model_name: str | None = oneshot.MODEL_NAME_OPT,
    sample: Path | None = oneshot.SAMPLE_OPT,
    entry: Path | None = oneshot.ENTRY_OPT,
    runtime: str | None = oneshot.RUNTIME_OPT,
    baseline: Path | None = oneshot.BASELINE_OPT,
    tag: list[str] = oneshot.TAG_OPT,
    key: Path | None = oneshot.KEY_OPT,
    replicas: int | None = typer.Option(None, "--replicas", min=1, help="Worker processes per version (default 1)."),
    max_batch: int | None = typer.Option(None, "--max-batch", min=1, help="Requests per batched model call (64)."),
    max_wait_ms: float | None = typer.Option(None, "--max-wait-ms", min=0, help="How long a batch may wait to fill (2)."),
    port: int | None = typer.Option(None, "--port", min=1, max=65535,
                                    help="Port the endpoint listens on (default: the one it has, else a free one; "
                                         "the address is the hub's --endpoint-host)."),
    traffic: float | None = typer.Option(None, "--traffic", min=0, max=100,
                                         help="Add beside the current version with this % of traffic (blue/green); "
                                              "without it the module replaces the current version."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Serve a module as an HTTP endpoint; returns once it is healthy and taking traffic.
    With --model FILE: register, build, sign and serve in one step."""
    oneshot.check_choice(module, model)
    steps: list[dict[str, Any]] = []
    with client() as c:
        if model:
            src = oneshot.ModelSource(model, model_name, None, sample, entry, runtime, baseline, tag, key)
            module, steps = oneshot.prepare(c, name, src, 4)
        body = {"name": name, "module": module, "replicas": replicas, "max_batch": max_batch,
                "max_wait_ms": max_wait_ms, "traffic": traffic, "port": port}
        res = call(lambda: c.post("/api/v1/endpoints", {k: v for k, v in body.items() if v is not None}))
    if model:
        oneshot.deployed(steps, 4, f"endpoint {name} serves {module} at {res['url']}", endpoint=name, url=res["url"])
        res = res | {"steps": steps}
    if as_json:
        emit(res, True)
    else:
        emit(res, False, ["name", "versions", "replicas"])
        # plain lines, never wrapped or cut: they are copied into clients
        print(f"url: {res['url']}\nprimary key: {res['keys']['primary']}\nsecondary key: {res['keys']['secondary']}")


@endpoint_app.command("list")
def endpoint_list(as_json: bool = typer.Option(False, "--json")) -> None:
    res = get("/api/v1/endpoints")
    emit(res, as_json, ["name", "url", "versions", "replicas", "max_batch"])


@endpoint_app.command("show")
def endpoint_show(name: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """Versions, traffic, workers (pids, restarts, batches) and response counts."""
    res = get(f"/api/v1/endpoints/{name}")
    emit(res, as_json)


@endpoint_app.command("keys")
def endpoint_keys(
    name: str,
    regenerate: str | None = typer.Option(None, "--regenerate", help="primary or secondary: replace that key only."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Show the keys, or rotate one (clients on the other key keep working)."""
    if regenerate not in (None, "primary", "secondary"):
        raise typer.BadParameter("--regenerate takes primary or secondary")
    with client() as c:
        if regenerate:
            res = call(lambda: c.post(f"/api/v1/endpoints/{name}/keys", {"regenerate": regenerate}))
        else:
            res = call(lambda: c.get(f"/api/v1/endpoints/{name}/keys"))
    emit(res, as_json)


@endpoint_app.command("traffic")
def endpoint_traffic(
    name: str,
    weights: list[str] = typer.Argument(None, help="MODULE:VERSION=WEIGHT …, e.g. m:1=90 m:2=10"),
    mirror: list[str] = typer.Option([], "--mirror", help="MODULE:VERSION=SHARE (0-1) of traffic copied there."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Change the traffic split (and mirroring) live."""
    with client() as c:
        res = call(lambda: c.post(f"/api/v1/endpoints/{name}/traffic",
                                  {"weights": parse_weights(weights or []), "mirror": parse_weights(mirror)}))
    emit(res, as_json, ["name", "url", "versions"])


@endpoint_app.command("canary")
def endpoint_canary(
    name: str,
    module: str | None = typer.Option(None, "--module", help="The candidate MODULE:VERSION; omit to show the canary."),
    steps: str = typer.Option("5,25,50,100", "--steps", help="Traffic percentages, growing."),
    interval: str = typer.Option("60s", "--interval", help="How long each step runs before it may pass."),
    gate: list[str] = typer.Option([], "--gate", help="max_error_rate=0.01, max_p95_increase=0.2"),
    min_inferences: int = typer.Option(20, "--min-inferences", min=1),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """A canary that moves its own weight up --steps while its gates pass, and to 0 when they fail."""
    from edgefleet.cli_common import parse_duration
    from edgefleet.commands.fleet import _gates

    with client() as c:
        if module is None:
            res = call(lambda: c.get(f"/api/v1/endpoints/{name}/canary"))
        else:
            body = {"module": module, "steps": [float(s) for s in steps.split(",") if s.strip()],
                    "interval_s": parse_duration(interval), "gates": _gates(gate), "min_inferences": min_inferences}
            res = call(lambda: c.post(f"/api/v1/endpoints/{name}/canary", body))
    emit(res, as_json, ["endpoint", "module", "step", "weight", "state", "reason"])


@endpoint_app.command("delete")
def endpoint_delete(name: str, as_json: bool = typer.Option(False, "--json")) -> None:
    with client() as c:
        res = call(lambda: c.request("DELETE", f"/api/v1/endpoints/{name}"))
    emit(res, as_json)


def serve(
    bundle_dir: Path = typer.Argument(..., exists=True, file_okay=False, help="A pulled bundle (edgefleet bundle pull)."),
    root: Path | None = typer.Option(None, "--root", exists=True, dir_okay=False,
                                     help="Root of trust to verify the bundle against (default: the bundle's own)."),
    host: str = typer.Option("0.0.0.0", "--host"),
    port: int = typer.Option(8000, "--port"),
    workers: int = typer.Option(1, "--workers", min=1, help="Worker processes."),
    threads: int = typer.Option(1, "--threads", min=1, max=256,
                                help="Runtime threads per worker (ONNX Runtime intra-op, LiteRT); workers x threads "
                                     "at most the cores."),
    max_batch: int = typer.Option(64, "--max-batch", min=1),
    max_wait_ms: float = typer.Option(2.0, "--max-wait-ms", min=0),
    key: list[str] = typer.Option([], "--key", envvar="EDGEFLEET_ENDPOINT_KEYS",
                                  help="Accepted key (repeatable; env: comma-separated). Default: two generated."),
    collect_db: str = typer.Option("", "--collect-db", envvar="EDGEFLEET_COLLECT_DB",
                                   help="Where sampled requests go: a hub.db, or the hubs' postgresql:// URL."),
    name: str | None = typer.Option(None, "--name", help="Endpoint name (default: the module's)."),
    as_json: bool = typer.Option(False, "--json", help="Print the URL and keys as one JSON line once serving."),
    no_sandbox: bool = typer.Option(False, "--no-sandbox",
                                    help="Run the module's code without the sandbox (default: bubblewrap or a "
                                         "separate user where available; see docs/security.md)."),
    memory_mb: int = typer.Option(0, "--memory-mb", min=0, help="Address-space cap per worker in MiB (0: none)."),
) -> None:
    """Serve one bundle as an endpoint without the hub (containers, Kubernetes); same code as hub endpoints."""
    from hub.endpoints.codec import read_manifest
    from hub.endpoints.pool import PoolError
    from hub.endpoints.standalone import serve as run_serve
    from protocol.encoding import ProtocolError

    try:  # not a bundle: say so in one line (exit 2, like any bad argument) before generating keys or workers
        read_manifest(bundle_dir)
    except (OSError, ValueError, KeyError, TypeError, ProtocolError) as exc:
        fail(f"{bundle_dir} is not a bundle directory (edgefleet bundle pull M:V DIR writes one): "
             f"{type(exc).__name__}: {exc}", code=2)
    keys = [k.strip() for item in key for k in item.split(",") if k.strip()]
    if not keys:
        keys = [secrets.token_urlsafe(32), secrets.token_urlsafe(32)]
        err.print(f"generated keys (pass --key or EDGEFLEET_ENDPOINT_KEYS to fix them): {keys[0]} {keys[1]}")

    def ready(endpoint: str, bound: int) -> None:
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        url = f"http://{shown}:{bound}/endpoints/{endpoint}/score"
        if as_json:
            print(json.dumps({"url": url, "keys": keys, "pid": os.getpid()}), flush=True)
        else:
            err.print(f"serving {endpoint} at {url}")

    try:
        run_serve(bundle_dir=bundle_dir, root_file=root, keys=keys, host=host, port=port, workers=workers,
                  max_batch=max_batch, max_wait_ms=max_wait_ms, collect_db=collect_db, name=name, on_ready=ready,
                  sandbox="off" if no_sandbox else "auto", memory_mb=memory_mb, threads=threads)
    except (PoolError, ProtocolError, OSError, ValueError) as exc:  # a bundle that does not verify or load
        fail(f"cannot serve {bundle_dir}: {exc}")
