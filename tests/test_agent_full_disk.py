"""A full disk: the agent says so, keeps serving, and recovers by itself once there is room again.

Real parts: a real small filesystem (a tmpfs mounted with ``size=``, so writes meet a real ENOSPC) as the
agent's data directory, the session's mosquitto, the test hub side over MQTT (``tests/hubside.py``), the
agent's local API over real HTTP, onnxruntime. Needs root for the mount (the CI runs as root).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import socket
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from agent.errors import DiskFull
from agent.limits import DownloadLimits
from agent.transfer import BundleFetch
from modules.store import ContentStore
from protocol.encoding import canonical_json
from protocol.topics import MANIFEST_PART
from tests.hubside import HubSide, new_device, running_agent, until

LIMITS = DownloadLimits(min_bps=0, window_s=0, reserve_bytes=256 * 1024, retry_s=0.5)


@pytest.fixture
def small_fs(tmp_path):
    """A 6 MiB tmpfs: the device's whole disk."""
    if os.geteuid() != 0:
        pytest.fail("mounting the small filesystem needs root (the CI runs as root)")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m,mode=0700", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def hub(broker, tmp_path):
    h = HubSide(broker.url, tmp_path / "hub")
    yield h
    h.close()


def fill(path: Path) -> int:
    """Write until the filesystem refuses (a real ENOSPC); the bytes written."""
    written = 0
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                written += f.write(b"\0" * 65536) or 0
        except OSError as exc:
            assert exc.errno == 28, exc
    return written


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def healthz(port: int) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/healthz")
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def module_view(hub: HubSide, device: str) -> tuple[str, int, str] | None:
    rep = hub.reported(device)
    m = rep.modules[0] if rep and rep.modules else None
    return (m.state, m.version, m.error) if m else None


def test_a_full_disk_is_reported_and_recovered_from_by_itself(hub, small_fs):
    v1, v2, v3 = hub.build("m", 1), hub.build("m", 2, pad_bytes=700_000), hub.build("m", 3, pad_bytes=700_000,
                                                                                    pad_seed=99)
    bad = hub.build("m", 4, failing=True, pad_bytes=300_000, pad_seed=7)
    device, port = new_device(), free_port()
    filler = small_fs / "filler"

    async def main() -> None:
        async with running_agent(hub, device, small_fs, limits=LIMITS, api_port=port) as agent:
            hub.publish_desired(device, 1, [v1.desired()])
            await until(lambda: module_view(hub, device) == ("running", 1, ""), 20, "v1 running")
            assert (await asyncio.to_thread(healthz, port))[0] == 200

            # The disk fills up (another process, a log): the agent says so everywhere it can.
            await asyncio.to_thread(fill, filler)
            await until(lambda: agent.reporter.lost_batches >= 2, 10, "telemetry refused by the full disk")
            status, body = await asyncio.to_thread(healthz, port)
            assert status == 503 and not body["ok"]
            assert any("disk" in e for e in body["disk"]), body
            await until(lambda: "disk full" in (hub.reported(device).error or ""), 10, "the hub told")

            # A new version while full: it fails at once with the reason and a retry, never a silent stall.
            hub.publish_desired(device, 2, [v2.desired()])
            view = await until(lambda: (v := module_view(hub, device)) and v[:2] == ("failed", 2) and v, 20,
                               "v2 refused for want of space")
            assert "disk" in view[2] and "trying again" in view[2], view
            telemetry_before = len(hub.telemetry(device))

            # Room again: without a restart or a new message, v2 is installed and telemetry flows again.
            filler.unlink()
            await until(lambda: module_view(hub, device) == ("running", 2, ""), 30, "v2 running after the disk freed")
            await until(lambda: len(hub.telemetry(device)) > telemetry_before + 2, 10, "telemetry again")
            await until(lambda: "disk" not in (hub.reported(device).error or ""), 10, "the error cleared")
            assert (await asyncio.to_thread(healthz, port))[0] == 200

            # Garbage: v1 stays as v2's rollback target until v3 commits; then its chunks go.
            only_v1 = set(v1.chunks) - set(v2.chunks) - set(v3.chunks) - set(bad.chunks)
            assert only_v1 and all(agent.chunks.has(d) for d in only_v1)
            hub.publish_desired(device, 3, [v3.desired()])
            await until(lambda: module_view(hub, device) == ("running", 3, ""), 30, "v3 running")
            await until(lambda: not any(agent.chunks.has(d) for d in only_v1), 10, "v1's chunks collected")
            assert not (small_fs / "manifests" / f"{v1.digest}.json").exists()
            assert all(agent.chunks.has(d) for d in v3.chunks)  # the active version's chunks stay (delta updates)

            # A version that fails its health check is rolled back: its own chunks go too.
            hub.publish_desired(device, 4, [bad.desired()])
            await until(lambda: (module_view(hub, device) or ("",))[0] == "rolled_back", 30, "v4 rolled back")
            only_bad = set(bad.chunks) - set(v3.chunks) - set(v2.chunks)
            await until(lambda: not any(agent.chunks.has(d) for d in only_bad), 10, "v4's chunks collected")
            assert not (small_fs / "manifests" / f"{bad.digest}.json").exists()

    asyncio.run(main())


def test_a_chunk_that_meets_a_full_disk_fails_the_download_with_the_reason(hub, small_fs):
    """The disk fills between the free-space check and the chunks (a neighbour's writes): ENOSPC is the answer."""
    bundle = hub.build("big", 1, pad_bytes=2_000_000)
    store = ContentStore(small_fs / "chunks")

    async def main() -> None:
        rejected: Counter[str] = Counter()
        fetch: BundleFetch

        async def publish(topic: str, payload: bytes) -> None:
            request = json.loads(payload)
            if request["manifest"]:
                fetch.on_part(MANIFEST_PART, canonical_json(bundle.envelope))
                return
            await asyncio.to_thread(fill, small_fs / "neighbour")
            for digest in request["chunks"]:
                fetch.on_part(digest, bundle.chunks[digest])

        fetch = BundleFetch("dev-1", bundle.desired(), hub.trusted_root(), store, small_fs / "manifests", publish,
                            reject=lambda k, t, r: rejected.update([k]), retry=0.2,
                            limits=DownloadLimits(reserve_bytes=0))
        with pytest.raises(DiskFull, match="disk full while storing a chunk: No space left on device"):
            await asyncio.wait_for(fetch.run(), 20)
        assert not list(store.root.glob(".incoming-*"))  # no half-written chunk left behind
    asyncio.run(main())
    with contextlib.suppress(FileNotFoundError):
        (small_fs / "neighbour").unlink()
