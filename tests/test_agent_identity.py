"""Enrolment against the hub's HTTP contract (served by httpx.MockTransport here)."""

from __future__ import annotations

import json
import stat
import time

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.identity import EnrollmentError, enroll, load_identity
from protocol.signing import make_root


def _root() -> dict:
    k = Ed25519PrivateKey.generate()
    return make_root({"root": [k], "release": [k], "director": [k]}, [k])


def test_enroll_writes_a_private_identity_file(tmp_path):
    root = _root()
    seen = {}

    def handle(request: httpx.Request) -> httpx.Response:
        seen.update(json.loads(request.content))
        assert request.url.path == "/api/v1/enroll" and "authorization" not in request.headers
        return httpx.Response(200, json={"device_id": "cam-7", "mqtt_url": "mqtt://broker.example:1883",
                                         "mqtt_username": "cam-7", "mqtt_password": "s3cret", "root": root,
                                         "hub_time": time.time()})

    with httpx.Client(transport=httpx.MockTransport(handle)) as client:
        ident = enroll("https://hub.test/", "tok", tmp_path, device_id="cam-7", facts={"site": "a"}, client=client)
    assert seen == {"token": "tok", "device_id": "cam-7", "facts": {"site": "a"}}
    path = tmp_path / "identity.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = load_identity(tmp_path)
    assert loaded == ident and loaded.broker().username == "cam-7" and loaded.broker().password == "s3cret"
    assert loaded.broker("mqtt://127.0.0.1:1999").port == 1999  # --mqtt overrides the address, keeps credentials
    assert loaded.trusted_root().version == 1


def test_enroll_refused_and_unreachable_say_why(tmp_path):
    def refuse(request: httpx.Request) -> httpx.Response:
        return httpx.Response(403, json={"detail": "enrolment token already used"})

    with httpx.Client(transport=httpx.MockTransport(refuse)) as client, pytest.raises(
            EnrollmentError, match="HTTP 403: enrolment token already used"):
        enroll("https://hub.test", "tok", tmp_path, client=client)
    with pytest.raises(EnrollmentError, match="cannot reach the hub"):
        enroll("http://127.0.0.1:9", "tok", tmp_path, timeout=2)
    with pytest.raises(EnrollmentError, match="enrol first"):
        load_identity(tmp_path)
