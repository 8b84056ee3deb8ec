"""Offline install (issue 14): a package exported at a real hub, installed on an air-gapped device by a real agent
process with no reachable broker, answering on its local API, and reported to the hub when the device connects;
tampered, foreign, older, expired and wrong-root packages refused with nothing applied."""

from __future__ import annotations

import io
import json
import os
import secrets
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.identity import enroll
from edgefleet.broker import free_port
from hub.testing import wait_until
from protocol.encoding import canonical_json
from protocol.signing import make_root
from tests.clirun import ROOT, as_json, cli
from tests.rollout_support import build_versions
from tests.test_fleet_trust import agent_process


def install_offline(data: Path, package: Path, *extra: str, prefix: tuple[str, ...] = (),
                    env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, sys.executable, "-m", "agent", "install-offline", "--data", str(data),
                           str(package), "--timeout", "120", *extra], cwd=ROOT, capture_output=True, text=True,
                          timeout=180, env=env)


def rewrite(src: Path, dest: Path, change: dict[str, Any]) -> Path:
    """A copy of the package tar with members replaced (name -> new bytes, or a function of the old bytes)."""
    with tarfile.open(src) as tin, tarfile.open(dest, "w") as tout:
        for info in tin:
            data = tin.extractfile(info).read()  # type: ignore[union-attr]
            for name, new in change.items():
                if info.name == name or (name.endswith("*") and info.name.startswith(name[:-1])):
                    data = new(data) if callable(new) else new
                    change = {k: v for k, v in change.items() if k != name}  # once
                    break
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))
    return dest


def new_device(server: Any, admin: httpx.Client, tmp_path: Path, name: str) -> tuple[str, Path]:
    token = admin.post("/api/v1/enrollment-tokens", json={}).json()["tokens"][0]
    ident = enroll(server.url, token, tmp_path / name, device_id=f"{name}-{secrets.token_hex(3)}")
    return ident.device_id, tmp_path / name


def export(server: Any, deployment: str, device: str, out: Path) -> dict[str, Any]:
    res = as_json(cli(server, "offline", "export", "--deployment", deployment, "--device", device, "--out", str(out),
                      "--json"))
    assert out.stat().st_size == res["bytes"] > 0
    return res


def test_an_air_gapped_device_installs_a_package_and_reports_it_when_it_connects(server, admin, tmp_path):
    v1, v2 = build_versions(admin, tmp_path / "models", "gap", 2)
    dev, data = new_device(server, admin, tmp_path, "gap")
    other, _ = new_device(server, admin, tmp_path, "near")
    admin.post("/api/v1/deployments", json={"name": "gap", "module": "gap:1", "target": f"{dev},{other}"}
               ).raise_for_status()
    refused = cli(server, "offline", "export", "--deployment", "nosuch", "--device", dev, "--out",
                  str(tmp_path / "x.tar"), ok=False)
    assert refused.returncode == 1 and "no active deployment 'nosuch'" in refused.stderr
    older = export(server, "gap", dev, tmp_path / "older.tar")
    pkg = export(server, "gap", dev, tmp_path / "gap.tar")
    assert pkg["revision"] > older["revision"]
    export(server, "gap", other, tmp_path / "other.tar")
    # the director counts the package's revision as issued: the hub's retained state is that one
    assert admin.get(f"/api/v1/devices/{dev}").json()["revision"] == pkg["revision"]
    audited = admin.get("/api/v1/audit", params={"action": "device.offline_package", "subject": dev}).json()
    assert [e["detail"]["revision"] for e in audited] == [pkg["revision"], older["revision"]]

    port, dead = free_port(), free_port()  # nothing listens on ``dead``: the device is air-gapped
    run = [sys.executable, "-m", "agent", "--data", str(data), "--mqtt", f"mqtt://127.0.0.1:{dead}",
           "--api-port", str(port), "--isolation", "inprocess", "--telemetry-interval", "1"]
    api = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)

    def answer() -> dict[str, Any] | None:
        try:
            r = api.post("/v1/modules/gap/predict", json={"inputs": {"x": [[0.1, 0.2, 0.3, 0.4]]}})
        except httpx.TransportError:
            return None
        return r.json() if r.status_code == 200 else None

    with agent_process(run, tmp_path / "agent-offline.log") as log:
        wait_until(lambda: (data / "inbox").is_dir(), 30, 0.1, f"the agent watching its inbox (log: {log})")
        app_token = (data / "api-tokens").read_text().split("default ", 1)[1].split()[0]  # the TCP API's token
        api.headers["Authorization"] = f"Bearer {app_token}"
        again = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert again.returncode == 2 and "another agent runs on" in again.stderr  # one agent per data directory
        k = Ed25519PrivateKey.generate()
        foreign_root = make_root({"root": [k], "release": [k], "director": [k]}, [k])
        cases = {
            "tampered": (rewrite(tmp_path / "gap.tar", tmp_path / "t.tar", {"chunks/*": lambda b: b[:-1] + bytes(
                [b[-1] ^ 1])}), "does not match its digest (tampered or corrupt)"),
            "another device": (tmp_path / "other.tar", f"package is for device {other!r}, this is {dev!r}"),
            "another root": (rewrite(tmp_path / "gap.tar", tmp_path / "r.tar", {"roots/1.json": canonical_json(
                foreign_root)}), "package comes from another root of trust"),
            "not a package": (rewrite(tmp_path / "gap.tar", tmp_path / "n.tar", {"desired.json": b"{"}),
                              "desired state refused: "),
        }
        for case, (package, reason) in cases.items():
            out = install_offline(data, package)
            assert out.returncode == 3 and out.stderr.splitlines()[-1].startswith("refused: "), (case, out.stderr)
            assert reason in out.stderr, (case, out.stderr)
            assert answer() is None and not (data / "modules" / "gap").exists()  # nothing installed
        done = install_offline(data, tmp_path / "gap.tar")
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == f"installed: desired revision {pkg['revision']} (gap v{v1['version']})"
        out = answer()
        assert out is not None and out["version"] == v1["version"]
        stale = install_offline(data, tmp_path / "older.tar")
        assert stale.returncode == 3
        assert f"desired revision {older['revision']} is not newer than applied {pkg['revision']}" in stale.stderr
        same = install_offline(data, tmp_path / "gap.tar")
        assert same.returncode == 0 and same.stdout.startswith("already applied"), same.stderr
        assert not list((data / "inbox").iterdir())  # every package taken and answered
        assert admin.get(f"/api/v1/devices/{dev}").json()["reported_revision"] is None  # the hub heard nothing yet

    # connected again: the hub shows the revision installed offline, and audits it once
    with agent_process(run[:5] + run[7:], tmp_path / "agent-online.log") as log:
        def view() -> dict[str, Any]:
            return admin.get(f"/api/v1/devices/{dev}").json()
        wait_until(lambda: view()["reported_revision"] == pkg["revision"], 60, 0.2, f"the device reporting (log: {log})")
        seen = view()
        assert seen["reported_source"] == "offline" and seen["revision"] == pkg["revision"]
        assert [(m["name"], m["version"], m["state"]) for m in seen["modules"]] == [("gap", v1["version"], "running")]
        shown = as_json(cli(server, "device", "show", dev, "--json"))
        assert (shown["reported_revision"], shown["reported_source"]) == (pkg["revision"], "offline")
        events = admin.get("/api/v1/audit", params={"action": "device.offline_install", "subject": dev}).json()
        assert [(e["actor"], e["detail"]["revision"]) for e in events] == [(f"device:{dev}", pkg["revision"])]
        # the director moves it on like any device: the next version comes online, no reinstall of the old one
        admin.patch("/api/v1/deployments/gap", json={"module": "gap:2"}).raise_for_status()
        wait_until(lambda: any(m["version"] == v2["version"] and m["state"] == "running"
                               for m in view()["modules"]), 60, 0.2, "the device running gap:2")
        assert view()["reported_source"] == "hub" and view()["reported_revision"] == view()["revision"]
        assert answer()["version"] == v2["version"]
    api.close()


def test_with_no_agent_running_the_command_runs_it_walks_root_rotations_and_refuses_an_expired_package(server, admin, tmp_path):
    build_versions(admin, tmp_path / "models", "solo", 1)
    dev, data = new_device(server, admin, tmp_path, "solo")
    admin.post("/api/v1/deployments", json={"name": "solo", "module": "solo:1", "target": dev}).raise_for_status()
    # the director key rotates while the device is away: it pinned root 1, the package's state needs root 2
    admin.post("/api/v1/keys/rotate", json={"role": "director"}).raise_for_status()
    pkg = export(server, "solo", dev, tmp_path / "solo.tar")
    assert json.loads((data / "identity.json").read_text())["root"]["signed"]["version"] == 1
    offline = ("--mqtt", f"mqtt://127.0.0.1:{free_port()}", "--log-level", "INFO")
    # two days later, past the desired state's one-day lifetime (the real libfaketime; the root lives a year)
    env = os.environ | {"FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    late = install_offline(data, tmp_path / "solo.tar", *offline, prefix=("faketime", "-f", "+2d"), env=env)
    assert late.returncode == 3, late.stderr
    assert "refused: desired state refused: " in late.stderr and "director document expired at" in late.stderr
    assert not (data / "modules" / "solo").exists() and not (data / "state.json").exists()
    assert json.loads((data / "identity.json").read_text())["root"]["signed"]["version"] == 1  # nothing applied
    done = install_offline(data, tmp_path / "solo.tar", *offline)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"installed: desired revision {pkg['revision']} (solo v1)")
    assert (data / "modules" / "solo" / "current").is_symlink()  # installed; the agent it ran has stopped
    assert json.loads((data / "identity.json").read_text())["root"]["signed"]["version"] == 2  # walked the chain
    missing = subprocess.run([sys.executable, "-m", "edgefleet", "agent", "install-offline", str(tmp_path / "no.tar"),
                              "--data", str(data)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and f"error: {tmp_path / 'no.tar'} is not a file" in missing.stderr
    # a module whose health check fails: rolled back, the command says so (exit 4), the other module stays
    admin.post("/api/v1/models", data={"name": "broken"},
               files=[("files", ("broken.py", BROKEN.encode()))]).raise_for_status()
    admin.post("/api/v1/modules", json={"name": "broken", "models": ["broken:1"], "runtime": "python",
                                        "sample": {"inputs": {"x": [[0.5, -1.0, 0.25, 2.0]]}}}).raise_for_status()
    admin.post("/api/v1/deployments", json={"name": "bad", "module": "broken:1", "target": dev}).raise_for_status()
    both = export(server, "bad", dev, tmp_path / "both.tar")
    failed = install_offline(data, tmp_path / "both.tar", *offline)
    assert failed.returncode == 4, failed.stderr
    assert failed.stderr.splitlines()[-1].startswith("install failed: broken v1 failed: health check failed: ")
    assert "this model is broken" in failed.stderr
    assert json.loads((data / "state.json").read_text())["revision"] == both["revision"]
    assert (data / "modules" / "solo" / "current").is_symlink() and not (data / "modules" / "broken" / "current"
                                                                          ).exists()


BROKEN = "def init():\n    pass\n\ndef run(inputs):\n    raise RuntimeError('this model is broken')\n"


def test_a_package_with_foreign_members_is_refused_before_anything_is_read(tmp_path):
    from agent.offline import Package, PackageRefused

    def tar(name: str, members: list[tarfile.TarInfo]) -> Path:
        path = tmp_path / name
        with tarfile.open(path, "w") as t:
            for info in members:
                t.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
        return path

    def member(name: str, size: int = 1, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.size, info.type = size, kind
        if kind == tarfile.SYMTYPE:
            info.linkname, info.size = "/etc/passwd", 0
        return info

    cases = {
        "up.tar": ([member("../identity.json")], "'../identity.json' is not one of an offline package's names"),
        "link.tar": ([member("desired.json", kind=tarfile.SYMTYPE)], "'desired.json' is not a regular file"),
        "big.tar": ([member("desired.json", 2 * 1024 * 1024)], "desired.json is 2097152 bytes (at most 1048576)"),
        "twice.tar": ([member("desired.json"), member("desired.json")], "member desired.json appears twice"),
        "empty.tar": ([], "not an offline package: edgefleet-offline.json or desired.json is missing"),
    }
    for name, (members, reason) in cases.items():
        with pytest.raises(PackageRefused) as refused:
            Package.open(tar(name, members))
        assert reason in str(refused.value), name
    (tmp_path / "plain.tar").write_bytes(b"not a tar file at all" * 100)
    with pytest.raises(PackageRefused, match="not a readable tar file"):
        Package.open(tmp_path / "plain.tar")
