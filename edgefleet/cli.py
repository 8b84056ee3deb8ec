"""The ``edgefleet`` command line.

Global ``--hub`` / ``--token`` (env ``EDGEFLEET_HUB`` / ``EDGEFLEET_TOKEN``) say
which hub to talk to; every read command takes ``--json`` for scripts.
"""

from __future__ import annotations

import json
import logging
import os
import sys
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
for sub, name in ((hub_app, "hub"), (agent_app, "agent"), (sim_app, "sim"), (model_app, "model"),
                  (module_app, "module"), (deploy_app, "deploy"), (device_app, "device")):
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
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
             as_json=as_json)


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
    from hub.server import serve_forever

    from edgefleet.broker import LocalBroker
    from hub.config import HubConfig

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


@model_app.command("register")
def model_register(
    name: str,
    paths: list[Path] = typer.Argument(..., exists=True, dir_okay=False),
    tag: list[str] = typer.Option([], "--tag", help="key=value, repeatable."),
    description: str = typer.Option("", "--description"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Register a model version: NAME and one or more files."""
    with client() as c:
        res = call(lambda: c.register_model(name, paths, parse_kv(tag), description))
    emit(res, as_json, ["name", "version", "framework", "tags"])


@model_app.command("list")
def model_list(
    name: str | None = typer.Option(None, "--name"),
    tag: list[str] = typer.Option([], "--tag"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List model versions, newest first."""
    with client() as c:
        res = call(lambda: c.request("GET", "/api/v1/models", params={"name": name, "tag": tag} if name else {"tag": tag}))
    items = res.get("items", res) if isinstance(res, dict) else res
    emit(items, as_json, ["name", "version", "framework", "tags", "created_at"])


@module_app.command("build")
def module_build(
    name: str,
    model: list[str] = typer.Option(..., "--model", help="MODEL:VERSION, repeatable."),
    sample: Path | None = typer.Option(None, "--sample", exists=True, help="JSON {\"inputs\": {...}} for health checks."),
    runtime: str | None = typer.Option(None, "--runtime"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Build a signed bundle from model versions and record it as module NAME version N+1."""
    body: dict[str, Any] = {"name": name, "models": model}
    if sample:
        body["sample"] = json.loads(sample.read_text())
    if runtime:
        body["runtime"] = runtime
    with client() as c:
        res = call(lambda: c.post("/api/v1/modules", body))
    emit(res, as_json, ["name", "version", "digest", "size"])


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
