"""Who may use a device's local API, and what module code can see: the device's credentials stay the agent's.

Real parts: a real ``python -m agent`` daemon with its defaults (module workers in bubblewrap, the API on its
Unix socket only), the session's mosquitto, the test hub side, real HTTP clients (httpx over TCP and over the
Unix socket, and a raw socket from a process that became another local user), a Python module that goes looking for
the credentials. Needs root to become another user and for bubblewrap's privileged mode (the CI runs as root).
"""

from __future__ import annotations

import asyncio
import grp
import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import psutil
import pytest

from agent.apitokens import ApiTokens
from tests.hubside import HubSide, new_device, running_agent, until

ROOT = Path(__file__).resolve().parents[1]
GOOD = {"inputs": {"x": [[0.1, 0.2, 0.3, 0.4]]}}

# A module that looks for the device's secrets from inside its worker; what it found is its output.
SNOOP = """
import json, os
DATA = {data!r}
FOUND = 0  # a bit per secret found
for bit, name in enumerate(("identity.json", "state.json", "api-tokens", "outbox.db")):
    try:
        with open(os.path.join(DATA, name), "rb") as f:
            f.read()
        FOUND |= 1 << bit
    except OSError:
        pass
if "DEVICE_SECRET" in os.environ or "EDGEFLEET_MQTT_PASSWORD" in os.environ:
    FOUND |= 16

def run(inputs):
    return {{"probability": [[float(FOUND)]] * len(inputs["x"])}}
"""


@pytest.fixture
def hub(broker, tmp_path):
    h = HubSide(broker.url, tmp_path / "hub")
    yield h
    h.close()


def test_the_daemon_keeps_module_code_away_from_the_credentials_and_serves_only_its_socket(hub, tmp_path):
    if os.geteuid() != 0:
        pytest.fail("this test needs root (bubblewrap's privileged mode); the CI runs as root")
    device, data = new_device(), tmp_path / "device"
    hub.identity(device, data)
    (data / "api-tokens").write_text("app secret-token-0123456789abcdef\n")
    os.chmod(data / "api-tokens", 0o600)
    snoop = hub.build("snoop", 1, script=SNOOP.format(data=str(data)))
    env = {**os.environ, "DEVICE_SECRET": "s3cret", "EDGEFLEET_MQTT_PASSWORD": "hunter2"}
    proc = subprocess.Popen([sys.executable, "-m", "agent", "--data", str(data), "--telemetry-interval", "0.3",
                             "--log-level", "WARNING"], cwd=ROOT, env=env)
    try:
        hub.publish_desired(device, 1, [snoop.desired()])
        asyncio.run(until(lambda: hub.module_state(device, "snoop") == "running", 60, "snoop running"))
        sock = data / "run" / "api.sock"
        assert stat.S_IMODE(sock.stat().st_mode) == 0o660 and stat.S_ISSOCK(sock.stat().st_mode)
        assert stat.S_IMODE((data / "identity.json").stat().st_mode) == 0o600
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://device", timeout=10) as api:
            r = api.post("/v1/modules/snoop/predict", json=GOOD)
            assert r.status_code == 200, r.text
            assert r.json()["outputs"]["probability"] == [[0.0]]  # found nothing: no file, no variable
            assert api.get("/healthz").json()["ok"] is True
        # TCP is off by default: the daemon listens on no TCP port at all
        listening = [c for c in psutil.Process(proc.pid).net_connections(kind="inet") if c.status == "LISTEN"]
        assert listening == []
    finally:
        proc.terminate()
        proc.wait(15)


def test_without_the_sandbox_the_same_module_finds_them(hub, tmp_path):
    """The control: the snooping module is not harmless by accident (isolation off, the same worker)."""
    device, data = new_device(), tmp_path / "device"
    snoop = hub.build("snoop", 1, script=SNOOP.format(data=str(data)))

    async def main() -> float:
        async with running_agent(hub, device, data, isolation="process") as agent:
            hub.publish_desired(device, 1, [snoop.desired()])
            await until(lambda: hub.module_state(device, "snoop") == "running", 30, "snoop running")
            out = await agent.infer_json(agent.active["snoop"], json.dumps(GOOD).encode())
            return float(json.loads(out)["probability"][0][0])
    assert int(asyncio.run(main())) & 0b11 == 0b11  # identity.json and state.json at least


def _connect_as(user: str, group: str | None, path: Path) -> str:
    """Connect to ``path`` as another local user (a forked child that drops to it); "ok" or the error's name."""
    pw = pwd.getpwnam(user)
    pid = os.fork()
    if pid == 0:  # the child: only system calls, then _exit
        code = 1
        try:
            os.setgroups([grp.getgrnam(group).gr_gid] if group else [])
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(path))
            code = 0
        except PermissionError:
            code = 13
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return {0: "ok", 13: "PermissionError"}.get(os.waitstatus_to_exitcode(status), "error")


def test_tcp_needs_a_per_app_token_and_the_socket_only_its_group(hub, tmp_path):
    if os.geteuid() != 0:
        pytest.fail("this test needs root (to become other users); the CI runs as root")
    group = grp.getgrgid(0).gr_name  # a group "nobody" is not in
    device, data = new_device(), tmp_path / "device"
    v1 = hub.build("classifier", 1)
    pub = Path(tempfile.mkdtemp(prefix="edgefleet-api-"))  # traversable by anyone: the socket's mode is the guard
    os.chmod(pub, 0o755)
    tokens = ApiTokens(data.parent / "api-tokens")
    token = tokens.path.read_text().split()[-1]  # the one "default" line made with the file
    port = _free_port()

    async def main() -> None:
        async with running_agent(hub, device, data, api_port=port, api_tokens=tokens, api_socket=pub / "api.sock",
                                 api_group=group) as agent:
            hub.publish_desired(device, 1, [v1.desired()])
            await until(lambda: hub.module_state(device, "classifier") == "running", 30, "v1 running")
            url = f"http://127.0.0.1:{port}/v1/modules/classifier/predict"
            async with httpx.AsyncClient(timeout=10) as c:
                assert (await c.post(url, json=GOOD)).status_code == 401
                r = await c.post(url, json=GOOD, headers={"Authorization": "Bearer not-the-token-at-all-no"})
                assert r.status_code == 401 and "DATA/api-tokens" in r.json()["detail"]
                r = await c.post(url, json=GOOD, headers={"Authorization": f"Bearer {token}"})
                assert r.status_code == 200 and r.json()["version"] == 1
                assert (await c.get(f"http://127.0.0.1:{port}/healthz")).status_code == 401
            assert agent.rejected["local_api_auth"] == 3
            st = (pub / "api.sock").stat()
            assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == grp.getgrnam(group).gr_gid
            # another local user: refused by the socket's mode; the same user in the socket's group: let in
            assert await asyncio.to_thread(_connect_as, "nobody", None, pub / "api.sock") == "PermissionError"
            assert await asyncio.to_thread(_connect_as, "nobody", group, pub / "api.sock") == "ok"
        assert not (pub / "api.sock").exists()  # removed when the agent stops
    try:
        asyncio.run(main())
    finally:
        shutil.rmtree(pub, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
