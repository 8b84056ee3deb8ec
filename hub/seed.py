"""A large enrolled fleet without running its agents, for the console's tests and bench (bench/console_bench.py).

:func:`enrol` goes through the hub's own bulk path (``POST /api/v1/enroll/batch``, 1,000 a request), so
each row is what a real enrolment makes (about 2.5 ms a device: its broker password hash, audit row and
signed desired state). :func:`insert` writes the rows through the hub's store in one transaction (10,000
in well under a second): devices that never connect, with an empty desired state and no broker login.

Devices that should look alive are played over MQTT by one client publishing what an agent would
(status, reported state), through the bridge like any device; not retained, so a shared test broker
keeps nothing of them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import httpx

from hub.store import Database, dumps, now
from hub.testing import MqttProbe
from protocol.messages import ModuleReport, ReportedState, Status
from protocol.topics import Channel, device_topic

BATCH = 1000
SITES = ("berlin", "paris", "tokyo", "lima")


def seed_id(prefix: str, i: int) -> str:
    return f"{prefix}-{i:05d}"


def enrol(api: httpx.Client, n: int, prefix: str = "seed", sites: Sequence[str] = SITES) -> list[str]:
    """Enrol ``n`` devices ``prefix-00000``…, labelled ``fleet=prefix`` and ``site`` in turn over ``sites``."""
    ids = [seed_id(prefix, i) for i in range(n)]
    for s, site in enumerate(sites):
        mine = ids[s::len(sites)]
        if not mine:
            continue
        token = api.post("/api/v1/enrollment-tokens", json={"labels": {"fleet": prefix, "site": site},
                                                            "uses": len(mine)}).raise_for_status().json()["tokens"][0]
        for i in range(0, len(mine), BATCH):
            api.post("/api/v1/enroll/batch", json={"token": token, "devices": [
                {"device_id": d, "facts": {"arch": "arm64" if j % 3 else "x86_64", "site": site}}
                for j, d in enumerate(mine[i:i + BATCH])]}).raise_for_status()
    return ids


def insert(db: Database, n: int, prefix: str = "seed", sites: Sequence[str] = SITES) -> list[str]:
    """Store ``n`` devices as :func:`enrol` labels them, directly: offline, nothing desired (state idle)."""
    ids = [seed_id(prefix, i) for i in range(n)]
    t = now()
    with db.transaction() as tx:
        tx.insert_many("devices", ("id", "labels", "facts", "created_at", "desired", "state"), [
            (d, dumps({"fleet": prefix, "site": sites[i % len(sites)]}),
             dumps({"arch": "arm64" if i % 3 else "x86_64", "site": sites[i % len(sites)]}), t, "[]", "idle")
            for i, d in enumerate(ids)])
    return ids


def play(probe: MqttProbe, device_ids: Sequence[str], *, online: bool = True, module: tuple[str, int, str] | None = None,
         state: str = "running", error: str = "") -> None:
    """Publish, as each device, that it is (not) connected and, with ``module`` (name, version, bundle digest),
    that it reports that bundle in ``state``."""
    for d in device_ids:
        probe.publish(device_topic(d, Channel.STATUS), Status(device=d, online=online, ts=time.time()).encode())
        if module is not None:
            name, version, bundle = module
            report = ModuleReport(name=name, version=version, bundle=bundle, state=state, error=error)
            probe.publish(device_topic(d, Channel.REPORTED), ReportedState(
                device=d, revision=1, modules=[report], facts={"arch": "arm64"}, ts=time.time()).encode())
