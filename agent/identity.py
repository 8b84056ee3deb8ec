"""Device identity: enrol once with a single-use token, then keep credentials and the pinned root on disk."""

from __future__ import annotations

import json
import logging
import os
import ssl
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from protocol.broker_url import BrokerURL, parse_broker_url
from protocol.encoding import ProtocolError
from protocol.signing import Root, load_trusted_root

if TYPE_CHECKING:  # httpx (and the rich/pygments its CLI pulls in) costs ~15 MB: loaded only to enrol
    import httpx

log = logging.getLogger("edgefleet.agent.identity")

IDENTITY_FILE = "identity.json"
MAX_CLOCK_SKEW = 60.0


class EnrollmentError(RuntimeError):
    """Enrolment failed; the text says why and what to do."""


@dataclass(frozen=True)
class Identity:
    device_id: str
    mqtt_url: str
    mqtt_username: str | None
    mqtt_password: str | None
    root: dict[str, Any] = field(repr=False)  # the root envelope pinned at enrolment
    broker_ca: str | None = field(default=None, repr=False)  # PEM of the broker's CA, pinned at enrolment (mqtts)
    hub_url: str | None = None  # the hub enrolled with, for --transfer http (None in identities from older agents)

    def broker(self, override_url: str | None = None) -> BrokerURL:
        """The broker to use: ``override_url`` (e.g. --mqtt) or the enrolled one, with this device's credentials."""
        url = parse_broker_url(override_url or self.mqtt_url)
        return url.with_credentials(self.mqtt_username or url.username,
                                    self.mqtt_password or url.password).with_ca(self.broker_ca)

    def trusted_root(self) -> Root:
        return load_trusted_root(self.root)


def check_hub_url(url: str) -> str:
    """``url`` if it is ``http(s)://host[:port][/prefix]``, else ValueError saying so."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"hub URL {url!r} is not http(s)://host[:port]")
    return url


def check_ca_pem(pem: str) -> None:
    """Raise ``ssl.SSLError`` unless ``pem`` holds at least one certificate OpenSSL accepts."""
    ssl.create_default_context(cadata=pem)


def read_ca_file(path: Path | str) -> str:
    """A CA bundle (PEM) from disk, checked; ``EnrollmentError`` naming the file otherwise."""
    try:
        pem = Path(path).read_text()
        check_ca_pem(pem)
    except (OSError, ValueError, ssl.SSLError) as exc:
        raise EnrollmentError(f"broker CA file {path}: {exc}") from None
    return pem


def write_private_json(path: Path, obj: Any) -> None:
    """Write JSON readable only by the owner (it holds credentials), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def save_identity(data_dir: Path, identity: Identity) -> Path:
    path = Path(data_dir) / IDENTITY_FILE
    write_private_json(path, asdict(identity))
    return path


def load_identity(data_dir: Path) -> Identity:
    path = Path(data_dir) / IDENTITY_FILE
    try:
        raw = json.loads(path.read_text())
        identity = Identity(
            device_id=raw["device_id"], mqtt_url=raw["mqtt_url"], mqtt_username=raw.get("mqtt_username"),
            mqtt_password=raw.get("mqtt_password"), root=raw["root"], broker_ca=raw.get("broker_ca"),
            hub_url=raw.get("hub_url"),
        )
    except FileNotFoundError:
        raise EnrollmentError(f"{path} does not exist: enrol first (edgefleet agent enroll --hub URL --token T)") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise EnrollmentError(f"{path} is not a valid identity file: {exc!r}") from None
    return identity


def enroll(
    hub_url: str,
    token: str,
    data_dir: Path,
    device_id: str | None = None,
    facts: dict[str, str] | None = None,
    timeout: float = 30.0,
    client: httpx.Client | None = None,
) -> Identity:
    """Trade an enrolment token for credentials and the root of trust; writes ``data_dir/identity.json``."""
    import httpx

    body: dict[str, Any] = {"token": token, "facts": facts or {}}
    if device_id:
        body["device_id"] = device_id
    url = hub_url.rstrip("/") + "/api/v1/enroll"
    try:
        if client is not None:
            resp = client.post(url, json=body, timeout=timeout)
        else:
            resp = httpx.post(url, json=body, timeout=timeout)
    except httpx.HTTPError as exc:
        raise EnrollmentError(f"cannot reach the hub at {hub_url}: {exc}") from None
    return _accept_enrolment(resp, data_dir, hub_url)


def _accept_enrolment(resp: httpx.Response, data_dir: Path, hub_url: str) -> Identity:
    if resp.status_code != 200:
        try:
            detail = resp.json().get("detail", resp.text)
        except ValueError:
            detail = resp.text
        hint = " (token unknown, used or expired: ask for a new one)" if resp.status_code == 403 else ""
        raise EnrollmentError(f"enrolment refused: HTTP {resp.status_code}: {detail}{hint}")
    try:
        data = resp.json()
        identity = Identity(
            device_id=data["device_id"], mqtt_url=data["mqtt_url"], mqtt_username=data.get("mqtt_username"),
            mqtt_password=data.get("mqtt_password"), root=data["root"], broker_ca=data.get("broker_ca"),
            hub_url=hub_url.rstrip("/"),
        )
        identity.trusted_root()  # refuse to pin a root that does not verify
        parse_broker_url(identity.mqtt_url)
        if identity.broker_ca is not None:
            check_ca_pem(identity.broker_ca)
    except (ValueError, KeyError, TypeError, ProtocolError, ssl.SSLError) as exc:
        raise EnrollmentError(f"hub sent an invalid enrolment answer: {exc}") from None
    hub_time = data.get("hub_time")
    if isinstance(hub_time, int | float) and abs(hub_time - time.time()) > MAX_CLOCK_SKEW:
        # Expiry checks on signed documents depend on the clock: say so now rather than later.
        log.warning("device clock differs from the hub's by %.0fs: signed documents may look expired", hub_time - time.time())
    save_identity(Path(data_dir), identity)
    log.info("enrolled as %s (broker %s)", identity.device_id, identity.broker().public())
    return identity


async def enroll_async(
    client: httpx.AsyncClient, hub_url: str, token: str, data_dir: Path, device_id: str | None = None,
    facts: dict[str, str] | None = None,
) -> Identity:
    """``enroll`` for callers on an event loop (the simulator enrols many devices at once)."""
    import httpx

    body: dict[str, Any] = {"token": token, "facts": facts or {}}
    if device_id:
        body["device_id"] = device_id
    try:
        resp = await client.post(hub_url.rstrip("/") + "/api/v1/enroll", json=body)
    except httpx.HTTPError as exc:
        raise EnrollmentError(f"cannot reach the hub at {hub_url}: {exc}") from None
    return _accept_enrolment(resp, data_dir, hub_url)
