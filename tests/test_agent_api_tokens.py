"""The local API's per-app tokens follow DATA/api-tokens without a restart: added ones work, removed ones are refused.

Real parts: the tokens file on disk; a real ``python -m agent --api-port`` daemon on the session's mosquitto,
real HTTP requests, a real SIGHUP. The clock is the only stand-in (the once-a-second re-check for unknown tokens).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agent.apitokens import ApiTokens
from tests.hubside import HubSide, new_device

ROOT = Path(__file__).resolve().parents[1]
A, B, C, D = (f"token-{c * 24}" for c in "abcd")  # all the same length: an in-place edit keeps the file's size


def _edit_keeping_stamp(path: Path, text: str) -> None:
    """Rewrite ``path`` in place (same inode, same size) and put its mtime back: an edit no stat can see."""
    st = path.stat()
    assert len(text.encode()) == st.st_size
    with open(path, "r+") as f:
        f.write(text)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_tokens_follow_the_file_an_unknown_one_rechecks_at_most_once_a_second(tmp_path):
    path = tmp_path / "api-tokens"
    path.write_text(f"app-a {A}\n# app-x {B}\nshort 0123456789\n")
    now = [100.0]
    tokens = ApiTokens(path, clock=lambda: now[0])
    assert tokens.app(A) == "app-a" and tokens.app(B) is None and tokens.app("0123456789") is None
    assert tokens.app(None) is None and tokens.app("") is None
    path.write_text(f"app-a {A}\napp-b {B}\n")
    assert tokens.app(B) is None  # an unknown token looked at the file less than a second ago
    now[0] += 1.0
    assert tokens.app(B) == "app-b" and tokens.reloads == 1
    path.write_text(f"app-b {B}\n")  # A revoked: refused on the next request, the second not yet over
    assert tokens.app(A) is None and tokens.app(B) == "app-b" and tokens.reloads == 2
    for _ in range(50):  # a caller guessing tokens: the file is looked at once a second, not once a guess
        assert tokens.app(C) is None
    assert tokens.reloads == 2
    _edit_keeping_stamp(path, f"app-d {D}\n")  # an edit the stamp does not show: B still valid, D not yet
    now[0] += 5.0
    assert tokens.app(B) == "app-b" and tokens.app(D) is None
    tokens.reload()  # SIGHUP
    assert tokens.app(D) == "app-d" and tokens.app(B) is None
    path.unlink()  # gone: nothing is valid (fail closed), and nothing is made in its place
    assert tokens.app(D) is None and not path.exists() and len(tokens) == 0
    path.write_text(f"app-a {A}\n")
    now[0] += 1.0
    assert tokens.app(A) == "app-a"


@pytest.fixture
def daemon(broker, tmp_path) -> Iterator[tuple[subprocess.Popen[bytes], Path, int]]:
    """A real agent daemon with the TCP API on, its tokens file holding A and C."""
    hub = HubSide(broker.url, tmp_path / "hub")
    data = tmp_path / "device"
    hub.identity(new_device(), data)
    (data / "api-tokens").write_text(f"app-a {A}\napp-c {C}\n")
    os.chmod(data / "api-tokens", 0o600)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    proc = subprocess.Popen([sys.executable, "-m", "agent", "--data", str(data), "--api-port", str(port),
                             "--telemetry-interval", "1", "--module-sandbox", "off", "--log-level", "WARNING"], cwd=ROOT)
    try:
        yield proc, data / "api-tokens", port
    finally:
        proc.terminate()
        proc.wait(15)
        hub.close()


def _until_status(get: httpx.Client, token: str, want: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            code = get.get("/healthz", headers={"Authorization": f"Bearer {token}"}).status_code
        except httpx.TransportError:  # not listening yet
            code = 0
        if (code == 401) == (want == 401) and code:
            return
        assert time.monotonic() < deadline, f"token {token[:8]}…: {code}, waited for {want}"
        time.sleep(0.05)


def test_a_running_agent_takes_added_tokens_refuses_removed_ones_and_rereads_on_sighup(daemon):
    proc, path, port = daemon
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as api:
        def code(token: str) -> int:
            return api.get("/healthz", headers={"Authorization": f"Bearer {token}"}).status_code

        _until_status(api, A, 200)  # up, and A is let in
        assert code(B) == 401
        with open(path, "a") as f:
            f.write(f"app-b {B}\n")
        _until_status(api, B, 200)  # added: let in within a second, no restart
        tmp = path.with_name("api-tokens.new")
        tmp.write_text(f"app-b {B}\napp-c {C}\n")
        os.replace(tmp, path)
        assert code(A) == 401  # revoked: the very next request is refused
        assert code(B) != 401 and code(C) != 401
        _edit_keeping_stamp(path, f"app-b {B}\napp-d {D}\n")  # C -> D where the stamp cannot show it
        assert code(C) != 401  # the agent cannot know yet: that is what SIGHUP is for
        proc.send_signal(signal.SIGHUP)
        _until_status(api, D, 200)
        assert code(C) == 401 and code(B) != 401
        assert proc.poll() is None  # SIGHUP re-reads, it does not stop the agent
