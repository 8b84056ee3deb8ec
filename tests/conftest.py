"""Shared fixtures: a real MQTT broker process per test session on a free loopback port, and the hub's store.

``EDGEFLEET_TEST_DB=postgres`` runs every hub a test starts on a real PostgreSQL server (tests/pg.py), one
database per hub (per data directory): the shared fixtures (``server``, ``admin``), ``tests/hubside.RealHub``,
a ``HubConfig`` built with ``tests.pg.hub_db``, an ``edgefleet hub serve`` child given ``tests.pg.hub_env``, and a
store used without a hub from ``tests.pg.hub_store``. The default is SQLite. ``location``/``db`` give one test
both stores, one after the other, whatever the switch says.
"""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from edgefleet.broker import LocalBroker, find_mosquitto  # noqa: E402
from tests import pg  # noqa: E402
from tests.hubside import clear_hub_retained  # noqa: E402

# The slowest files first (about a minute or more each, measured with --durations): scripts/test.sh runs the
# suite on two pytest-xdist workers, file by file (--dist loadfile), handing files out in collection order;
# starting the long ones early leaves the short ones to fill the gaps at the end.
SLOW_FIRST = ("test_rollout_restart.py", "test_ci_pipeline.py", "test_monitoring.py", "test_cluster.py",
              "test_demo.py", "test_rollout_wait.py", "test_pymodel.py", "test_rollout_retry_approve.py",
              "test_mlops_registry.py", "test_hub_service.py", "test_shadow_fleet.py", "test_agent_outage.py",
              "test_hub_offline_root.py", "test_agent_crash.py", "test_offline_install.py", "test_webhooks.py",
              "test_rollout_waves.py", "test_fleet_trust.py", "test_batch.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # stable: files stay together


def _require_mosquitto() -> None:
    if os.environ.get("EDGEFLEET_BROKER", "mosquitto") == "mosquitto" and find_mosquitto() is None:
        pytest.fail("mosquitto is not installed: run `apt-get install -y mosquitto` (the README's test command does)")


@pytest.fixture(scope="session", autouse=True)
def _postgres_server():
    """With EDGEFLEET_TEST_DB=postgres: start the session's PostgreSQL now (a missing one fails here, loudly)."""
    if pg.test_db_kind() == "postgres":
        try:
            pg.cluster()
        except RuntimeError as exc:
            pytest.fail(str(exc))
    yield
    pg.stop_cluster()


@pytest.fixture(scope="session")
def postgres():
    """The session's PostgreSQL server (tests/pg.py), whichever store the shared fixtures use."""
    try:
        return pg.cluster()
    except RuntimeError as exc:
        pytest.fail(str(exc))


@pytest.fixture(params=["sqlite", "postgres"])
def location(request, tmp_path):
    """A fresh, empty hub database location of each kind (tests/test_store.py: one test, both stores)."""
    if request.param == "sqlite":
        return str(tmp_path / "hub.db")
    cluster = request.getfixturevalue("postgres")
    name = f"store_{uuid.uuid4().hex[:12]}"  # empty: not the template, so its migrations run
    cluster.admin(f"CREATE DATABASE {name}")
    return cluster.url(name)


@pytest.fixture
def db(location):
    """The hub's database at ``location`` (both stores, one after the other)."""
    from hub.store import open_database

    d = open_database(location)
    yield d
    d.close()


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3-compatible server (tests/s3.py: moto_server) for the session."""
    from tests.s3 import S3Server

    server = S3Server(tmp_path_factory.mktemp("s3") / "moto.log")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def broker():
    """A real broker (mosquitto by default; EDGEFLEET_BROKER=iotcore for the embedded one)."""
    _require_mosquitto()
    b = LocalBroker(kind=os.environ.get("EDGEFLEET_BROKER", "mosquitto")).start()
    yield b
    b.stop()


@pytest.fixture
def tmp_data(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def hub_options() -> dict:
    """Extra ``HubConfig`` settings for ``server``: a test module overrides this fixture to change them."""
    return {}


@pytest.fixture
def server(broker, tmp_data, monkeypatch, hub_options):
    """A real hub (uvicorn + MQTT bridge) on a free port, its data in ``tmp_data``, connected to the broker."""
    import secrets

    from hub.config import HubConfig
    from hub.server import HubServer

    monkeypatch.delenv("EDGEFLEET_ADMIN_TOKEN", raising=False)
    s = HubServer(HubConfig(tmp_data, broker.url, mqtt_client_id=f"hub-{secrets.token_hex(4)}",
                            **{**pg.hub_db(tmp_data), **hub_options})).start()
    assert s.wait_mqtt(10)
    yield s
    versions = s.hub.keys.root.version
    s.stop()
    clear_hub_retained(broker.url, max(versions, 9))


@pytest.fixture
def admin(server):
    """An HTTP client for ``server`` with its admin token."""
    import httpx

    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.admin_token}"},
                      timeout=60) as c:
        yield c


@pytest.fixture
def probe(broker):
    """A test-side MQTT client on the broker (hub.testing.MqttProbe)."""
    from hub.testing import MqttProbe

    p = MqttProbe(broker.url)
    yield p
    p.close()
