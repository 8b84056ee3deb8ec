"""``edgefleet hub serve`` as a service: a local broker at a stable address, kept alive, and nothing left behind.

- The local broker's port is chosen once per data directory and recorded in ``DATA/broker/address.json``:
  devices were handed that address at enrolment, so every restart reuses it. If another process holds
  it, the hub refuses to start with one line saying so (rather than moving the fleet's broker, which
  would strand every device on the old address).
- The broker is supervised (restarted on the same port with the same configuration if it dies), and its
  live pid is kept in ``DATA/broker/broker.pid``, where the hub reads it for every reload signal.
- SIGTERM (``kill``, ``timeout``, ``docker stop``, systemd) ends the process through the same clean path as
  Ctrl-C, so the broker and the endpoints' processes stop with it; after a SIGKILL the kernel kills the
  broker (``PR_SET_PDEATHSIG``, edgefleet/broker.py) and the endpoint gateways see their stdin close.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from edgefleet.broker import BrokerPortInUse, LocalBroker, free_port

log = logging.getLogger("edgefleet.hub")

BROKER_DIR, ADDRESS_FILE, PID_FILE = "broker", "address.json", "broker.pid"
PORT_WAIT_S = 10.0  # a broker of a hub killed a moment ago: the kernel is still taking it down


class ServiceError(Exception):
    """Why the hub cannot start, in one line for logs and service managers."""


@contextmanager
def sigterm_exits() -> Iterator[None]:
    """SIGTERM raises SystemExit(0) in the main thread, so every ``finally`` runs: a requested stop, as Ctrl-C.

    uvicorn shuts down gracefully on SIGTERM and then raises the signal again; with the default
    action the process died right there, before the code that stops the broker.
    """

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def broker_port(data: Path, requested: int | None = None, host: str = "127.0.0.1") -> int:
    """The local broker's port for this data directory: ``requested``, else the recorded one, else a free one.

    The choice is recorded, so the next start uses the same port; changing it by hand is said loudly,
    because devices enrolled before keep the address they were given.
    """
    directory = data / BROKER_DIR
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / ADDRESS_FILE
    recorded: int | None = None
    if path.exists():
        try:
            recorded = int(json.loads(path.read_text())["port"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ServiceError(f"{path} is damaged ({exc}): it records the broker port devices use; fix or "
                               "remove it") from None
    if requested and recorded and requested != recorded:
        log.warning("--broker-port %d replaces port %d recorded in %s: devices enrolled before still dial %d",
                    requested, recorded, path, recorded)
    port = requested or recorded or free_port(host)
    if port != recorded:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"host": host, "port": port}) + "\n")
        os.replace(tmp, path)
    return port


@dataclass
class HubOptions:
    data: Path
    host: str = "127.0.0.1"
    port: int = 8080
    mqtt: str | None = None
    public_mqtt: str | None = None
    isolate: bool = False
    ingest_workers: int = 0
    broker_ca: Path | None = None
    broker_port: int | None = None
    device_listener: tuple[str, int, tuple[Path, Path] | None] | None = None  # beyond loopback (hub/exposure.py)
    device_mqtt_url: str | None = None  # the URL devices are given for that listener
    api_tls: tuple[Path, Path] | None = None  # the API's certificate and key: HTTPS
    tls_ca: Path | None = None  # the CA devices pin at enrolment
    sandbox: str = "on"  # operator code away from the hub's keys (modules/sandbox.py): on, auto or off
    sandbox_user: str = "nobody"
    sandbox_network: bool = False
    endpoint_host: str = "127.0.0.1"  # where web endpoints listen
    endpoint_url_host: str | None = None  # the host name in their URLs
    db_url: str | None = None  # postgresql://…: hub replicas on one database; None: SQLite in DATA (one hub)
    blobs_dir: Path | str | None = None  # a directory or s3://bucket/prefix
    leader_lease_s: float = 5.0
    mqtt_client_id: str | None = None  # None: from the host name (hub/config.py)
    ingest_adopt_s: float = 15.0


def start_broker(opts: HubOptions) -> tuple[LocalBroker, str, str | None]:
    """The hub's own supervised broker: (broker, the hub's MQTT URL, the URL handed to devices or None)."""
    port = broker_port(opts.data, opts.broker_port)
    pid_file = opts.data / BROKER_DIR / PID_FILE
    if opts.isolate:  # mosquitto, reading the files the hub keeps current (SIGHUP on change)
        from hub.fleet.broker_auth import BrokerAuth

        if os.environ.get("EDGEFLEET_BROKER", "mosquitto") != "mosquitto":
            raise ServiceError("the embedded iotcore broker has no per-device logins: install mosquitto, or pass "
                               "--insecure-broker for an open broker on loopback")

        auth = BrokerAuth(opts.data / BROKER_DIR, workers=opts.ingest_workers)
        if not auth.password_file.exists():
            auth.write([])
        broker = LocalBroker(host="127.0.0.1", port=port, kind="mosquitto", password_file=auth.password_file,
                             acl_file=auth.acl_file, pid_file=pid_file, device_listener=opts.device_listener)
    else:
        broker = LocalBroker(host="127.0.0.1", port=port, pid_file=pid_file)
    try:
        broker.start(port_wait=PORT_WAIT_S)
    except BrokerPortInUse:
        raise ServiceError(
            f"the broker port {port} recorded in {opts.data / BROKER_DIR / ADDRESS_FILE} is in use by another "
            "process (devices were given this address at enrolment): stop that process, or run with "
            "--broker-port N (devices must then be re-enrolled or given --mqtt)") from None
    broker.supervise()
    if opts.isolate:
        return broker, auth.hub_url(broker.url), opts.public_mqtt or opts.device_mqtt_url or broker.url
    return broker, broker.url, opts.public_mqtt


def serve(opts: HubOptions) -> None:
    """Run the hub (and its broker unless ``opts.mqtt``) until Ctrl-C or SIGTERM; stop everything it started."""
    from hub.config import HubConfig
    from hub.server import serve_forever

    broker: LocalBroker | None = None
    with sigterm_exits():
        try:
            mqtt, public_mqtt = opts.mqtt, opts.public_mqtt
            if mqtt is None:
                broker, mqtt, public_mqtt = start_broker(opts)
            elif opts.isolate:
                from hub.fleet.broker_auth import BrokerAuth

                auth = BrokerAuth(opts.data / BROKER_DIR, workers=opts.ingest_workers)
                log.warning("--isolate with an external broker: point it at %s and %s and reload it after each "
                            "change", auth.password_file, auth.acl_file)
            log.info("hub API at %s://%s:%s (docs /docs, metrics /metrics); MQTT broker for devices %s",
                     "https" if opts.api_tls else "http", opts.host, opts.port,
                     public_mqtt or mqtt.split("@")[-1])
            serve_forever(HubConfig(
                data_dir=opts.data, mqtt_url=mqtt, public_mqtt_url=public_mqtt, isolate=opts.isolate,
                broker_pid_file=broker.pid_file if broker is not None and opts.isolate else None,
                ingest_workers=opts.ingest_workers, broker_ca=opts.broker_ca, tls_ca=opts.tls_ca,
                sandbox=opts.sandbox, sandbox_user=opts.sandbox_user, sandbox_network=opts.sandbox_network,
                endpoint_host=opts.endpoint_host, endpoint_url_host=opts.endpoint_url_host,
                db_url=opts.db_url, blobs_dir=opts.blobs_dir, leader_lease_s=opts.leader_lease_s,
                ingest_adopt_s=opts.ingest_adopt_s, **({"mqtt_client_id": opts.mqtt_client_id}
                                                       if opts.mqtt_client_id else {})),
                host=opts.host, port=opts.port, tls=opts.api_tls)
        finally:
            if broker is not None:
                broker.stop()
