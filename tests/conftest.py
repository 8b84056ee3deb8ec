"""Shared fixtures: a real MQTT broker process per test session on a free loopback port."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from edgefleet.broker import LocalBroker, find_mosquitto  # noqa: E402


def _require_mosquitto() -> None:
    if os.environ.get("EDGEFLEET_BROKER", "mosquitto") == "mosquitto" and find_mosquitto() is None:
        pytest.fail("mosquitto is not installed: run `apt-get install -y mosquitto` (the README's test command does)")


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
