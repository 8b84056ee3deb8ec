"""Broker addresses: ``mqtt://[user[:password]@]host[:port]`` or ``mqtts://…`` for TLS."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace
from urllib.parse import unquote, urlsplit

from protocol.encoding import ProtocolError


@dataclass(frozen=True)
class BrokerURL:
    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None
    ca_pem: str | None = field(default=None, repr=False)  # mqtts: trust this CA (PEM) instead of the system store

    def with_credentials(self, username: str | None, password: str | None) -> BrokerURL:
        return replace(self, username=username, password=password)

    def with_ca(self, ca_pem: str | None) -> BrokerURL:
        return replace(self, ca_pem=ca_pem)

    def public(self) -> str:
        """The URL without credentials, safe to log or hand out."""
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerURL:
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ProtocolError(f"broker URL {url!r}: scheme must be mqtt:// or mqtts://")
    if not parts.hostname:
        raise ProtocolError(f"broker URL {url!r} has no host")
    tls = parts.scheme == "mqtts"
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError:
        raise ProtocolError(f"broker URL {url!r} has an invalid port") from None
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    return BrokerURL(parts.hostname, port, tls, user, password)


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` names this machine only: ``localhost`` or a loopback address (names are not resolved:
    any other name may reach beyond the machine)."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
