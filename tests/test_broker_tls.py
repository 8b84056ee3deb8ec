"""MQTT over TLS with a private CA: mosquitto with a TLS listener, the hub trusting the CA and pinning it on
devices at enrolment, a real agent process connecting with it, and one with the wrong CA refused (not crashed).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import queue
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.identity import enroll, load_identity
from edgefleet.broker import LocalBroker
from hub.config import HubConfig
from hub.server import HubServer
from tests.pg import hub_db

ROOT = Path(__file__).resolve().parents[1]


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(directory: Path, cn: str) -> tuple[Path, x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    path = directory / f"{cn}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, cert, key


def make_server_cert(directory: Path, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name("broker")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = directory / "broker.crt", directory / "broker.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture
def tls_setup(tmp_path):
    ca_path, ca, ca_key = make_ca(tmp_path, "edgefleet-test-ca")
    rogue_path, _, _ = make_ca(tmp_path, "someone-else-ca")
    broker = LocalBroker(kind="mosquitto", tls=make_server_cert(tmp_path, ca, ca_key)).start()
    server = HubServer(HubConfig(tmp_path / "hub", broker.url, admin_token=secrets.token_urlsafe(32),
                                 mqtt_client_id=f"hub-{secrets.token_hex(4)}", broker_ca=ca_path,
                                 **hub_db(tmp_path / "hub"))).start()
    try:
        assert server.wait_mqtt(15), "the hub did not connect to the TLS broker"
        yield broker, server, ca_path, rogue_path
    finally:
        server.stop()
        broker.stop()


def agent_process(data: Path, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "agent", "--data", str(data), "--api-port", "0", *extra],
                            cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)


class LogWatch:
    """Follows a process's stderr on a thread, so a test can wait for a log line (the event) with a timeout."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, args=(proc,), daemon=True).start()

    def _pump(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            self.lines.put(line)

    def until(self, needle: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            self.seen.append(line)
            if needle in line:
                return line
        raise AssertionError(f"{needle!r} not in the agent log after {timeout}s:\n{''.join(self.seen[-30:])}")


def test_agent_pins_the_broker_ca_at_enrolment_and_a_wrong_ca_is_refused_without_crashing(tls_setup, tmp_path):
    broker, server, ca_path, rogue_path = tls_setup
    admin = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.admin_token}"})
    tokens = admin.post("/api/v1/enrollment-tokens", json={"count": 2}).json()["tokens"]

    ident = enroll(server.url, tokens[0], tmp_path / "good", device_id="tls-good")
    assert ident.broker().tls and ident.broker().ca_pem == ca_path.read_text()
    assert load_identity(tmp_path / "good").broker_ca == ca_path.read_text()  # pinned on disk
    enroll(server.url, tokens[1], tmp_path / "bad", device_id="tls-bad")

    good = agent_process(tmp_path / "good")
    bad = agent_process(tmp_path / "bad", "--broker-ca", str(rogue_path))
    try:
        LogWatch(good).until("connected to mqtts://")  # the agent's own log says it is connected
        deadline = time.monotonic() + 30
        while not admin.get("/api/v1/devices/tls-good").json().get("online"):
            assert time.monotonic() < deadline, "the hub never saw tls-good online"
            time.sleep(0.2)  # polling another process's HTTP API: there is no event to await

        line = LogWatch(bad).until("CERTIFICATE_VERIFY_FAILED")
        assert "WARNING" in line and "retry in" in line  # said loudly, and it keeps trying
        assert bad.poll() is None, "a certificate failure must not end the daemon"
        assert admin.get("/api/v1/devices/tls-bad").json()["online"] is False
    finally:
        for p in (good, bad):
            p.terminate()
            p.wait(15)


def test_a_hub_configured_with_an_unreadable_ca_fails_at_start_with_the_reason(tmp_path):
    bad = tmp_path / "not-a-ca.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    with pytest.raises(Exception) as info:
        HubConfig(tmp_path / "hub", "mqtts://127.0.0.1:8883", broker_ca=bad)
    assert "PEM" in str(info.value) or "certificate" in str(info.value).lower() or "SSL" in str(info.value)
