"""Commands that run things: the demo, the hub, the agent, the simulator."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import typer

from edgefleet.cli_common import CTX, emit, err, escape, parse_duration

hub_app = typer.Typer(rich_markup_mode=None, help="Run the hub.", no_args_is_help=True)
agent_app = typer.Typer(rich_markup_mode=None, help="Enrol and run the device agent.", no_args_is_help=True)
sim_app = typer.Typer(rich_markup_mode=None, help="Simulated fleets: many real agents in one process.", no_args_is_help=True)

# --- demo ---------------------------------------------------------------------------------------


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
    host: str = typer.Option("127.0.0.1", "--host", envvar="EDGEFLEET_HOST",
                             help="API address; beyond loopback it is served over HTTPS (docs/security.md)."),
    port: int = typer.Option(8080, "--port", envvar="EDGEFLEET_PORT"),
    mqtt: str | None = typer.Option(None, "--mqtt", envvar="EDGEFLEET_MQTT", help="Broker URL; default: start a local one."),
    public_mqtt: str | None = typer.Option(None, "--public-mqtt", envvar="EDGEFLEET_PUBLIC_MQTT", help="Broker URL handed to devices."),
    isolate: bool = typer.Option(False, "--isolate", help="Per-device broker logins and ACL (DATA/broker): always on "
                                 "with the hub's own broker; with --mqtt, the files for yours (docs/fleet.md)."),
    ingest_workers: int = typer.Option(0, "--ingest-workers", envvar="EDGEFLEET_INGEST_WORKERS", min=0,
                                       help="Extra processes sharing telemetry ingest (MQTT 5 shared subscription)."),
    broker_ca: Path | None = typer.Option(None, "--broker-ca", envvar="EDGEFLEET_BROKER_CA", exists=True, dir_okay=False,
                                          help="PEM CA of an mqtts:// broker: the hub trusts it and pins it on devices."),
    broker_port: int | None = typer.Option(None, "--broker-port", envvar="EDGEFLEET_BROKER_PORT", min=1, max=65535,
                                           help="Port of the local broker (default: the one recorded in DATA, "
                                                "else a free one, recorded)."),
    tls_cert: Path | None = typer.Option(None, "--tls-cert", exists=True, dir_okay=False,
                                         help="PEM certificate (chain) for HTTPS; default beyond loopback: the hub's own."),
    tls_key: Path | None = typer.Option(None, "--tls-key", exists=True, dir_okay=False, help="Its private key."),
    broker_cert: Path | None = typer.Option(None, "--broker-cert", exists=True, dir_okay=False,
                                            help="PEM certificate for the local broker's device listener (MQTTS)."),
    broker_key: Path | None = typer.Option(None, "--broker-key", exists=True, dir_okay=False, help="Its private key."),
    tls_ca: Path | None = typer.Option(None, "--tls-ca", exists=True, dir_okay=False,
                                       help="CA of --tls-cert/--broker-cert to pin on devices (default: the system's)."),
    tls_name: list[str] = typer.Option([], "--tls-name", help="Another name or address the hub's own certificate covers."),
    mqtt_port: int | None = typer.Option(None, "--mqtt-port", help="Local broker's port for devices beyond loopback "
                                         "(default 8883; 1883 with --insecure-broker)."),
    insecure_http: bool = typer.Option(False, "--insecure-http", help="Plain HTTP beyond loopback (not advised)."),
    insecure_broker: bool = typer.Option(False, "--insecure-broker", help="Plain MQTT beyond loopback; on loopback, "
                                         "an open broker without per-device logins (not advised)."),
    no_sandbox: bool = typer.Option(False, "--no-sandbox",
                                    help="Run operator code (model load checks, endpoint workers) as the hub's user "
                                         "beside its keys: only where nothing else works (docs/security.md)."),
    sandbox_user: str = typer.Option("nobody", "--sandbox-user", envvar="EDGEFLEET_SANDBOX_USER",
                                     help="The account a root hub runs operator code as."),
    sandbox_network: bool = typer.Option(False, "--sandbox-network",
                                         help="Give sandboxed operator code the host's network (default: none)."),
    endpoint_host: str = typer.Option("127.0.0.1", "--endpoint-host", envvar="EDGEFLEET_ENDPOINT_HOST",
                                      help="Address web endpoints listen on (each on its own port: deploy web --port)."),
    endpoint_url_host: str | None = typer.Option(None, "--endpoint-url-host", envvar="EDGEFLEET_ENDPOINT_URL_HOST",
                                                 help="Host name put in endpoint URLs (default: --endpoint-host)."),
    db: str | None = typer.Option(None, "--db", envvar="EDGEFLEET_DB",
                                  help="postgresql://user@host:port/db for hub replicas on one database"
                                       " (password: PGPASSWORD); default: SQLite in DATA/hub.db."),
    blobs: str | None = typer.Option(None, "--blobs", envvar="EDGEFLEET_BLOBS",
                                     help="Blob store every replica shares: a directory (default: DATA/blobs), or"
                                          " s3://BUCKET/PREFIX (endpoint, keys: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID…)."),
    leader_lease: float = typer.Option(5.0, "--leader-lease", envvar="EDGEFLEET_LEADER_LEASE_S", min=0.5,
                                       help="Replicas: seconds the leader's lease lasts unless renewed."),
    client_id: str | None = typer.Option(None, "--mqtt-client-id", envvar="EDGEFLEET_MQTT_CLIENT_ID",
                                         help="MQTT client id (replicas: each its own and the same after a restart;"
                                              " default: from the host name)."),
    adopt_after: float = typer.Option(15.0, "--ingest-adopt-after", envvar="EDGEFLEET_INGEST_ADOPT_S", min=1.0,
                                      help="Replicas: seconds before the leader adopts a dead ingest process's"
                                           " MQTT session."),
) -> None:
    """Run the hub API (and a local broker unless --mqtt is given) until Ctrl-C or SIGTERM.

    The local broker keeps its port across restarts (DATA/broker/address.json) and is restarted if it dies.
    With SQLite (the default) one hub serves a data directory; with --db postgresql://… several replicas share
    the database, DATA (keys) and the blob store (docs/scaling.md).
    """
    import socket

    from edgefleet.hubservice import HubOptions, ServiceError, serve
    from hub.exposure import Refused, ServeOptions, plan
    from hub.leader import DataDirBusy, DataDirLock
    from hub.store import StoreError, is_postgres_url
    from hub.trust.keys import KeySetupError
    from hub.trust.tokens import TokenError
    from modules.sandbox import SandboxUnavailable, detect

    log = logging.getLogger("edgefleet.hub")
    if db is not None and not is_postgres_url(db):
        err.print(f"[red]--db {db!r}:[/] a postgresql:// URL (SQLite is the default: DATA/hub.db)")
        raise typer.Exit(2)
    try:  # before anything starts: keys, an admin token or exposure the hub must not use stop it with one line
        if (tls_cert is None) != (tls_key is None) or (broker_cert is None) != (broker_key is None):
            raise Refused("give --tls-cert with --tls-key, and --broker-cert with --broker-key")
        exposure = plan(ServeOptions(host, mqtt, public_mqtt, isolate, insecure_http, insecure_broker,
                                     tls_cert is not None, mqtt_port), socket.getfqdn())
        if db is None:  # SQLite: one hub per data directory (the hub holds DATA/hub.lock); say so before the broker
            data.mkdir(parents=True, exist_ok=True)
            DataDirLock(data).acquire().release()
        preflight_keys_and_token(data, db)
        # and so does a host that cannot keep operator code away from those keys (the result is cached)
        detect("off" if no_sandbox else "on", sandbox_user, network=sandbox_network)
        for note in exposure.notes:
            log.warning("%s", note)
        api_tls, listener, pinned = _tls_material(data, host, exposure, tls_name, (tls_cert, tls_key),
                                                  (broker_cert, broker_key), tls_ca)
        serve(HubOptions(data=data, host=host, port=port, mqtt=mqtt, public_mqtt=public_mqtt,
                         isolate=exposure.isolate, ingest_workers=ingest_workers, broker_ca=broker_ca,
                         broker_port=broker_port, device_listener=listener,
                         device_mqtt_url=exposure.device_mqtt_url, api_tls=api_tls, tls_ca=pinned,
                         sandbox="off" if no_sandbox else "on", sandbox_user=sandbox_user,
                         sandbox_network=sandbox_network, endpoint_host=endpoint_host,
                         endpoint_url_host=endpoint_url_host, db_url=db, blobs_dir=blobs, leader_lease_s=leader_lease,
                         mqtt_client_id=client_id, ingest_adopt_s=adopt_after))
    except DataDirBusy as exc:
        err.print(f"[red]cannot serve:[/] {escape(str(exc.detail))}", soft_wrap=True)  # one line, however long
        raise typer.Exit(1) from None
    except (KeySetupError, TokenError, Refused, ServiceError, SandboxUnavailable, *StoreError) as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)  # one line, for logs and service managers
        raise typer.Exit(1) from None


Pair = tuple[Path | None, Path | None]


def _tls_material(data: Path, host: str, exposure: Any, names: list[str], api: Pair, broker: Pair,
                  ca: Path | None) -> tuple[tuple[Path, Path] | None, tuple[str, int, tuple[Path, Path] | None] | None,
                                        Path | None]:
    """(the API's certificate and key, the local broker's device listener, the CA devices pin): the operator's
    files where given, else the hub's own (DATA/tls, made on first need)."""
    from urllib.parse import urlsplit

    from hub.trust.tls import ensure_tls, host_names

    own: list[Any] = []

    def hub_pair() -> tuple[Path, Path]:
        if not own:
            extra = [urlsplit(exposure.device_mqtt_url).hostname or ""] if exposure.device_mqtt_url else []
            own.append(ensure_tls(data, host_names(host, [*names, *extra])))
        return own[0].cert, own[0].key

    api_tls = (api[0], api[1]) if api[0] and api[1] else hub_pair() if exposure.https else None
    listener = None
    if exposure.device_listener is not None:
        bind, port, tls = exposure.device_listener
        listener = (bind, port, ((broker[0], broker[1]) if broker[0] and broker[1] else hub_pair()) if tls else None)
    return api_tls, listener, ca or (own[0].ca if own else None)


def preflight_keys_and_token(data: Path, db_url: str | None = None) -> None:
    """The keys and the admin token the hub will use (EDGEFLEET_ADMIN_TOKEN: long enough, never revoked), checked
    before start; on the hub's database (SQLite in DATA, or ``db_url``)."""
    from hub.store import open_database
    from hub.trust.keys import load_or_create_keys, private_dir
    from hub.trust.tokens import ensure_admin_token

    private_dir(data)
    database = open_database(db_url or str(data / "hub.db"))
    try:
        with database.transaction():  # replicas starting together on an empty shared DATA: one creates the keys
            load_or_create_keys(data / "keys")
            ensure_admin_token(database, data, None)
    finally:
        database.close()


@hub_app.command("ingest")
def hub_ingest(
    db: str = typer.Option(..., "--db", envvar="EDGEFLEET_DB",
                           help="The hubs' database: postgresql://… (password: PGPASSWORD), or an SQLite hub.db here."),
    mqtt: str = typer.Option(..., "--mqtt", envvar="EDGEFLEET_MQTT", help="Broker URL (the hubs' own login)."),
    processes: int = typer.Option(1, "--processes", envvar="EDGEFLEET_INGEST_PROCESSES", min=1,
                                  help="Worker processes on this machine."),
    broker_ca: Path | None = typer.Option(None, "--broker-ca", envvar="EDGEFLEET_BROKER_CA", exists=True, dir_okay=False,
                                          help="PEM CA of an mqtts:// broker."),
    client_id: str | None = typer.Option(None, "--mqtt-client-id", envvar="EDGEFLEET_MQTT_CLIENT_ID",
                                         help="Client id prefix, the same after a restart (default: from the host"
                                              " name); two of these commands on one host need their own."),
) -> None:
    """Ingest workers on their own (any machine): join the hubs' shared subscription, write telemetry and data."""
    import socket

    from hub.config import HubConfig
    from hub.ingest.workers import run_standalone
    from hub.store import is_postgres_url

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    data = Path.cwd() if is_postgres_url(db) else Path(db).resolve().parent
    if not is_postgres_url(db) and not Path(db).is_file():
        err.print(f"[red]--db {db!r}:[/] neither a postgresql:// URL nor an existing hub.db")
        raise typer.Exit(2)
    config = HubConfig(data_dir=data, mqtt_url=mqtt, db_url=db, broker_ca=broker_ca,
                       mqtt_client_id=client_id or f"edgefleet-{socket.gethostname()}", ingest_workers=processes)
    run_standalone(config)


# --- agent --------------------------------------------------------------------------------------


@agent_app.command("enroll")
def agent_enroll(
    token: str = typer.Option(..., "--token", help="Enrolment token from `edgefleet device token`."),
    data: Path = typer.Option(..., "--data", help="Agent data directory."),
    hub: str | None = typer.Option(None, "--hub", help="Hub URL (default: the global --hub)."),
    device_id: str | None = typer.Option(None, "--device-id"),
    root_sha256: str | None = typer.Option(None, "--root-sha256", help="Refuse a hub whose root of trust has another "
                                           "sha256 (from `edgefleet keys show` on the hub's side)."),
    root: Path | None = typer.Option(None, "--root", exists=True, dir_okay=False,
                                     help="Refuse a hub whose root of trust is not this root.json."),
    ca_sha256: str | None = typer.Option(None, "--ca-sha256", help="Trust the hub's TLS CA only if its sha256 is this "
                                         "(from `edgefleet keys show`)."),
    ca: Path | None = typer.Option(None, "--ca", exists=True, dir_okay=False, help="Trust this PEM CA for the hub."),
    insecure_http: bool = typer.Option(False, "--insecure-http",
                                       help="Accept plain http:// to another machine (credentials in clear)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Enrol this device: get its id, MQTT credentials and the pinned root of trust."""
    import json

    from agent.identity import Pins, enroll

    try:
        pins = Pins(root_sha256=root_sha256, root=json.loads(root.read_text()) if root else None, ca_sha256=ca_sha256,
                    ca_pem=ca.read_text() if ca else None, insecure_http=insecure_http)
        ident = enroll(hub or CTX.hub, token, data, device_id=device_id, pins=pins)
    except Exception as exc:  # enrol errors are reported, not traced
        err.print(f"[red]enrolment failed:[/] {escape(str(exc))}")
        raise typer.Exit(1) from None
    emit({"device_id": ident.device_id, "data": str(data)}, as_json)


@agent_app.command("run")
def agent_run(
    data: Path = typer.Option(..., "--data", help="Agent data directory (after `agent enroll`)."),
    mqtt: str | None = typer.Option(None, "--mqtt", envvar="EDGEFLEET_MQTT", help="Override the broker URL."),
    rate: float = typer.Option(0.0, "--rate", help="Synthetic inferences/s (0: serve only local requests)."),
    telemetry_interval: float = typer.Option(5.0, "--telemetry-interval"),
    api_port: int = typer.Option(0, "--api-port", help="Local inference API on 127.0.0.1 with per-app tokens from "
                                 "DATA/api-tokens (0: off; apps use the Unix socket)."),
    api_socket: str = typer.Option("", "--api-socket", help="Local API Unix socket (default DATA/run/api.sock, mode "
                                   "0660; 'off': none)."),
    api_group: str | None = typer.Option(None, "--api-group", help="Group owning the API socket (apps in it call it)."),
    module_sandbox: str = typer.Option("auto", "--module-sandbox",
                                       help="auto|on|off: module workers in bubblewrap, away from the credentials."),
    isolation: str = typer.Option("process", "--isolation", help="process (a worker per module) or inprocess."),
    module_memory_mb: int = typer.Option(0, "--module-memory-mb", help="Address-space cap per module worker."),
    module_cpu_seconds: int = typer.Option(0, "--module-cpu-seconds", help="CPU-time cap per module worker."),
    broker_ca: Path | None = typer.Option(None, "--broker-ca", envvar="EDGEFLEET_BROKER_CA",
                                          help="PEM CA to trust for mqtts:// (default: the one pinned at enrolment)."),
    transfer: str = typer.Option("mqtt", "--transfer", envvar="EDGEFLEET_TRANSFER",
                                 help="Bundle download: mqtt (blob topics) or http (HTTP(S) from the hub)."),
    hub_url: str | None = typer.Option(None, "--hub-url", help="Hub URL for --transfer http (default: the enrolled one)."),
    max_defer: str = typer.Option("1h", "--max-defer", help="Longest an application may hold updates (POST /v1/defer "
                                                            "on the local API); 0 refuses holds."),
    min_download_rate: float = typer.Option(1024.0, "--min-download-rate",
                                            help="Abort a download slower than this (bytes/s) over the window (0: never)."),
    download_window: float = typer.Option(60.0, "--download-window", help="Seconds the download rate is judged over."),
    disk_reserve_mb: float = typer.Option(4.0, "--disk-reserve-mb", help="MB kept free beyond what an install needs."),
    retry_after: float = typer.Option(30.0, "--retry-after",
                                      help="Seconds before an install a full disk or slow download stopped is retried."),
) -> None:
    """Run the device daemon until SIGINT/SIGTERM."""
    from agent.daemon import run_agent
    from agent.identity import EnrollmentError
    from agent.limits import DownloadLimits
    from modules.sandbox import SandboxUnavailable

    try:
        run_agent(data, mqtt_url=mqtt, workload_rate=rate, telemetry_interval=telemetry_interval, api_port=api_port,
                  isolation=isolation, module_memory_mb=module_memory_mb, module_cpu_seconds=module_cpu_seconds,
                  broker_ca=broker_ca, transfer=transfer, hub_url=hub_url, module_sandbox=module_sandbox,
                  api_socket=None if api_socket == "off" else api_socket, api_group=api_group,
                  limits=DownloadLimits(min_download_rate, download_window, int(disk_reserve_mb * 2**20), retry_after),
                  max_defer_s=parse_duration(max_defer))
    except (EnrollmentError, ValueError, SandboxUnavailable) as exc:
        err.print(f"[red]cannot start the agent:[/] {escape(str(exc))}")
        raise typer.Exit(2) from None


@agent_app.command("install-offline")
def agent_install_offline(
    package: Path = typer.Argument(..., help="The offline package (edgefleet offline export)."),
    data: Path = typer.Option(..., "--data", help="Agent data directory."),
    timeout: float = typer.Option(900.0, "--timeout", help="Seconds to wait for the agent's answer."),
    mqtt: str | None = typer.Option(None, "--mqtt", help="Broker URL when no agent runs (default: the enrolled one)."),
) -> None:
    """Verify an offline package by the online chain and install it (python -m agent install-offline; exit 0
    installed, 2 usage, 3 refused, 4 install failed, 5 no answer)."""
    from agent.offline_cli import main as install_offline

    raise typer.Exit(install_offline(["--data", str(data), str(package), "--timeout", str(timeout),
                                      *(["--mqtt", mqtt] if mqtt else [])]))


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
    fail_share: float = typer.Option(0.0, "--fail-share", help="Share of devices whose health check fails (by id)."),
    fail_module: list[str] = typer.Option([], "--fail-module", help="Which modules fail there: NAME or NAME:VERSION (default all)."),
    slow_share: float = typer.Option(0.0, "--slow-share", help="Share of devices with a slow health check."),
    slow: float = typer.Option(5.0, "--slow", help="Seconds a slow device's health check takes longer."),
    flaky_share: float = typer.Option(0.0, "--flaky-share", help="Share of devices whose link drops now and then."),
    flaky_period: float = typer.Option(30.0, "--flaky-period", help="About how often each flaky link drops (s)."),
    connect_rate: float = typer.Option(1000.0, "--connect-rate",
                                       help="Devices started per second, jittered (0: all at once)."),
    shift: float = typer.Option(0.0, "--shift", help="Move feature 0 of the generated inputs by this many standard "
                                                     "deviations (a drift scenario)."),
) -> None:
    """Run N simulated devices (real agents, real MQTT connections) against --hub."""
    import asyncio

    from simulator.fleet import run_fleet
    from simulator.scenarios import Scenario

    if not CTX.token:
        err.print("[red]error:[/] --token (or EDGEFLEET_TOKEN) is needed to create enrolment tokens")
        raise typer.Exit(2)
    if logging.getLogger().level > logging.DEBUG:  # a line per device per step is noise at fleet scale (-v shows it)
        logging.getLogger("edgefleet.agent").setLevel(logging.WARNING)
    try:
        asyncio.run(run_fleet(CTX.hub, CTX.token, devices, data, mqtt_url=mqtt, rate=rate,
                              telemetry_interval=telemetry_interval, duration=duration, prefix=prefix,
                              scenario=Scenario(fail_share=fail_share, fail_modules=tuple(fail_module) or ("*",),
                                                slow_share=slow_share, slow_s=slow, flaky_share=flaky_share,
                                                flaky_period_s=flaky_period), connect_rate=connect_rate,
                              shift=shift))
    except KeyboardInterrupt:
        pass


