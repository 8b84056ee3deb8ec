"""`bundle pull` / `bundle verify` / `keys` against a real hub: a real ONNX model registers, bundles, verifies and
predicts; on-disk tampering is caught; key rotation keeps pinned verifiers working and revokes the old key."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from hub import HubServer
from modules.bundle import FILES_DIR, verify_pulled
from modules.examples import write_logreg_onnx, write_sample
from modules.runners import coerce_inputs, health_check, load_runner, load_sample
from protocol.encoding import ProtocolError
from protocol.signing import load_trusted_root, sign
from protocol.verify import accept_desired

ROOT = Path(__file__).resolve().parents[1]


def cli(server: HubServer, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgefleet", "--hub", server.url, "--token", server.admin_token, *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def ok(proc: subprocess.CompletedProcess[str]) -> dict:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def build_scorer(server: HubServer, tmp_path: Path, seed: int = 0) -> dict:
    d = tmp_path / f"src-{seed}"
    d.mkdir()
    ok(cli(server, "model", "register", "logreg", str(write_logreg_onnx(d / "model.onnx", seed)), "--json"))
    version = server.hub.registry.list("logreg")[0]["version"]
    (d / "entry.py").write_text("import numpy as np\n\ndef postprocess(out):\n"
                                "    return {**out, 'label': (out['probability'] > 0.5).astype(np.int64)}\n")
    return ok(cli(server, "module", "build", "scorer", "--model", f"logreg:{version}", "--entry", str(d / "entry.py"),
                  "--sample", str(write_sample(d / "sample.json")), "--json"))


def test_onnx_module_pulls_verifies_and_predicts(server, tmp_path):
    built = build_scorer(server, tmp_path)
    pinned = tmp_path / "pinned-root.json"
    assert ok(cli(server, "keys", "show", "--out", str(pinned), "--json"))["version"] == 1
    dest = tmp_path / "bundle"
    pulled = ok(cli(server, "bundle", "pull", "scorer:1", str(dest), "--root", str(pinned), "--json"))
    assert pulled["digest"] == built["digest"] and pulled["version"] == 1
    assert sorted(p.name for p in dest.iterdir()) == ["files", "release.json", "root.json", "roots"]
    verified = ok(cli(server, "bundle", "verify", str(dest), "--root", str(pinned), "--json"))
    assert verified == {"valid": True, "name": "scorer", "version": 1, "digest": built["digest"], "files": 3}

    manifest = verify_pulled(dest, load_trusted_root(json.loads(pinned.read_text())))
    runner = load_runner(dest / FILES_DIR, manifest)
    sample = load_sample(dest / FILES_DIR, manifest)
    out = health_check(runner, sample)
    assert out["probability"].shape == (2, 1) and out["label"].dtype == np.int64
    batch = coerce_inputs({"x": [[3.0, -3.0, 0.0, 1.0], [-3.0, 3.0, 0.0, -1.0]]}, runner.inputs)
    assert runner.predict(batch)["label"].ravel().tolist() == [1, 0]


@pytest.mark.parametrize("attack", ["truncate", "append", "flip", "extra-file", "forged-release"])
def test_verify_refuses_a_tampered_bundle_on_disk(server, tmp_path, attack):
    build_scorer(server, tmp_path)
    pinned = tmp_path / "root.json"
    ok(cli(server, "keys", "show", "--out", str(pinned), "--json"))
    dest = tmp_path / "bundle"
    ok(cli(server, "bundle", "pull", "scorer:1", str(dest), "--root", str(pinned), "--json"))
    model = dest / FILES_DIR / "model.onnx"
    data = model.read_bytes()
    expect = {"truncate": "'model.onnx' truncated", "append": "'model.onnx' has extra bytes",
              "flip": "'model.onnx' hash mismatch", "extra-file": "files its manifest does not list: ['evil.py']",
              "forged-release": "bad signature"}[attack]
    if attack == "truncate":
        model.write_bytes(data[:-1])
    elif attack == "append":
        model.write_bytes(data + b"\0")
    elif attack == "flip":
        model.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    elif attack == "extra-file":
        (dest / FILES_DIR / "evil.py").write_text("import os\n")
    else:
        release = json.loads((dest / "release.json").read_text())
        release["signed"]["manifest"]["collect_rate_ppm"] = 1_000_000
        (dest / "release.json").write_text(json.dumps(release))
    proc = cli(server, "bundle", "verify", str(dest), "--root", str(pinned))
    assert proc.returncode == 1
    assert expect in " ".join(proc.stderr.split())


def test_rotation_revokes_the_old_key_and_pinned_verifiers_follow_the_chain(server, tmp_path):
    built = build_scorer(server, tmp_path)
    pinned = tmp_path / "root-v1.json"
    ok(cli(server, "keys", "show", "--out", str(pinned), "--json"))
    before = tmp_path / "before"
    ok(cli(server, "bundle", "pull", "scorer:1", str(before), "--root", str(pinned), "--json"))
    old_root = load_trusted_root(json.loads(pinned.read_text()))

    rotated = ok(cli(server, "keys", "rotate", "release", "--json"))
    assert rotated["root_version"] == 2 and rotated["resigned_releases"] == 1
    assert rotated["revoked"] in old_root.roles["release"][0] and rotated["keyid"] not in old_root.roles["release"][0]
    root_key = ok(cli(server, "keys", "rotate", "root", "--json"))
    assert root_key["root_version"] == 3
    shown = ok(cli(server, "keys", "show", "--json"))
    assert shown["version"] == 3 and shown["roles"]["release"]["keyids"] == [rotated["keyid"]]

    # a verifier pinned at v1 walks 1 -> 2 -> 3 and accepts the re-signed release (same digest)
    after = tmp_path / "after"
    pulled = ok(cli(server, "bundle", "pull", "scorer:1", str(after), "--root", str(pinned), "--json"))
    assert pulled["digest"] == built["digest"]
    ok(cli(server, "bundle", "verify", str(after), "--root", str(pinned), "--json"))

    # the old release, signed by the revoked key, is refused once the verifier knows the new roots
    shutil.copytree(after / "roots", before / "roots", dirs_exist_ok=True)
    shutil.copy(after / "root.json", before / "root.json")
    proc = cli(server, "bundle", "verify", str(before), "--root", str(pinned))
    assert proc.returncode == 1
    assert f"key {rotated['revoked'][:12]}… was revoked for role 'release' by root version 2" in " ".join(proc.stderr.split())

    # a root that does not follow from the pinned one is refused
    forged = json.loads((after / "root.json").read_text())
    forged["signed"]["version"] = 9
    (after / "root.json").write_text(json.dumps(forged))
    proc = cli(server, "bundle", "verify", str(after), "--root", str(pinned))
    assert proc.returncode == 1 and "root version 9 does not follow from trusted version 3" in " ".join(proc.stderr.split())


def test_desired_state_checks_with_a_rotated_director_key(server, tmp_path):
    built = build_scorer(server, tmp_path)
    headers = {"Authorization": f"Bearer {server.admin_token}"}
    tokens = httpx.post(server.url + "/api/v1/enrollment-tokens", headers=headers, json={"count": 2}).json()["tokens"]
    devices = [httpx.post(server.url + "/api/v1/enroll", json={"token": t}).json() for t in tokens]
    rotated = ok(cli(server, "keys", "rotate", "director", "--json"))
    httpx.post(server.url + "/api/v1/deployments", headers=headers,
               json={"name": "all", "module": "scorer:1", "target": "*"}).raise_for_status()
    root_v1 = load_trusted_root(devices[0]["root"])
    root_v2 = load_trusted_root(httpx.get(server.url + "/api/v1/root", headers=headers).json())
    dev = devices[0]["device_id"]
    row = server.hub.db.one("SELECT desired_envelope, revision FROM devices WHERE id = ?", (dev,))
    envelope = json.loads(row["desired_envelope"])
    assert envelope["signatures"][0]["keyid"] == rotated["keyid"]

    state = accept_desired(envelope, root_v2, dev, 0)
    assert state.modules[0].bundle == built["digest"]
    with pytest.raises(ProtocolError, match="signed by a key the root does not trust"):
        accept_desired(envelope, root_v1, dev, 0)  # a device that has not taken the new root yet
    with pytest.raises(ProtocolError, match=r"is for device .* not .* \(replay across devices\)"):
        accept_desired(envelope, root_v2, devices[1]["device_id"], 0)
    with pytest.raises(ProtocolError, match=r"not newer than applied .* \(rollback/replay\)"):
        accept_desired(envelope, root_v2, dev, row["revision"])
    stale = sign({**envelope["signed"], "expires": int(time.time()) - 1}, [server.hub.keys.director_key])
    with pytest.raises(ProtocolError, match=r"expired at .* \(freeze attack"):
        accept_desired(stale, root_v2, dev, 0)
