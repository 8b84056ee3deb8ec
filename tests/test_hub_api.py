"""Hub HTTP API against a real uvicorn server, real SQLite and the real broker: auth, registry, modules."""

from __future__ import annotations

import os
import secrets
import socket
import threading
from pathlib import Path

import httpx
import pytest

from hub import HubConfig, HubServer
from modules.bundle import read_blocks
from modules.examples import write_logreg_onnx
from protocol.encoding import sha256_hex
from protocol.signing import load_trusted_root
from protocol.verify import accept_manifest
from tests.pg import hub_db

pytestmark = pytest.mark.hubstore  # run again on PostgreSQL by scripts/test.sh


def client_id() -> str:
    return f"hub-{secrets.token_hex(4)}"


@pytest.fixture
def onnx_file(tmp_path) -> Path:
    return write_logreg_onnx(tmp_path / "model.onnx")


def register(client: httpx.Client, name: str, path: Path, **form) -> httpx.Response:
    return client.post("/api/v1/models", data={"name": name, **form},
                       files=[("files", (path.name, path.read_bytes(), "application/octet-stream"))])


def blob_files(data_dir: Path) -> set[Path]:
    return {p for p in (data_dir / "blobs").rglob("*") if p.is_file()}


# --- auth ---------------------------------------------------------------------------------------


def test_missing_or_wrong_token_is_401_with_bearer_challenge(server):
    for headers in ({}, {"Authorization": "Bearer not-a-token"}, {"Authorization": "Basic abc"}):
        r = httpx.get(server.url + "/api/v1/devices", headers=headers)
        assert r.status_code == 401, headers
        assert r.headers["www-authenticate"] == "Bearer"


def test_roles_viewer_cannot_write_operator_cannot_mint_tokens(admin, server, onnx_file):
    viewer = admin.post("/api/v1/tokens", json={"name": "v", "role": "viewer"}).json()["token"]
    operator = admin.post("/api/v1/tokens", json={"name": "o", "role": "operator"}).json()["token"]
    as_viewer = {"Authorization": f"Bearer {viewer}"}
    assert httpx.get(server.url + "/api/v1/models", headers=as_viewer).status_code == 200
    r = httpx.post(server.url + "/api/v1/models", headers=as_viewer, data={"name": "m"},
                   files=[("files", ("model.onnx", onnx_file.read_bytes()))])
    assert r.status_code == 403
    r = httpx.post(server.url + "/api/v1/tokens", headers={"Authorization": f"Bearer {operator}"},
                   json={"name": "x", "role": "admin"})
    assert r.status_code == 403
    r = httpx.post(server.url + "/api/v1/models", headers={"Authorization": f"Bearer {operator}"},
                   data={"name": "m"}, files=[("files", ("model.onnx", onnx_file.read_bytes()))])
    assert r.status_code == 200


def test_generated_admin_token_is_written_0600(server, tmp_data):
    token_file = tmp_data / "admin-token"
    assert token_file.read_text().strip() == server.admin_token
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in (tmp_data / "keys").glob("*.key"))


def test_admin_token_from_env_is_honoured(broker, tmp_data, monkeypatch):
    monkeypatch.setenv("EDGEFLEET_ADMIN_TOKEN", "env-admin-token-0123456789abcdefghij")
    with HubServer(HubConfig(tmp_data, broker.url, mqtt_client_id=client_id(), **hub_db(tmp_data))) as s:
        assert s.admin_token == "env-admin-token-0123456789abcdefghij"
        r = httpx.post(s.url + "/api/v1/tokens", headers={"Authorization": "Bearer env-admin-token-0123456789abcdefghij"},
                       json={"name": "ci", "role": "viewer"})
        assert r.status_code == 200 and r.json()["role"] == "viewer"


def test_restart_keeps_keys_and_token_and_frees_port(broker, tmp_data, monkeypatch):
    monkeypatch.delenv("EDGEFLEET_ADMIN_TOKEN", raising=False)
    config = HubConfig(tmp_data, broker.url, mqtt_client_id=client_id(), **hub_db(tmp_data))
    with HubServer(config) as first:
        headers = {"Authorization": f"Bearer {first.admin_token}"}
        root = httpx.get(first.url + "/api/v1/root", headers=headers).json()
        port = first.port
    with pytest.raises(OSError):  # stop() left nothing listening
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    with HubServer(config) as second:
        assert httpx.get(second.url + "/api/v1/root", headers=headers).json() == root
        assert "/api/v1/models" in httpx.get(second.url + "/openapi.json").json()["paths"]
        assert httpx.get(second.url + "/docs").status_code == 200
        assert second.wait_mqtt(10)
        health = httpx.get(second.url + "/healthz").json()
        assert (health["status"], health["mqtt_connected"], health["leader"]) == ("ok", True, True)


# --- registry -----------------------------------------------------------------------------------


def test_register_three_times_gives_versions_1_2_3(admin, onnx_file):
    versions = [register(admin, "logreg", onnx_file, tag=["stage=dev"]).json()["version"] for _ in range(3)]
    assert versions == [1, 2, 3]
    listed = admin.get("/api/v1/models", params={"name": "logreg"}).json()
    assert [m["version"] for m in listed] == [3, 2, 1]  # newest first
    model = admin.get("/api/v1/models/logreg/versions/2").json()
    assert model["framework"] == "onnx" and model["tags"] == {"stage": "dev"}
    assert model["inputs"] == [{"name": "x", "dtype": "float32", "shape": [None, 4]}]
    assert admin.get("/api/v1/models", params={"tag": "stage=prod"}).json() == []
    got = admin.get("/api/v1/models/logreg/versions/2/files/model.onnx")
    assert got.status_code == 200 and got.content == onnx_file.read_bytes()


def test_concurrent_registrations_get_distinct_versions(admin, onnx_file):
    results: list[int] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            r = register(admin, "concurrent", onnx_file, tags='{"team": "a"}')
            r.raise_for_status()
            results.append(r.json()["version"])
        except BaseException as exc:  # surfaced below: a thread's assertion would be lost otherwise
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert sorted(results) == [1, 2, 3]


def test_corrupt_model_is_refused_with_no_row_and_no_blob(admin, server, tmp_path, onnx_file):
    register(admin, "good", onnx_file).raise_for_status()
    before = blob_files(server.config.data_dir)
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"\x08\x07this is not a protobuf model" + os.urandom(1000))
    r = register(admin, "broken", bad)
    assert r.status_code == 422
    assert "onnxruntime could not load broken.onnx" in r.json()["detail"]
    assert admin.get("/api/v1/models", params={"name": "broken"}).json() == []
    assert blob_files(server.config.data_dir) == before
    unknown_kind = tmp_path / "weights.bin"
    unknown_kind.write_bytes(b"1")
    r = register(admin, "x", unknown_kind)  # any other file is a Python model whose entry script comes at build time
    assert r.status_code == 200 and r.json()["framework"] == "python", r.text


# --- modules --------------------------------------------------------------------------------------


def build(client: httpx.Client, name: str, refs: list[str]) -> httpx.Response:
    return client.post("/api/v1/modules", json={"name": name, "models": refs, "collect_rate_ppm": 1000,
                                                "sample": {"inputs": {"x": [[0.1, 0.2, 0.3, 0.4]]}}})


def test_module_digest_is_stable_and_release_verifies(admin, server, broker, tmp_path, onnx_file, monkeypatch):
    register(admin, "logreg", onnx_file).raise_for_status()
    first = build(admin, "scorer", ["logreg:1"]).json()
    again = build(admin, "scorer", ["logreg:1"]).json()
    assert again == first and first["version"] == 1  # unchanged inputs: same version, same digest

    root = load_trusted_root(admin.get("/api/v1/root").json())
    envelope = admin.get(f"/api/v1/bundles/{first['digest']}/release").json()
    manifest = accept_manifest(envelope, root, first["digest"], "scorer")
    assert manifest.model == "model.onnx" and manifest.sample == "sample.json" and manifest.collect_rate_ppm == 1000
    for entry in manifest.files:
        body = admin.get(f"/api/v1/bundles/{first['digest']}/files/{entry.path}").content
        assert sha256_hex(body) == entry.sha256
    shown = admin.get("/api/v1/modules/scorer/versions/1").json()
    assert shown["envelope"] == envelope and shown["digest"] == first["digest"]

    # another hub, other keys, same inputs: the same bundle digest (the name is the content)
    other_dir = tmp_path / "other"
    with HubServer(HubConfig(other_dir, broker.url, mqtt_client_id=client_id(), admin_token="t2-" + "x" * 40,
                             **hub_db(other_dir))) as other:
        h = {"Authorization": "Bearer t2-" + "x" * 40}
        httpx.post(other.url + "/api/v1/models", headers=h, data={"name": "logreg"},
                   files=[("files", ("model.onnx", b"".join(read_blocks(onnx_file))))]).raise_for_status()
        with httpx.Client(base_url=other.url, headers=h) as c:
            assert build(c, "scorer", ["logreg:1"]).json()["digest"] == first["digest"]

    (tmp_path / "retrained").mkdir()
    retrained = write_logreg_onnx(tmp_path / "retrained" / "model.onnx", seed=7)
    register(admin, "logreg", retrained).raise_for_status()
    second = build(admin, "scorer", ["logreg:2"]).json()
    assert second["version"] == 2 and second["digest"] != first["digest"]
    assert build(admin, "scorer", ["logreg:9"]).status_code == 404
