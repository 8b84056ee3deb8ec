"""The hub's own TLS: a private CA and a server certificate in ``DATA/tls``, made when the hub or its broker is
reachable beyond loopback and the operator gave no certificate of their own (docs/security.md).

The CA (``ca.pem``, key ``ca.key``) is made once and kept: devices pin it at enrolment (the enrolment
answer carries it) and operators check its fingerprint (``edgefleet keys show``) with ``agent enroll
--ca-sha256``. The server certificate (``server.pem``, ``server.key``) is issued again whenever it
would not cover the names devices use, is within 30 days of expiry, or was not signed by this CA.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import logging
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hub.trust.keys import private_dir, write_secret

log = logging.getLogger("edgefleet.hub.tls")

TLS_DIR = "tls"
CA_DAYS = 3650
SERVER_DAYS = 397  # what browsers accept; renewed 30 days before
RENEW_BEFORE = dt.timedelta(days=30)


@dataclass(frozen=True)
class TlsFiles:
    ca: Path  # PEM of the CA devices pin
    cert: Path  # the server certificate (PEM)
    key: Path  # its private key (PEM, 0600)


def fingerprint(pem: str | bytes) -> str:
    """sha256 of the first certificate's DER, hex (``openssl x509 -fingerprint -sha256``, without colons)."""
    cert = x509.load_pem_x509_certificate(pem.encode() if isinstance(pem, str) else pem)
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def split_pem(text: str) -> list[str]:
    """Each certificate of a PEM bundle, as its own PEM text."""
    out: list[str] = []
    lines: list[str] = []
    for line in text.splitlines():
        if line.strip() == "-----BEGIN CERTIFICATE-----":
            lines = [line.strip()]
        elif lines:
            lines.append(line.strip())
            if line.strip() == "-----END CERTIFICATE-----":
                out.append("\n".join(lines) + "\n")
                lines = []
    return out


def host_names(host: str, extra: list[str] = ()) -> list[str]:
    """The names and addresses a device may use for this machine: loopback, its host names and their addresses,
    the address it binds (unless a wildcard), and ``extra`` (the hosts of public URLs)."""
    names = ["localhost", "127.0.0.1", "::1", socket.gethostname(), socket.getfqdn(), *extra]
    if host not in ("0.0.0.0", "::", ""):
        names.append(host)
    for name in (socket.gethostname(), socket.getfqdn()):
        try:
            names += [info[4][0] for info in socket.getaddrinfo(name, None)]
        except OSError:
            pass
    return list(dict.fromkeys(n.split("%")[0] for n in names if n))


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for n in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            entries.append(x509.DNSName(n))
    return x509.SubjectAlternativeName(entries)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    write_secret(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()).decode())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = directory / "ca.pem", directory / "ca.key"
    if cert_path.exists() and key_path.exists():
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return x509.load_pem_x509_certificate(cert_path.read_bytes()), key
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = _name(f"edgefleet hub CA {socket.gethostname()}")
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    _write_key(key_path, key)
    write_secret(cert_path, cert.public_bytes(serialization.Encoding.PEM).decode())
    log.info("made the hub's TLS CA in %s (sha256 %s)", cert_path, fingerprint(cert_path.read_text()))
    return cert, key


def _covers(cert_path: Path, ca: x509.Certificate, names: list[str]) -> bool:
    if not cert_path.exists():
        return False
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    if cert.issuer != ca.subject or cert.not_valid_after_utc - RENEW_BEFORE < dt.datetime.now(dt.UTC):
        return False
    try:
        cert.verify_directly_issued_by(ca)
        have = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, TypeError, x509.InvalidSignature, x509.ExtensionNotFound):
        return False
    return set(_san(names)) <= set(have)


def ensure_tls(data_dir: Path, names: list[str]) -> TlsFiles:
    """The hub's CA and a server certificate for ``names`` in ``data_dir/tls`` (made or renewed as needed)."""
    directory = private_dir(Path(data_dir) / TLS_DIR)
    ca, ca_key = _ca(directory)
    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    if _covers(files.cert, ca, names):
        return files
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(names[0] if names else "edgefleet hub")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
            .add_extension(_san(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write_key(files.key, key)
    write_secret(files.cert, cert.public_bytes(serialization.Encoding.PEM).decode())
    log.info("issued the hub's TLS server certificate for %s", ", ".join(names))
    return files
