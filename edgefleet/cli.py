"""The ``edgefleet`` command line.

Global ``--hub`` / ``--token`` (env ``EDGEFLEET_HUB`` / ``EDGEFLEET_TOKEN``) say
which hub to talk to; every read command takes ``--json`` for scripts.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from edgefleet.client import HubClient, HubError

app = typer.Typer(help="edgefleet: ML models on fleets of devices and in the cloud.", no_args_is_help=True,
                  add_completion=False)
hub_app = typer.Typer(help="Run the hub.", no_args_is_help=True)
agent_app = typer.Typer(help="Enrol and run the device agent.", no_args_is_help=True)
sim_app = typer.Typer(help="Simulated fleets: many real agents in one process.", no_args_is_help=True)
model_app = typer.Typer(help="The model registry.", no_args_is_help=True)
module_app = typer.Typer(help="Modules: signed bundles built from model versions.", no_args_is_help=True)
deploy_app = typer.Typer(help="Deploy modules to devices.", no_args_is_help=True)
device_app = typer.Typer(help="Devices and enrolment tokens.", no_args_is_help=True)
bundle_app = typer.Typer(help="Pull and verify signed bundles.", no_args_is_help=True)
keys_app = typer.Typer(help="The hub's signing keys and root of trust.", no_args_is_help=True)
for sub, name in ((hub_app, "hub"), (agent_app, "agent"), (sim_app, "sim"), (model_app, "model"),
                  (module_app, "module"), (deploy_app, "deploy"), (device_app, "device"), (bundle_app, "bundle"),
                  (keys_app, "keys")):
    app.add_typer(sub, name=name)

err = Console(stderr=True)


class Ctx:
    hub: str = "http://127.0.0.1:8080"
    token: str | None = None


CTX = Ctx()


@app.callback()
def main(
    hub: str = typer.Option("http://127.0.0.1:8080", "--hub", envvar="EDGEFLEET_HUB", help="Hub URL."),
    token: str | None = typer.Option(None, "--token", envvar="EDGEFLEET_TOKEN", help="API bearer token."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
) -> None:
    from rich.logging import RichHandler

    # Logs go through the same stderr console as progress bars and the demo's live table, so they never tear it.
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(name)s: %(message)s",
                        handlers=[RichHandler(console=err, show_path=False, rich_tracebacks=False)])
    for noisy in ("httpx", "httpcore", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)
    CTX.hub, CTX.token = hub, token


def client() -> HubClient:
    return HubClient(CTX.hub, CTX.token)


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


# --- demo ---------------------------------------------------------------------------------------


@app.command()
def demo(
    devices: int = typer.Option(5, "--devices", min=1, help="Simulated devices."),
    duration: float | None = typer.Option(None, "--duration", help="Seconds to run (default: until Ctrl-C)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary at the end."),
    data: Path | None = typer.Option(None, "--data", help="Keep state here (default: a temporary dir)."),
    mqtt: str | None = typer.Option(None, "--mqtt", envvar="EDGEFLEET_MQTT", help="Use this broker instead of starting one."),
    port: int = typer.Option(0, "--port", help="Hub HTTP port (default: a free one)."),
    rate: float = typer.Option(5.0, "--rate", help="Inferences per second per device."),
) -> None:
    """Broker + hub + simulated fleet + a real ONNX model, deployed; live telemetry."""
    from edgefleet.demo import DemoOptions, run_demo

    if as_json:
        logging.getLogger().setLevel(logging.WARNING)
    run_demo(DemoOptions(devices=devices, duration=duration, data_dir=data, mqtt_url=mqtt, port=port, rate=rate),
             as_json=as_json, console=err)


# --- hub ----------------------------------------------------------------------------------------


@hub_app.command("serve")
def hub_serve(
    data: Path = typer.Option(Path("edgefleet-data"), "--data", envvar="EDGEFLEET_DATA", help="Hub data directory."),
    host: str = typer.Option("127.0.0.1", "--host", envvar="EDGEFLEET_HOST"),
    port: int = typer.Option(8080, "--port", envvar="EDGEFLEET_PORT"),
    mqtt: str | None = typer.Option(None, "--mqtt", envvar="EDGEFLEET_MQTT", help="Broker URL; default: start a local one."),
    public_mqtt: str | None = typer.Option(None, "--public-mqtt", envvar="EDGEFLEET_PUBLIC_MQTT", help="Broker URL handed to devices."),
) -> None:
    """Run the hub API (and a local broker unless --mqtt is given) until Ctrl-C."""
    from edgefleet.broker import LocalBroker
    from hub.config import HubConfig
    from hub.server import serve_forever

    log = logging.getLogger("edgefleet.hub")
    broker = None
    if mqtt is None:
        broker = LocalBroker(host="127.0.0.1").start()
        mqtt = broker.url
    log.info("hub API at http://%s:%s (docs /docs, metrics /metrics); MQTT broker %s", host, port, mqtt)
    try:
        serve_forever(HubConfig(data_dir=data, mqtt_url=mqtt, public_mqtt_url=public_mqtt), host=host, port=port)
    finally:
        if broker is not None:
            broker.stop()


# --- agent --------------------------------------------------------------------------------------


@agent_app.command("enroll")
def agent_enroll(
    token: str = typer.Option(..., "--token", help="Enrolment token from `edgefleet device token`."),
    data: Path = typer.Option(..., "--data", help="Agent data directory."),
    hub: str | None = typer.Option(None, "--hub", help="Hub URL (default: the global --hub)."),
    device_id: str | None = typer.Option(None, "--device-id"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Enrol this device: get its id, MQTT credentials and the pinned root of trust."""
    from agent.identity import enroll

    try:
        ident = enroll(hub or CTX.hub, token, data, device_id=device_id)
    except Exception as exc:  # enrol errors are reported, not traced
        err.print(f"[red]enrolment failed:[/] {exc}")
        raise typer.Exit(1) from None
    emit({"device_id": ident.device_id, "data": str(data)}, as_json)


@agent_app.command("run")
def agent_run(
    data: Path = typer.Option(..., "--data", help="Agent data directory (after `agent enroll`)."),
    mqtt: str | None = typer.Option(None, "--mqtt", envvar="EDGEFLEET_MQTT", help="Override the broker URL."),
    rate: float = typer.Option(0.0, "--rate", help="Synthetic inferences/s (0: serve only local requests)."),
    telemetry_interval: float = typer.Option(5.0, "--telemetry-interval"),
) -> None:
    """Run the device daemon until SIGINT/SIGTERM."""
    from agent.daemon import run_agent

    run_agent(data, mqtt_url=mqtt, workload_rate=rate, telemetry_interval=telemetry_interval)


# --- simulator ----------------------------------------------------------------------------------


@sim_app.command("run")
def sim_run(
    devices: int = typer.Option(10, "--devices", min=1),
    data: Path = typer.Option(Path("edgefleet-sim"), "--data"),
    mqtt: str | None = typer.Option(None, "--mqtt", envvar="EDGEFLEET_MQTT"),
    rate: float = typer.Option(2.0, "--rate"),
    telemetry_interval: float = typer.Option(2.0, "--telemetry-interval"),
    duration: float | None = typer.Option(None, "--duration"),
    prefix: str = typer.Option("sim", "--prefix"),
) -> None:
    """Run N simulated devices (real agents, real MQTT connections) against --hub."""
    import asyncio

    from simulator.fleet import run_fleet

    if not CTX.token:
        err.print("[red]error:[/] --token (or EDGEFLEET_TOKEN) is needed to create enrolment tokens")
        raise typer.Exit(2)
    try:
        asyncio.run(run_fleet(CTX.hub, CTX.token, devices, data, mqtt_url=mqtt, rate=rate,
                              telemetry_interval=telemetry_interval, duration=duration, prefix=prefix))
    except KeyboardInterrupt:
        pass


# --- registry -----------------------------------------------------------------------------------


def parse_model_ref(ref: str, need_version: bool = True) -> tuple[str, int | None]:
    """``NAME:VERSION`` (or ``NAME`` when the version may be left out)."""
    name, sep, version = ref.rpartition(":")
    if sep and name and version.isdigit() and int(version) >= 1:
        return name, int(version)
    if need_version or ":" in ref:
        raise typer.BadParameter(f"{ref!r} is not NAME:VERSION")
    return ref, None


def upload_progress(paths: list[Path], quiet: bool) -> tuple[Any, Any]:
    """A rich progress bar over the bytes of ``paths`` (on stderr, so --json output stays clean)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    total = sum(p.stat().st_size for p in paths)
    bar = Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   console=err, disable=quiet or total < 1024 * 1024, transient=True)
    task = bar.add_task("uploading", total=total)
    return bar, lambda n: bar.advance(task, n)


@model_app.command("register")
def model_register(
    name: str,
    paths: list[Path] = typer.Argument(..., exists=True, dir_okay=False),
    tag: list[str] = typer.Option([], "--tag", help="key=value, repeatable."),
    description: str = typer.Option("", "--description"),
    prop: list[str] = typer.Option([], "--property", help="key=value, repeatable."),
    parent: str = typer.Option("", "--parent", help="Lineage: NAME:VERSION this was derived from."),
    dataset: str = typer.Option("", "--dataset", help="Lineage: dataset reference."),
    training_run: str = typer.Option("", "--training-run", help="Lineage: training-run reference."),
    baseline: Path | None = typer.Option(None, "--baseline", exists=True, dir_okay=False,
                                         help="Baseline statistics / reference data for drift monitoring."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Register a model version: NAME and one or more files (the model is load-checked by the hub)."""
    bar, progress = upload_progress(paths, as_json)
    with client() as c, bar:
        res = call(lambda: c.register_model(name, paths, parse_kv(tag), description, properties=parse_kv(prop),
                                            lineage={"parent": parent, "dataset": dataset, "training_run": training_run},
                                            baseline=baseline, progress=progress))
    emit(res, as_json, ["name", "version", "framework", "tags"])


@model_app.command("list")
def model_list(
    name: str | None = typer.Option(None, "--name"),
    tag: list[str] = typer.Option([], "--tag", help="key=value; repeat to require several."),
    framework: str | None = typer.Option(None, "--framework"),
    limit: int = typer.Option(100, "--limit", min=1, max=1000),
    offset: int = typer.Option(0, "--offset", min=0),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List model versions, newest first."""
    params = {"name": name, "tag": tag, "framework": framework, "limit": limit, "offset": offset}
    with client() as c:
        res = call(lambda: c.request("GET", "/api/v1/models", params={k: v for k, v in params.items() if v is not None}))
    items = res.get("items", res) if isinstance(res, dict) else res
    emit(items, as_json, ["name", "version", "framework", "tags", "created_at"])


def _resolve(c: HubClient, ref: str) -> tuple[str, int]:
    name, version = parse_model_ref(ref, need_version=False)
    if version is None:  # the newest version
        latest = call(lambda: c.get("/api/v1/models", name=name, limit=1))
        if not latest:
            err.print(f"[red]error:[/] model {name!r} has no versions")
            raise typer.Exit(1)
        version = latest[0]["version"]
    return name, version


@model_app.command("show")
def model_show(ref: str = typer.Argument(..., help="NAME or NAME:VERSION"), as_json: bool = typer.Option(False, "--json")) -> None:
    """One model version with its files, signature, tags, lineage and properties."""
    with client() as c:
        name, version = _resolve(c, ref)
        res = call(lambda: c.get(f"/api/v1/models/{name}/versions/{version}"))
    if as_json:
        emit(res, True)
        return
    emit([{"field": k, "value": v} for k, v in res.items()], False, ["field", "value"], title=f"{name}:{version}")


@model_app.command("tag")
def model_tag(
    ref: str = typer.Argument(..., help="NAME:VERSION"),
    pairs: list[str] = typer.Argument(None, help="key=value to set"),
    remove: list[str] = typer.Option([], "--remove", help="Tag key to remove, repeatable."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Set and remove tags of a model version."""
    name, version = parse_model_ref(ref)
    body = {"tags": parse_kv(pairs or []), "remove_tags": remove}
    with client() as c:
        res = call(lambda: c.request("PATCH", f"/api/v1/models/{name}/versions/{version}", json=body))
    emit(res, as_json, ["name", "version", "tags"])


@model_app.command("delete")
def model_delete(ref: str = typer.Argument(..., help="NAME:VERSION"), as_json: bool = typer.Option(False, "--json")) -> None:
    """Delete a model version (refused while a deployment uses a module built from it)."""
    name, version = parse_model_ref(ref)
    with client() as c:
        res = call(lambda: c.request("DELETE", f"/api/v1/models/{name}/versions/{version}"))
    emit(res, as_json, ["name", "version", "deleted"])


@model_app.command("download")
def model_download(
    ref: str = typer.Argument(..., help="NAME:VERSION (or NAME for the newest)"),
    out: Path = typer.Option(Path("."), "--out", help="Directory to write the files into."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Download a model version's files (each checked against its registered sha256)."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with client() as c:
        name, version = _resolve(c, ref)
        model = call(lambda: c.get(f"/api/v1/models/{name}/versions/{version}"))
        for f in model["files"]:
            target = out / Path(f["path"]).name
            call(lambda f=f, target=target: c.download(f"/api/v1/models/{name}/versions/{version}/files/{f['path']}",
                                                       target))
            got = sha256_file(target)
            if got != f["sha256"]:
                target.unlink()
                err.print(f"[red]error:[/] {f['path']} arrived with sha256 {got[:12]}…, expected {f['sha256'][:12]}…")
                raise typer.Exit(1)
            written.append({"path": str(target), "sha256": f["sha256"], "size": f["size"]})
    emit(written, as_json, ["path", "size", "sha256"])


def sha256_file(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1024 * 1024):
            h.update(block)
    return h.hexdigest()


# --- modules ------------------------------------------------------------------------------------


def load_spec(path: Path) -> dict[str, Any]:
    """A module spec: JSON, or TOML (``.toml``), with keys models, runtime, entry, sample, collect_rate_ppm."""
    import tomllib

    try:
        spec = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise typer.BadParameter(f"{path}: {exc}") from None
    if not isinstance(spec, dict):
        raise typer.BadParameter(f"{path}: a module spec is an object")
    unknown = sorted(set(spec) - {"name", "models", "runtime", "entry", "sample", "collect_rate_ppm", "resources"})
    if unknown:
        raise typer.BadParameter(f"{path}: unknown spec key(s) {unknown}")
    return spec


@module_app.command("build")
def module_build(
    name: str,
    model: list[str] = typer.Option([], "--model", help="MODEL:VERSION, repeatable (the first is the main model)."),
    sample: Path | None = typer.Option(None, "--sample", exists=True, help="JSON {\"inputs\": {...}} for health checks."),
    entry: Path | None = typer.Option(None, "--entry", exists=True, dir_okay=False,
                                      help="Pre/post-processing script (preprocess/postprocess, or init/run)."),
    runtime: str | None = typer.Option(None, "--runtime", help="onnx, tflite or python (default: the model's)."),
    collect_rate: int | None = typer.Option(None, "--collect-rate-ppm", help="Share of inferences to sample (ppm)."),
    spec: Path | None = typer.Option(None, "--spec", exists=True, dir_okay=False,
                                     help="JSON or TOML module spec; flags override it. Paths are relative to it."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Build a signed bundle from model versions and record it as module NAME version N+1."""
    declared = load_spec(spec) if spec else {}
    base = spec.parent if spec else Path(".")
    models = model or list(declared.get("models", []))
    if not models:
        raise typer.BadParameter("give at least one --model MODEL:VERSION (or models in --spec)")
    body: dict[str, Any] = {"name": name, "models": models}
    sample_path = sample or (base / declared["sample"] if declared.get("sample") else None)
    entry_path = entry or (base / declared["entry"] if declared.get("entry") else None)
    if sample_path:
        body["sample"] = json.loads(sample_path.read_text())
    if entry_path:
        body["entry"], body["entry_name"] = entry_path.read_text(), entry_path.name
    if runtime or declared.get("runtime"):
        body["runtime"] = runtime or declared["runtime"]
    rate = collect_rate if collect_rate is not None else declared.get("collect_rate_ppm")
    if rate is not None:
        body["collect_rate_ppm"] = rate
    if declared.get("resources"):
        body["resources"] = declared["resources"]
    with client() as c:
        res = call(lambda: c.post("/api/v1/modules", body))
    emit(res, as_json, ["name", "version", "digest", "size"])


# --- bundles ------------------------------------------------------------------------------------


def _fail(exc: Exception) -> None:
    err.print(f"[red]refused:[/] {exc}")
    raise typer.Exit(1)


@bundle_app.command("pull")
def bundle_pull(
    ref: str = typer.Argument(..., help="MODULE:VERSION"),
    dest: Path = typer.Argument(..., help="Directory to write the bundle into (replaced only if the new one verifies)."),
    root: Path | None = typer.Option(None, "--root", exists=True, dir_okay=False,
                                     help="Pinned root.json to trust (default: trust the hub's root on first use)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Download a signed release, its files and the hub's root; verify all of it; write DIR only if it is valid."""
    import httpx

    from protocol.encoding import ProtocolError

    name, version = parse_model_ref(ref)
    try:
        pinned = json.loads(root.read_text()) if root else None
        with client() as c:
            manifest = c.pull_bundle(name, version or 0, dest, pinned)
    except (HubError, ProtocolError, httpx.HTTPError, ValueError) as exc:
        _fail(exc)
    emit({"name": manifest.name, "version": manifest.version, "digest": manifest.digest(), "dir": str(dest),
          "files": len(manifest.files), "size": manifest.size}, as_json, ["name", "version", "digest", "dir"])


@bundle_app.command("verify")
def bundle_verify(
    bundle_dir: Path = typer.Argument(..., help="A bundle directory (release.json + files/)."),
    root: Path = typer.Option(..., "--root", exists=True, dir_okay=False, help="The root.json you trust."),
    min_version: int = typer.Option(0, "--min-version", help="Refuse versions older than this (rollback)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Exit 0 only if the bundle's signature, expiry and every file's length and hash check out."""
    from modules.bundle import verify_pulled
    from protocol.encoding import ProtocolError
    from protocol.signing import load_trusted_root

    try:
        manifest = verify_pulled(bundle_dir, load_trusted_root(json.loads(root.read_text())), min_version)
    except (ProtocolError, ValueError, OSError) as exc:
        _fail(exc)
    emit({"valid": True, "name": manifest.name, "version": manifest.version, "digest": manifest.digest(),
          "files": len(manifest.files)}, as_json, ["valid", "name", "version", "digest"])


# --- keys ---------------------------------------------------------------------------------------


def root_summary(envelope: dict[str, Any]) -> dict[str, Any]:
    signed = envelope["signed"]
    return {"version": signed["version"], "expires": signed["expires"],
            "roles": {r: {"keyids": v["keyids"], "threshold": v["threshold"]} for r, v in signed["roles"].items()}}


@keys_app.command("init")
def keys_init(
    data: Path = typer.Option(..., "--data", envvar="EDGEFLEET_DATA", help="Hub data directory."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Create the hub's root, release and director keys and root.json before its first start (idempotent)."""
    from hub.keys import load_or_create_keys

    ring = load_or_create_keys(data / "keys")
    emit(root_summary(ring.root_envelope) | {"keys_dir": str(data / "keys")}, as_json)


@keys_app.command("show")
def keys_show(
    out: Path | None = typer.Option(None, "--out", help="Also write the root envelope here (to pin it)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """The hub's current root of trust: version, expiry, and per role the key ids and threshold."""
    with client() as c:
        envelope = call(lambda: c.get("/api/v1/root"))
    if out:
        out.write_text(json.dumps(envelope, indent=2, sort_keys=True) + "\n")
    summary = root_summary(envelope)
    if as_json:
        emit(summary, True)
        return
    emit([{"role": r, "threshold": v["threshold"], "keyids": ", ".join(k[:16] for k in v["keyids"])}
          for r, v in summary["roles"].items()], False, ["role", "threshold", "keyids"],
         title=f"root version {summary['version']}, expires {summary['expires']}")


@keys_app.command("rotate")
def keys_rotate(
    role: str = typer.Argument(..., help="root, release or director"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """New key for ROLE: the hub publishes root version N+1 (signed by old and new root keys); the old key is revoked."""
    with client() as c:
        res = call(lambda: c.post("/api/v1/keys/rotate", {"role": role}))
    emit(res, as_json, ["role", "root_version", "keyid", "revoked"])


@deploy_app.command("edge")
def deploy_edge(
    name: str,
    module: str = typer.Option(..., "--module", help="MODULE:VERSION"),
    target: str = typer.Option("*", "--target", help="'*', device ids, or labels like site=berlin,tier!=dev"),
    priority: int = typer.Option(0, "--priority"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Deploy a module to the devices a selector matches."""
    with client() as c:
        res = call(lambda: c.post("/api/v1/deployments", {"name": name, "module": module, "target": target,
                                                          "priority": priority}))
    emit(res, as_json)


@device_app.command("token")
def device_token(
    label: list[str] = typer.Option([], "--label", help="key=value given to the device, repeatable."),
    expires: int = typer.Option(3600, "--expires", help="Seconds until the token expires."),
    count: int = typer.Option(1, "--count", min=1),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Create single-use enrolment tokens."""
    with client() as c:
        res = call(lambda: c.post("/api/v1/enrollment-tokens", {"count": count, "labels": parse_kv(label),
                                                                "expires_in": expires}))
    out = {"token": res["tokens"][0], "tokens": res["tokens"], "expires_at": res.get("expires_at")}
    if as_json:
        emit(out, True)
    else:
        for t in res["tokens"]:
            print(t)


@device_app.command("list")
def device_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """Devices with their state, modules and inference counts."""
    with client() as c:
        res = call(lambda: c.get("/api/v1/devices"))
    emit(res, as_json, ["id", "online", "state", "labels", "modules", "inferences", "last_seen"])


@device_app.command("show")
def device_show(device_id: str, as_json: bool = typer.Option(False, "--json")) -> None:
    with client() as c:
        res = call(lambda: c.get(f"/api/v1/devices/{device_id}"))
    emit(res, as_json)


@app.command()
def status(as_json: bool = typer.Option(False, "--json")) -> None:
    """Fleet summary from the hub."""
    with client() as c:
        res = call(lambda: c.get("/api/v1/fleet/summary"))
    emit(res, as_json)


def run() -> None:  # pragma: no cover - console entry convenience
    app()


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()
