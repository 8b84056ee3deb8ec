"""Request bodies are authenticated before they are read and capped per route (issue 13: an unauthenticated 100 MB
body used to be read before the 401, the hub's memory going from 102 to 307 MB)."""

from __future__ import annotations

import socket

import httpx
import psutil
import pytest

from tests.hubprocess import ProcessHub

MB = 1 << 20


def headers_only(url: str, path: str, length: int, token: str | None = None, timeout: float = 15.0) -> str:
    """Send a request's headers announcing ``length`` body bytes but none of the body; return the answer's status
    line (a hub that waits for the body never answers: the socket times out)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: hub\r\nContent-Type: multipart/form-data; boundary=x\r\n{auth}"
                  f"Content-Length: {length}\r\n\r\n".encode())
        answer = s.recv(4096).decode(errors="replace")
    return answer.split("\r\n", 1)[0]


def test_an_unauthenticated_100mb_body_is_refused_before_it_is_sent(broker, tmp_path):
    hub = ProcessHub(broker.url, tmp_path, tmp_path / "hub")
    try:
        proc = psutil.Process(hub.proc.pid)
        before = proc.memory_info().rss
        assert headers_only(hub.url, "/api/v1/models", 100 * MB) == "HTTP/1.1 401 Unauthorized"
        assert headers_only(hub.url, "/api/v1/models", 100 * MB, token="x" * 40) == "HTTP/1.1 401 Unauthorized"
        # a client that sends the body anyway finds the connection closed after the answer, not read to the end
        sent = 0
        with socket.create_connection(("127.0.0.1", int(hub.url.rsplit(":", 1)[1])), timeout=15) as s:
            s.sendall(f"POST /api/v1/models HTTP/1.1\r\nHost: hub\r\nContent-Length: {100 * MB}\r\n\r\n".encode())
            try:
                for _ in range(100):
                    s.sendall(b"\0" * MB)
                    sent += MB
            except OSError:  # reset by the hub
                pass
        assert sent < 100 * MB
        grown = proc.memory_info().rss - before
        assert grown < 20 * MB, f"the hub grew by {grown / MB:.0f} MB"
        assert httpx.get(hub.url + "/healthz").status_code == 200
    finally:
        hub.close()


@pytest.fixture
def hub_options():
    return {"max_body_bytes": 64 * 1024, "max_upload_bytes": MB}  # small caps, to reach them cheaply


def test_bodies_are_capped_per_route_and_roles_checked_before_reading(server, admin, tmp_path):
    viewer = admin.post("/api/v1/tokens", json={"name": "watcher", "role": "viewer"}).json()["token"]
    assert headers_only(server.url, "/api/v1/models", 100 * MB, token=viewer).startswith("HTTP/1.1 403")
    assert headers_only(server.url, "/api/v1/models", 2 * MB, token=server.admin_token).startswith("HTTP/1.1 413")

    big = {"name": "d", "module": "m:1", "target": ",".join(f"dev-{i}" for i in range(20_000))}  # ~200 KB of JSON
    r = admin.post("/api/v1/deployments", json=big)
    assert r.status_code == 413 and "65536 bytes" in r.json()["detail"]
    r = httpx.post(server.url + "/api/v1/enroll", json={"token": "t", "facts": {"k": "v" * 100_000}})
    assert r.status_code == 413  # no token needed to be refused

    def chunked(n: int):  # no Content-Length: counted while read, cut off at the cap
        yield b'--x\r\nContent-Disposition: form-data; name="files"; filename="model.onnx"\r\n\r\n'
        for _ in range(n):
            yield b"\0" * (256 * 1024)

    r = admin.post("/api/v1/models", content=chunked(8), headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413 and f"{MB} bytes" in r.json()["detail"]

    # under the caps everything works as before
    from tests.rollout_support import build_versions

    assert build_versions(admin, tmp_path, n=1)[0]["version"] == 1
    assert admin.post("/api/v1/deployments", json={"name": "d", "module": "scorer:1", "target": "*"}).status_code == 200

