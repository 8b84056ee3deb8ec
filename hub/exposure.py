"""What ``hub serve`` exposes beyond loopback, and whether over TLS: a pure decision, made before anything starts.

Encrypted by default: when the API listens beyond loopback (``--host 0.0.0.0``, an address, a name)
it is served over HTTPS, and when the local broker is reachable from devices beyond loopback (the
API is, or ``--public-mqtt`` names another host) devices get an MQTTS listener of their own; both
use the operator's certificates or ones the hub makes (``hub/trust/tls.py``). Plain HTTP or MQTT
beyond loopback needs ``--insecure-http`` / ``--insecure-broker``. Loopback only (the demo, tests)
stays plain. The hub's own broker always has per-device logins and ACLs (isolation), on loopback too (any
local process could otherwise read and write every device's topics); only ``--insecure-broker`` on a
loopback-only hub opens it. An external broker's access control is its operator's (``--isolate`` writes the files).
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol.broker_url import BrokerURL, is_loopback_host, parse_broker_url
from protocol.encoding import ProtocolError

WILDCARDS = ("0.0.0.0", "::", "")


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    mqtt: str | None = None  # an external broker; None: the hub starts one
    public_mqtt: str | None = None
    isolate: bool = False
    insecure_http: bool = False
    insecure_broker: bool = False
    tls_cert: bool = False  # the operator gave --tls-cert/--tls-key
    mqtt_port: int | None = None  # the local broker's device listener (default 8883, or 1883 when insecure)


@dataclass(frozen=True)
class Exposure:
    https: bool  # serve the API over TLS
    device_listener: tuple[str, int, bool] | None  # the local broker's listener for devices: (bind, port, tls)
    device_mqtt_url: str | None  # what devices are told at enrolment (None: the broker's own URL)
    isolate: bool
    notes: tuple[str, ...] = ()  # what was decided that the operator did not ask for, to log


class Refused(ValueError):
    """The options would expose something in plain text, or contradict each other; the text says what to do."""


def plan(opts: ServeOptions, hostname: str) -> Exposure:
    """``hostname``: the name devices use when the API binds a wildcard address (this machine's FQDN)."""
    api_public = not is_loopback_host(opts.host)
    https = opts.tls_cert or (api_public and not opts.insecure_http)
    notes: list[str] = []
    public = _parse(opts.public_mqtt, "--public-mqtt") if opts.public_mqtt else None
    if opts.mqtt is not None:  # an external broker: the hub cannot change its listeners, only refuse plain text
        device = public or _parse(opts.mqtt, "--mqtt")
        if not device.tls and not is_loopback_host(device.host) and not opts.insecure_broker:
            raise Refused(f"devices would reach the broker at {device.public()} in plain text: give its mqtts:// URL"
                          " (--public-mqtt, and --broker-ca for a private CA) or pass --insecure-broker")
        return Exposure(https, None, opts.public_mqtt, opts.isolate)
    if not (api_public or (public is not None and not is_loopback_host(public.host))):  # loopback only
        if opts.insecure_broker:
            if opts.isolate:
                raise Refused("--isolate and --insecure-broker contradict each other on loopback: drop one")
            notes.append("--insecure-broker: the hub's broker takes anonymous clients; any local process can read "
                         "and write every device's topics")
            return Exposure(https, None, opts.public_mqtt, False, tuple(notes))
        return Exposure(https, None, opts.public_mqtt, True)
    tls = not opts.insecure_broker
    if public is not None and public.tls and not tls:
        raise Refused(f"--public-mqtt {public.public()} is mqtts:// but --insecure-broker makes the device listener"
                      " plain: drop one of them")
    if public is not None and not public.tls and tls:
        raise Refused(f"--public-mqtt {public.public()} is plain mqtt:// beyond loopback: use mqtts:// (the device"
                      " listener speaks TLS) or pass --insecure-broker")
    port = public.port if public is not None else opts.mqtt_port or (8883 if tls else 1883)
    bind = opts.host if api_public and opts.host not in WILDCARDS else "0.0.0.0"
    advertised = opts.host if api_public and opts.host not in WILDCARDS else hostname
    url = opts.public_mqtt or f"{'mqtts' if tls else 'mqtt'}://{_url_host(advertised)}:{port}"
    if not opts.isolate:
        notes.append("the broker is reachable beyond loopback: per-device logins and ACL are on (--isolate)")
    return Exposure(https, (bind, port, tls), url, True, tuple(notes))


def _parse(url: str, option: str) -> BrokerURL:
    try:
        return parse_broker_url(url)
    except ProtocolError as exc:
        raise Refused(f"{option}: {exc}") from None


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
