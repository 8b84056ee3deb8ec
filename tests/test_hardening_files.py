"""The hub's data directory is private: secrets and the database 0600, their directories 0700 (issue 13)."""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

import httpx
import pytest

from hub import HubConfig, HubServer
from tests.rollout_support import build_versions


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def permissive_umask():
    old = os.umask(0o022)  # the usual default: without care, files come out 0644 and directories 0755
    yield
    os.umask(old)


def test_hub_data_files_are_private(broker, tmp_path, monkeypatch, permissive_umask):
    monkeypatch.delenv("EDGEFLEET_ADMIN_TOKEN", raising=False)
    data = tmp_path / "hub-data"
    server = HubServer(HubConfig(data, broker.url, mqtt_client_id=f"hub-{secrets.token_hex(4)}",
                                 isolate=True)).start()  # isolate: the broker password files too
    try:
        assert server.wait_mqtt(10)
        admin = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.admin_token}"})
        build_versions(admin, tmp_path, n=1)  # blobs, a signed release: the database has written its WAL
        admin.post("/api/v1/keys/rotate", json={"role": "release"}).raise_for_status()  # keys/roots/
        admin.close()
        secret_files = [data / "hub.db", data / "hub.db-wal", data / "hub.db-shm", data / "admin-token",
                        *sorted((data / "keys").glob("*.key")), data / "broker" / "passwd", data / "broker" / "acl",
                        data / "broker" / "hub-password"]
        assert len(secret_files) >= 10, secret_files  # root, release and director keys at least
        assert {str(p.relative_to(data)): oct(mode(p)) for p in secret_files} == \
            {str(p.relative_to(data)): oct(0o600) for p in secret_files}
        for d in (data, data / "keys", data / "keys" / "roots", data / "broker", data / "blobs"):
            assert mode(d) == 0o700, (d, oct(mode(d)))
        # and nothing below the data directory is open to other users (not even public documents: one rule)
        opened = [f"{p.relative_to(data)} {oct(mode(p))}" for p in data.rglob("*") if mode(p) & 0o077]
        assert opened == []
    finally:
        server.stop()


def test_an_existing_world_readable_data_directory_is_closed_at_start(broker, tmp_path, monkeypatch,
                                                                     permissive_umask):
    """A hub.db written by an older hub (0644 in a 0755 directory) is made private when the hub starts."""
    monkeypatch.delenv("EDGEFLEET_ADMIN_TOKEN", raising=False)
    data = tmp_path / "old"
    HubServer(HubConfig(data, broker.url, mqtt_client_id=f"hub-{secrets.token_hex(4)}")).start().stop()
    for p in (data, data / "hub.db", data / "admin-token"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    server = HubServer(HubConfig(data, broker.url, mqtt_client_id=f"hub-{secrets.token_hex(4)}")).start()
    try:
        assert mode(data) == 0o700 and mode(data / "hub.db") == 0o600 and mode(data / "admin-token") == 0o600
    finally:
        server.stop()
