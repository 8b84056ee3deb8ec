"""Operator code against a real hub (issue 13): the attacker's tool is a model or endpoint module of its own.

A real hub (uvicorn, SQLite, the session's mosquitto) started with secrets in its environment, real
gateway and worker processes in bubblewrap, run as root so the separate sandbox user is exercised.
Each script tries to read DATA/keys/root.key, DATA/admin-token, DATA/hub.db, the hub's
/proc/PID/environ and its own environment, and reports everything it got through the channel it
has: a load check's error (the 422) or an endpoint's scoring output. None of it may come back.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from hub import HubConfig, HubServer

MARKER = "sandbox-marker-" + secrets.token_hex(12)  # stored in hub.db as a model description

THIEF = """
import os
import numpy as np

TARGETS = {targets!r}


def steal() -> bytes:
    out = [b"uid=%d" % os.getuid()]
    for path in TARGETS:
        try:
            with open(path, "rb") as f:
                out.append(path.encode() + b" READ " + f.read())
        except Exception as exc:
            out.append(path.encode() + b" DENIED " + type(exc).__name__.encode())
    out.append(b"ENV " + repr(sorted(os.environ.items())).encode())
    return b"\\n".join(out)


REPORT = steal()
if {loud!r}:
    raise RuntimeError(REPORT.decode(errors="replace"))


def run(inputs):
    return {{"report": np.frombuffer(REPORT, dtype=np.uint8)}}
"""

HOG = """
import numpy as np

if {at_import!r}:
    hog = bytearray(2 << 30)


def run(inputs):
    x = np.asarray(inputs["x"], dtype=np.float32)
    if (x > 100).any():
        hog = bytearray(2 << 30)
    return {"y": x * 2}
"""

# the old wire format was pickle: a worker could have run this in the gateway, i.e. as the hub
PICKLER = """
import os
import pickle
import struct
import sys

class Evil:
    def __reduce__(self):
        return (os.system, ({command!r},))

if "--fd" in sys.argv:  # in an endpoint worker (not a registration's load check)
    fd = int(sys.argv[sys.argv.index("--fd") + 1])
    body = pickle.dumps(("ready", Evil()))
    os.write(fd, struct.pack("<I", len(body)) + body)


def run(inputs):
    return inputs
"""


@pytest.fixture(scope="module")
def secrets_env() -> Iterator[dict[str, str]]:
    values = {"EDGEFLEET_ADMIN_TOKEN": "admin-" + secrets.token_urlsafe(24),
              "AWS_SECRET_ACCESS_KEY": "aws-" + secrets.token_urlsafe(24)}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in values.items():
            mp.setenv(k, v)
        yield values


@pytest.fixture(scope="module")
def server(broker, tmp_path_factory, secrets_env) -> Iterator[HubServer]:
    if os.geteuid() != 0:
        pytest.fail("run as root (CI does): the separate sandbox user is what these tests exercise")
    data = tmp_path_factory.mktemp("hub")
    # SQLite whatever EDGEFLEET_TEST_DB says: part of the loot is a row of the hub.db file in the data directory
    s = HubServer(HubConfig(data, broker.url, mqtt_client_id=f"hub-{secrets.token_hex(4)}", load_check_timeout_s=60,
                            load_check_memory_mb=1024, endpoint_memory_mb=1024)).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def admin(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.admin_token}"},
                      timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def loot(server, admin, secrets_env) -> dict[str, bytes]:
    """What the attacker wants: the hub's key files, its admin token, a row of its database, its environment."""
    data = server.config.data_dir
    admin.post("/api/v1/models", data={"name": "innocent", "description": MARKER},
               files=[("files", ("m.py", b"def init():\n    pass\n\n\ndef run(inputs):\n    return inputs\n"))]).raise_for_status()
    db = b"".join(p.read_bytes() for p in data.glob("hub.db*"))
    assert MARKER.encode() in db
    found = {p.name: p.read_bytes().strip() for p in (data / "keys").glob("*.key")}
    assert {"root.key", "release.key", "director.key"} <= set(found)
    found["admin-token"] = (data / "admin-token").read_bytes().strip()
    assert found["admin-token"].decode() == secrets_env["EDGEFLEET_ADMIN_TOKEN"] == server.admin_token
    found |= {k: v.encode() for k, v in secrets_env.items()} | {"hub.db": MARKER.encode()}
    return found


def targets(server: HubServer) -> list[str]:
    data = server.config.data_dir
    return [str(data / "keys" / "root.key"), str(data / "admin-token"), str(data / "hub.db"),
            f"/proc/{os.getpid()}/environ", "/proc/1/environ", "/proc/self/environ"]


def assert_clean(text: bytes, loot: dict[str, bytes]) -> None:
    for name, secret in loot.items():
        for form in (secret, secret.hex().encode()):
            assert form not in text, f"{name} leaked"


def register(admin: httpx.Client, name: str, source: str, **data: str) -> httpx.Response:
    if "def init(" not in source:  # an entry script defines init() and run() (modules/pymodel.py)
        source += "\n\ndef init():\n    pass\n"
    return admin.post("/api/v1/models", data={"name": name, **data}, files=[("files", (f"{name}.py", source.encode()))])


def build(admin: httpx.Client, name: str, model: str, sample: dict[str, Any]) -> str:
    r = admin.post("/api/v1/modules", json={"name": name, "models": [model], "runtime": "python", "sample": sample})
    assert r.status_code == 200, r.text
    return f"{name}:{r.json()['version']}"


def test_a_model_that_reads_the_keys_gets_nothing_back_through_the_422(server, admin, loot):
    r = register(admin, "loudthief", THIEF.format(targets=targets(server), loud=True))
    assert_clean(r.content, loot)
    assert r.status_code in (200, 422)  # 200 once registration stops executing entry scripts
    if r.status_code == 422:  # it ran, in the sandbox: as the sandbox user, finding nothing
        assert "uid=65534" in r.text and "root.key DENIED" in r.text


def test_an_endpoint_module_that_reads_the_keys_serves_nothing_of_them(server, admin, loot):
    register(admin, "thief", THIEF.format(targets=targets(server), loud=False)).raise_for_status()
    module = build(admin, "thiefmod", "thief:1", {"inputs": {"x": [[1.0]]}})
    r = admin.post("/api/v1/endpoints", json={"name": "thief", "module": module})
    assert_clean(r.content, loot)
    assert r.status_code == 200, r.text
    ep = r.json()
    answers = [httpx.get(ep["info_url"], headers={"api-key": ep["keys"]["primary"]}),
               httpx.post(ep["url"], json={"inputs": {"x": [[1.0]]}}, headers={"api-key": ep["keys"]["primary"]}),
               admin.get("/api/v1/endpoints/thief")]
    for answer in answers:
        assert_clean(answer.content, loot)
    report = bytes(answers[1].json()["outputs"]["report"])
    assert_clean(report, loot)
    lines = report.decode().splitlines()
    assert lines[0] == "uid=65534"
    data = server.config.data_dir
    assert f"{data / 'keys' / 'root.key'} DENIED FileNotFoundError" in lines
    assert f"{data / 'hub.db'} DENIED FileNotFoundError" in lines
    assert f"/proc/{os.getpid()}/environ DENIED FileNotFoundError" in lines  # another pid namespace
    env = dict(eval(lines[-1].removeprefix("ENV ")))  # noqa: S307 - the report's own repr
    assert not {"EDGEFLEET_ADMIN_TOKEN", "AWS_SECRET_ACCESS_KEY"} & set(env)
    admin.delete("/api/v1/endpoints/thief").raise_for_status()


def test_memory_beyond_the_limit_fails_the_module_not_the_hub(server, admin):
    register(admin, "hog", HOG.replace("{at_import!r}", "__name__ == 'never'")).raise_for_status()
    module = build(admin, "hogmod", "hog:1", {"inputs": {"x": [[1.0]]}})
    ep = admin.post("/api/v1/endpoints", json={"name": "hog", "module": module}).json()
    key = {"api-key": ep["keys"]["primary"]}
    status = admin.get("/api/v1/endpoints/hog").json()["status"]["versions"][0]["workers"][0]
    big = httpx.post(ep["url"], json={"inputs": {"x": [[1000.0]]}}, headers=key)
    assert big.status_code == 500 and "MemoryError" in big.json()["detail"]
    ok = httpx.post(ep["url"], json={"inputs": {"x": [[1.0]]}}, headers=key)
    assert ok.status_code == 200 and ok.json()["outputs"]["y"] == [[2.0]]
    after = admin.get("/api/v1/endpoints/hog").json()["status"]["versions"][0]["workers"][0]
    assert after["pid"] == status["pid"] and after["restarts"] == 0  # the worker lived on
    admin.delete("/api/v1/endpoints/hog").raise_for_status()

    # allocating while the worker loads it (the registration's load check is spared): refused with the reason
    register(admin, "hogload", HOG.replace("{at_import!r}", "'--fd' in __import__('sys').argv")).raise_for_status()
    module = build(admin, "hogloadmod", "hogload:1", {"inputs": {"x": [[1.0]]}})
    r = admin.post("/api/v1/endpoints", json={"name": "hogload", "module": module})
    assert r.status_code == 422 and "MemoryError" in r.text
    assert admin.get("/api/v1/endpoints/hogload").status_code == 404
    assert admin.get("/api/v1/keys").status_code == 200  # and the hub serves on


def test_a_worker_sending_a_pickle_cannot_run_code_in_the_gateway(server, admin, tmp_path):
    marker = tmp_path / "pwned"
    register(admin, "pickler", PICKLER.format(command=f"touch {marker}")).raise_for_status()
    module = build(admin, "picklermod", "pickler:1", {"inputs": {"x": [[1.0]]}})
    r = admin.post("/api/v1/endpoints", json={"name": "pickler", "module": module})
    assert r.status_code == 422 and "malformed frame" in r.text
    assert not marker.exists()
    assert admin.get("/api/v1/endpoints/pickler").status_code == 404
