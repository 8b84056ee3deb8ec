"""Download limits against a hostile hub: endless and trickling bodies, lying lengths, oversize MQTT packets.

Real parts: a real HTTP server (``http.server`` in a thread) playing the hostile hub to the agent's real
``HttpBundleFetch`` (its ``http.client`` over TCP), the session's mosquitto for the MQTT packet cap, real
signed releases (``tests/trustsim.py``'s keys). The release is genuine: only the transport misbehaves.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from agent.errors import InstallError, SlowDownload
from agent.http_transfer import HttpBundleFetch, HubHttp
from agent.limits import MAX_PACKET_BYTES, DownloadLimits, RateWatch
from agent.mqtt import AsyncMqttClient
from agent.reconcile import ModuleFacts, step
from agent.transfer import BundleFetch
from modules.store import ContentStore
from protocol.broker_url import parse_broker_url
from protocol.encoding import canonical_json
from protocol.manifest import Manifest, describe_file, release_document
from protocol.messages import DesiredModule, DesiredState
from protocol.signing import load_trusted_root, sign
from protocol.topics import MANIFEST_PART, blob_topic, blob_wildcard
from tests.trustsim import NOW, POOL, Repo

FILE = os.urandom(600 * 1024)  # three 256 KiB chunks, the last one short


def release() -> tuple[dict[str, Any], DesiredModule, list[bytes]]:
    entry, chunks = describe_file("model.onnx", [FILE])
    manifest = Manifest(name="m", version=1, runtime="onnx", model="model.onnx", files=[entry])
    envelope = sign(release_document(manifest, NOW + 3600), [POOL[1]])
    return envelope, DesiredModule(name="m", version=1, bundle=manifest.digest(), size=manifest.size), chunks


ENVELOPE, MODULE, CHUNKS = release()
ROOT = load_trusted_root(Repo().publish_root())
BY_DIGEST = {d: c for d, c in zip(ENVELOPE["signed"]["manifest"]["files"][0]["chunks"], CHUNKS)}


class Hostile:
    """A hub that answers the device routes as ``mode`` says; counts what it sent and sees the client hang up."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.sent = 0
        self.hung_up = threading.Event()
        self.requests: Counter[str] = Counter()
        hostile = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                hostile.serve(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def serve(self, h: BaseHTTPRequestHandler) -> None:
        release_route = h.path.endswith("/release")
        self.requests["release" if release_route else "chunk"] += 1
        body = canonical_json(ENVELOPE) if release_route else BY_DIGEST[h.path.rsplit("/", 1)[1]]
        hostile = (self.mode == "endless-release") == release_route and self.mode != "good"
        try:
            if not hostile:
                h.send_response(200)
                h.send_header("Content-Length", str(len(body)))
                h.end_headers()
                h.wfile.write(body)
            elif self.mode in ("endless-release", "endless-chunk"):
                h.send_response(200)
                h.send_header("Connection", "close")  # no length: the body ends when the server says so (never)
                h.end_headers()
                block = b"x" * 65536
                while True:
                    h.wfile.write(block)
                    self.sent += len(block)
            elif self.mode == "huge-length":
                h.send_response(200)
                h.send_header("Content-Length", str(10**12))
                h.end_headers()
                while True:
                    h.wfile.write(b"x" * 65536)
                    self.sent += 65536
            elif self.mode == "trickle":
                h.send_response(200)
                h.send_header("Content-Length", str(len(body)))
                h.end_headers()
                for i in range(len(body)):
                    h.wfile.write(body[i:i + 1])
                    h.wfile.flush()
                    self.sent += 1
                    time.sleep(0.05)  # the hostile server's pace (20 B/s), not the test's synchronisation
        except (BrokenPipeError, ConnectionResetError):
            self.hung_up.set()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hostile(request):
    servers: list[Hostile] = []

    def make(mode: str) -> Hostile:
        servers.append(Hostile(mode))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def fetch_from(server: Hostile, tmp_path: Path, limits: DownloadLimits) -> tuple[HttpBundleFetch, Counter[str]]:
    rejected: Counter[str] = Counter()
    http = HubHttp(server.url, "dev-1", "pw", timeout=min(30.0, limits.window_s))
    fetch = HttpBundleFetch(http, MODULE, ROOT, ContentStore(tmp_path / "chunks"), tmp_path / "manifests",
                            tmp_path / "downloads", reject=lambda kind, where, why: rejected.update([kind]),
                            retry=0.05, retry_cap=0.1, limits=limits)
    return fetch, rejected


LIMITS = DownloadLimits(min_bps=1000, window_s=1.0, reserve_bytes=0)


def run(fetch: HttpBundleFetch, timeout: float = 30.0) -> Any:
    return asyncio.run(asyncio.wait_for(fetch.run(), timeout))


def test_a_good_hub_is_downloaded_within_the_limits(hostile, tmp_path):
    server = hostile("good")
    fetch, rejected = fetch_from(server, tmp_path, LIMITS)
    assert run(fetch)["signed"]["bundle"] == MODULE.bundle
    assert fetch.fetched == 3 and not rejected
    assert all(fetch.chunks.has(d) for d in BY_DIGEST)


def test_an_endless_release_is_cut_at_the_cap_not_read_to_its_end(hostile, tmp_path):
    server = hostile("endless-release")
    fetch, _ = fetch_from(server, tmp_path, LIMITS)
    with pytest.raises(InstallError, match="release answer is more than 524288 bytes"):
        run(fetch)
    assert server.hung_up.wait(10), "the agent kept reading the endless release"
    assert server.sent < 64 * 2**20  # the answer stopped at the cap plus what the sockets buffered


def test_an_endless_chunk_is_refused_at_the_size_the_release_lists(hostile, tmp_path):
    server = hostile("endless-chunk")
    fetch, rejected = fetch_from(server, tmp_path, LIMITS)
    with pytest.raises(InstallError, match=r"refused 3 times: chunk is more than the \d+ bytes the release lists"):
        run(fetch)
    assert rejected["blob"] >= 3  # each refusal counted (the three chunks are in flight together)
    assert server.hung_up.wait(10)
    assert not any(fetch.chunks.has(d) for d in BY_DIGEST)
    assert not list((tmp_path / "downloads").glob("*"))  # the refused bytes were not kept either


def test_a_length_beyond_the_release_is_refused_before_reading(hostile, tmp_path):
    server = hostile("huge-length")
    fetch, rejected = fetch_from(server, tmp_path, LIMITS)
    with pytest.raises(InstallError, match=r"chunk answer announces 1000000000000 bytes"):
        run(fetch)
    assert rejected["blob"] >= 3


def test_a_trickling_hub_is_aborted_as_a_slow_retrieval(hostile, tmp_path):
    server = hostile("trickle")
    fetch, _ = fetch_from(server, tmp_path, LIMITS)
    with pytest.raises(SlowDownload, match=r"slower than 1000 B/s over 1 s"):
        run(fetch)
    assert server.hung_up.wait(10), "the trickle was not hung up on"
    assert server.sent < 20_000  # one chunk's trickle, stopped at the window: not 600 KB at 20 B/s


def test_the_rate_window_judges_only_a_full_window():
    now = [0.0]
    watch = RateWatch(100, 10, clock=lambda: now[0])
    watch.feed(50)
    now[0] = 9.9
    assert watch.problem() == ""  # less than a window has passed
    now[0] = 10.0
    assert "slower than 100 B/s over 10 s (50 bytes" in watch.problem()
    watch.feed(1000)
    assert watch.problem() == ""
    now[0] = 25.0
    assert "(0 bytes in the last 10 s)" in watch.problem()  # old bytes leave the window
    watch.restart()
    assert watch.problem() == ""
    assert RateWatch(0, 10).problem() == ""  # off


def test_mqtt_slow_retrieval_aborts_a_download_whose_chunks_stop_coming(tmp_path):
    """The MQTT transfer: the manifest comes, the chunks never do (a hub or a neighbour holding them back)."""
    async def main() -> None:
        rejected: Counter[str] = Counter()
        fetch: BundleFetch

        async def publish(topic: str, payload: bytes) -> None:
            if json.loads(payload)["manifest"]:
                fetch.on_part(MANIFEST_PART, canonical_json(ENVELOPE))

        fetch = BundleFetch("dev-1", MODULE, ROOT, ContentStore(tmp_path / "chunks"), tmp_path / "manifests",
                            publish, reject=lambda k, t, r: rejected.update([k]), retry=0.2, retry_cap=0.2,
                            limits=DownloadLimits(min_bps=1000, window_s=1.0, reserve_bytes=0))
        with pytest.raises(SlowDownload, match=r"\(0 bytes in the last 1 s\).*3 chunks still missing"):
            await asyncio.wait_for(fetch.run(), 20)
    asyncio.run(main())


def test_the_broker_never_sends_the_agent_a_packet_over_its_cap(broker):
    """MQTT 5 Maximum Packet Size: mosquitto drops what is larger instead of sending it to the agent."""
    async def main() -> None:
        client = AsyncMqttClient("dev-cap", parse_broker_url(broker.url))
        got: list[int] = []
        client.on_message = lambda topic, payload: got.append(len(payload))
        await client.start()
        await asyncio.wait_for(client.connected.wait(), 10)
        await client.subscribe(blob_wildcard(MODULE.bundle))  # waits for the SUBACK
        attacker = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        attacker.connect(parse_broker_url(broker.url).host, parse_broker_url(broker.url).port)
        attacker.loop_start()
        try:
            topic = blob_topic(MODULE.bundle, "ab" * 32)
            attacker.publish(topic, b"x" * (MAX_PACKET_BYTES + 1), qos=1).wait_for_publish(10)
            attacker.publish(topic, b"small", qos=1).wait_for_publish(10)
            deadline = time.monotonic() + 10
            while not got and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        finally:
            attacker.loop_stop()
            attacker.disconnect()
            await client.stop()
        assert got == [5]  # the small one came (after the big one, in order): the big one never did
    asyncio.run(main())


def test_an_install_the_environment_stopped_is_tried_again_from_its_retry_time():
    m = DesiredModule(name="m", version=1, bundle="a" * 64, size=1)
    desired = DesiredState(device="d", revision=1, expires=NOW + 60, modules=[m])
    gave_up = {"m": ModuleFacts(journal="failed", journal_bundle=m.bundle)}
    assert [type(a).__name__ for a in step(100.0, desired, gave_up)] == ["Report"]
    later = {"m": ModuleFacts(journal="failed", journal_bundle=m.bundle, retry_at=150.0)}
    assert [type(a).__name__ for a in step(100.0, desired, later)] == ["Report"]
    assert [type(a).__name__ for a in step(150.0, desired, later)] == ["Install", "Report"]
