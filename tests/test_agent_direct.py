"""The direct socket: each module's worker serves its predict route on ``DATA/run/<module>.sock`` (issue #4).

A real ``python -m agent``, real workers and onnxruntime: the Unix socket answers what the TCP API
answers, its calls reach the agent's telemetry, metrics and sampled data, it follows an update and
a rollback, and it is gone when the agent stops.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from edgefleet.broker import free_port
from protocol import Channel, decode
from tests.hubside import HubSide, new_device, until

ROOT = Path(__file__).resolve().parents[1]
GOOD = {"inputs": {"x": [[0.1, 0.2, 0.3, 0.4]]}}
DIRECT = {"inputs": {"x": [[0.5, 0.6, 0.7, 0.8]]}}  # told apart from GOOD in the sampled records


@pytest.fixture
def hub(broker, tmp_path):
    h = HubSide(broker.url, tmp_path / "hub")
    yield h
    h.close()


def wait(cond, timeout: float, what: str):
    return asyncio.run(until(cond, timeout, what))


def raw(target: str | tuple[str, int], data: bytes) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes it."""
    family = socket.AF_UNIX if isinstance(target, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(target)
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def metric(tcp: httpx.Client, line: str) -> float | None:
    for row in tcp.get("/metrics").text.splitlines():
        if row.startswith(line + " "):
            return float(row.split(" ")[-1])
    return None


def worker_pid(agent: subprocess.Popen) -> int | None:
    kids = psutil.Process(agent.pid).children()
    return kids[0].pid if len(kids) == 1 else None


def test_direct_socket_answers_as_the_tcp_api_is_counted_and_follows_update_and_rollback(hub, tmp_path):
    device, port = new_device(), free_port()
    v1, v2 = hub.build("classifier", 1), hub.build("classifier", 2)
    data = tmp_path / "device"
    hub.identity(device, data)
    sock = data / "run" / "classifier.sock"
    proc = subprocess.Popen([sys.executable, "-m", "agent", "--data", str(data), "--api-port", str(port),
                             "--telemetry-interval", "0.3", "--log-level", "WARNING"], cwd=ROOT)
    direct = httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://device", timeout=10)
    try:
        hub.publish_desired(device, 1, [v1.desired(collect_rate_ppm=1_000_000)])
        wait(lambda: hub.module_state(device, "classifier") == "running" and sock.exists(), 60, "v1 on the socket")
        token = (data / "api-tokens").read_text().split("default ", 1)[1].split()[0]  # the TCP API's per-app token
        tcp = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10, headers={"Authorization": f"Bearer {token}"})
        assert stat.S_IMODE(sock.stat().st_mode) == 0o660

        # the same answers, status and words, on both paths
        url = "/v1/modules/classifier/predict"
        cases = [("POST", url, {"json": GOOD}), ("POST", url, {"content": b"{not json"}),
                 ("POST", url, {"json": {"inputs": {"x": [[1, 2]]}}}), ("POST", url, {"json": {"inputs": {"y": [[1.0]]}}}),
                 ("POST", "/v1/modules/nope/predict", {"json": GOOD}), ("GET", url, {})]
        for method, path, kw in cases:
            a, b = tcp.request(method, path, **kw), direct.request(method, path, **kw)
            assert (b.status_code, b.json().get("detail")) == (a.status_code, a.json().get("detail")), (method, path, kw)
        statuses = [direct.request(m, p, **kw).status_code for m, p, kw in cases]
        assert statuses == [200, 400, 422, 422, 404, 405]
        assert direct.post(url, json=GOOD).json() == tcp.post(url, json=GOOD).json()  # same outputs, module, version
        bad_http = [b"HELLO\r\n\r\n", b"POST %s HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" % url.encode(),
                    b"POST %s HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (url.encode(), 65 * 2**20),  # over MAX_BODY
                    b"GET / HTTP/1.1\r\nX: " + b"a" * 70_000]  # no end of head in sight: 431
        for request in bad_http:
            theirs, ours = raw(("127.0.0.1", port), request), raw(str(sock), request)
            assert ours == theirs and ours.split(b" ")[1] in (b"400", b"411", b"413", b"431"), ours[:120]

        for _ in range(5):
            r = direct.post(url, json=DIRECT)
            assert r.status_code == 200 and r.json()["version"] == 1
        # TCP: cases[0] + the compare = 2; direct: cases[0] twice + compare + 5 = 8; 4xx never reached the model
        total = 'edgefleet_agent_inferences_total{module="classifier"}'
        wait(lambda: metric(tcp, total) == 10, 10, "direct inferences in /metrics")
        assert metric(tcp, 'edgefleet_agent_inference_errors_total{module="classifier"}') == 0
        assert metric(tcp, 'edgefleet_agent_rejected_messages_total{kind="direct_api"}') == len(bad_http)
        assert metric(tcp, 'edgefleet_agent_rejected_messages_total{kind="local_api"}') == len(bad_http)

        def points() -> list:
            return [p for b in hub.telemetry(device) for p in b.points if p.module == "classifier" and p.inferences]
        wait(lambda: sum(p.inferences for p in points()) == 10, 20, "all ten inferences in telemetry")
        assert all(p.latency_ms.p50 > 0 and p.latency_ms.p99 >= p.latency_ms.p50 for p in points())

        def sampled() -> list:
            return [r for p in hub.messages(device, Channel.DATA) for r in decode(Channel.DATA, p).records]  # type: ignore[attr-defined]
        records = wait(lambda: len(sampled()) >= 10 and sampled(), 20, "every inference sampled")
        assert len(records) == 10
        assert sum(r.input == DIRECT["inputs"] for r in records) == 5
        assert all(len(r.output["probability"]) == 1 and r.version == 1 for r in records)

        # an update: the socket answers as v2 once v2 is committed and serving
        v1_file = sock.stat().st_ino
        hub.publish_desired(device, 2, [v2.desired()])
        wait(lambda: hub.module_state(device, "classifier") == "running"
             and hub.reported(device).revision == 2 and tcp.post(url, json=GOOD).json().get("version") == 2, 60, "v2")
        assert sock.stat().st_ino != v1_file  # a new socket file, renamed over the old one
        assert direct.post(url, json=GOOD).json()["version"] == 2
        assert sorted(p.name for p in sock.parent.iterdir()) == ["api.sock", "classifier.sock"]  # no temporary names left

        # three crashes of v2's worker: rolled back, and the socket answers as v1 again
        for i in range(3):
            pid = wait(lambda: worker_pid(proc), 30, f"v2 worker up before kill {i + 1}")
            os.kill(pid, signal.SIGKILL)
            wait(lambda p=pid: worker_pid(proc) not in (None, p) or hub.module_state(device, "classifier") == "rolled_back",
                 30, f"after kill {i + 1}")
        # v1's worker takes the socket over before the agent routes to it: once TCP answers v1, so does the socket
        wait(lambda: hub.module_state(device, "classifier") == "rolled_back"
             and tcp.post(url, json=GOOD).json().get("version") == 1, 30, "rolled back to v1")
        r = direct.post(url, json=GOOD)
        assert r.status_code == 200 and r.json()["version"] == 1
    finally:
        tcp.close()
        direct.close()
        proc.terminate()
        proc.wait(15)
    assert not sock.exists()  # removed by the worker as the agent stopped it
