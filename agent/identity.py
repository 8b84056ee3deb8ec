"""Device identity: enrol once with a single-use token, then keep credentials and the pinned root on disk."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import ssl
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from protocol.broker_url import BrokerURL, is_loopback_host, parse_broker_url
from protocol.encoding import ProtocolError, canonical_json, sha256_hex
from protocol.signing import Root, load_trusted_root

if TYPE_CHECKING:  # httpx (and the rich/pygments its CLI pulls in) costs ~15 MB: loaded only to enrol
    import httpx

log = logging.getLogger("edgefleet.agent.identity")

IDENTITY_FILE = "identity.json"
INSECURE_HTTP_ENV = "EDGEFLEET_INSECURE_HTTP"
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


def check_hub_url(url: str, insecure: bool | None = None) -> str:
    """``url`` if it is ``http(s)://host[:port][/prefix]``, else ValueError saying so.

    Plain ``http://`` to another machine is refused unless ``insecure`` (default: env ``EDGEFLEET_INSECURE_HTTP=1``):
    the device's password and enrolment token would cross the network in clear.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"hub URL {url!r} is not http(s)://host[:port]")
    if insecure is None:
        insecure = os.environ.get(INSECURE_HTTP_ENV, "") not in ("", "0")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname) and not insecure:
        raise ValueError(f"hub URL {url} is plain http:// to another machine: the device's credentials would cross the"
                         f" network in clear; use https:// (or accept that with --insecure-http, {INSECURE_HTTP_ENV}=1)")
    return url


@dataclass(frozen=True)
class Pins:
    """What a device operator knows about the hub before enrolling (``edgefleet keys show`` prints it), so the
    device does not trust whoever answers: the root of trust (its sha256, or the document) and the TLS CA (its
    sha256, or the PEM). ``insecure_http`` accepts plain http:// to another machine."""

    root_sha256: str | None = None
    root: dict[str, Any] | None = None
    ca_sha256: str | None = None
    ca_pem: str | None = None
    insecure_http: bool = False


def cert_sha256(pem: str) -> str:
    """sha256 of a PEM certificate's DER, hex: what ``edgefleet keys show`` prints as the CA's fingerprint."""
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest()


def pem_certs(text: str) -> list[str]:
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    return [begin + part.split(end)[0] + end + "\n" for part in text.split(begin)[1:] if end in part]


def _hex(value: str) -> str:
    return value.replace(":", "").strip().lower()


def _tls_context(hub_url: str, pins: Pins, timeout: float) -> ssl.SSLContext | bool:
    """How to check the hub's certificate: the pinned CA, or the CA the hub serves once its fingerprint matches the
    one given (nothing secret is sent before that), or the system's store."""
    import httpx

    if urlsplit(hub_url).scheme != "https":
        return True
    pem = pins.ca_pem
    if pem is None and pins.ca_sha256:
        try:  # unverified on purpose: what comes back is checked against the fingerprint before any use
            served = httpx.get(hub_url.rstrip("/") + "/api/v1/ca", verify=False, timeout=timeout).text
        except httpx.HTTPError as exc:
            raise EnrollmentError(f"cannot fetch the hub's CA from {hub_url}: {exc}") from None
        pem = next((c for c in pem_certs(served) if cert_sha256(c) == _hex(pins.ca_sha256)), None)
        if pem is None:
            raise EnrollmentError(f"the hub at {hub_url} serves no CA with sha256 {_hex(pins.ca_sha256)}: not enrolling"
                                  " (a different hub, or someone in between; compare with `edgefleet keys show`)")
    if pem is None:
        return True
    try:
        return ssl.create_default_context(cadata=pem)
    except (ssl.SSLError, ValueError) as exc:
        raise EnrollmentError(f"the CA to pin is not a usable certificate: {exc}") from None


def _check_root(root: Any, pins: Pins) -> None:
    digest = sha256_hex(canonical_json(root))
    if pins.root_sha256 and digest != _hex(pins.root_sha256):
        raise EnrollmentError(f"the hub's root of trust has sha256 {digest}, not the {_hex(pins.root_sha256)} given:"
                              " not enrolling (a different hub, or someone in between; compare with `edgefleet keys"
                              " show`)")
    if pins.root is not None and canonical_json(pins.root) != canonical_json(root):
        raise EnrollmentError(f"the hub's root of trust (sha256 {digest}) is not the root file given: not enrolling")


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
    pins: Pins | None = None,
) -> Identity:
    """Trade an enrolment token for credentials and the root of trust; writes ``data_dir/identity.json``.

    With ``pins`` the device refuses a hub whose root of trust or TLS CA is not the one given."""
    import httpx

    pins = pins or Pins()
    try:
        check_hub_url(hub_url, pins.insecure_http or None)
    except ValueError as exc:
        raise EnrollmentError(str(exc)) from None
    verify = _tls_context(hub_url, pins, timeout)
    body: dict[str, Any] = {"token": token, "facts": facts or {}}
    if device_id:
        body["device_id"] = device_id
    url = hub_url.rstrip("/") + "/api/v1/enroll"
    try:
        if client is not None:
            resp = client.post(url, json=body, timeout=timeout)
        else:
            resp = httpx.post(url, json=body, timeout=timeout, verify=verify)
    except httpx.HTTPError as exc:
        hint = (" (the hub's certificate is not trusted: pass --ca-sha256 from `edgefleet keys show`, or --ca FILE)"
                if "CERTIFICATE_VERIFY_FAILED" in str(exc) else "")
        raise EnrollmentError(f"cannot reach the hub at {hub_url}: {exc}{hint}") from None
    pinned_ca = verify.get_ca_certs(binary_form=True) if isinstance(verify, ssl.SSLContext) else []
    return _accept_enrolment(resp, data_dir, hub_url, pins,
                             "".join(ssl.DER_cert_to_PEM_cert(der) for der in pinned_ca) or None)


def _accept_enrolment(resp: httpx.Response, data_dir: Path, hub_url: str, pins: Pins | None = None,
                      pinned_ca: str | None = None) -> Identity:
    if resp.status_code != 200:
        try:
            detail = resp.json().get("detail", resp.text)
        except ValueError:
            detail = resp.text
        hint = " (token unknown, used or expired: ask for a new one)" if resp.status_code == 403 else ""
        raise EnrollmentError(f"enrolment refused: HTTP {resp.status_code}: {detail}{hint}")
    try:
        data = resp.json()
        _check_root(data["root"], pins or Pins())
        identity = Identity(
            device_id=data["device_id"], mqtt_url=data["mqtt_url"], mqtt_username=data.get("mqtt_username"),
            mqtt_password=data.get("mqtt_password"), root=data["root"],
            broker_ca=_join_pems(data.get("broker_ca"), pinned_ca), hub_url=hub_url.rstrip("/"),
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


def _join_pems(*bundles: str | None) -> str | None:
    """One PEM bundle of every distinct certificate (the hub's answer and the CA pinned to reach it)."""
    certs = [c for b in bundles if b for c in pem_certs(b)]
    return "".join(dict.fromkeys(certs)) or None


async def enroll_async(
    client: httpx.AsyncClient, hub_url: str, token: str, data_dir: Path, device_id: str | None = None,
    facts: dict[str, str] | None = None,
) -> Identity:
    """``enroll`` for callers on an event loop (the simulator enrols many devices at once)."""
    import httpx

    try:
        check_hub_url(hub_url)
    except ValueError as exc:
        raise EnrollmentError(str(exc)) from None
    body: dict[str, Any] = {"token": token, "facts": facts or {}}
    if device_id:
        body["device_id"] = device_id
    try:
        resp = await client.post(hub_url.rstrip("/") + "/api/v1/enroll", json=body)
    except httpx.HTTPError as exc:
        raise EnrollmentError(f"cannot reach the hub at {hub_url}: {exc}") from None
    return _accept_enrolment(resp, data_dir, hub_url)
