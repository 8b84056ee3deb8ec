"""Attacks on `bundle pull` from a hostile hub (a real HTTP server serving crafted documents).

Every attack must fail closed with a precise error and leave the destination exactly as it was:
absent, or holding the previous verified bundle, with no scratch directory left beside it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.client import HubClient
from modules.bundle import build_manifest, sign_release
from modules.examples import write_logreg_onnx, write_sample
from protocol.encoding import ProtocolError, canonical_json, digest_of
from protocol.manifest import Manifest, TensorSpec, release_document
from protocol.signing import ROLES, make_root, sign

Body = bytes | Callable[[], Iterator[bytes]]


class EvilHub:
    """Serves whatever bytes a test puts in ``routes`` (a generator gives an endless or hand-made body)."""

    def __init__(self) -> None:
        self.routes: dict[str, Body] = {}
        routes = self.routes

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                body = routes.get(unquote(self.path.split("?")[0]))
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                if isinstance(body, bytes):
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    for block in [body] if isinstance(body, bytes) else body():
                        self.wfile.write(block)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client hung up: that is the point of the endless bodies

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Release:
    """A legitimately signed module built with this test's own keys."""

    def __init__(self, tmp: Path, keys: dict[str, Ed25519PrivateKey], name: str, version: int, seed: int = 0,
                 expires: int | None = None) -> None:
        d = tmp / f"{name}-{version}"
        d.mkdir()
        files = {"model.onnx": write_logreg_onnx(d / "model.onnx", seed), "sample.json": write_sample(d / "sample.json")}
        self.files = {k: v.read_bytes() for k, v in files.items()}
        self.manifest = build_manifest(name, version, "onnx", files, model="model.onnx", sample="sample.json",
                                       inputs=[TensorSpec(name="x", dtype="float32", shape=[None, 4])])
        self.digest = self.manifest.digest()
        self.envelope = sign_release(self.manifest, [keys["release"]], expires or int(time.time()) + 3600)


@pytest.fixture
def keys() -> dict[str, Ed25519PrivateKey]:
    return {r: Ed25519PrivateKey.generate() for r in ROLES}


@pytest.fixture
def root(keys) -> dict[str, Any]:
    return make_root({r: [keys[r]] for r in ROLES}, [keys["root"]])


@pytest.fixture
def hub(root):
    h = EvilHub()
    h.routes["/api/v1/root"] = canonical_json(root)
    yield h
    h.close()


def publish(hub: EvilHub, rel: Release, envelope: Any = None, files: dict[str, Body] | None = None) -> None:
    m = rel.manifest
    hub.routes[f"/api/v1/modules/{m.name}/versions/{m.version}"] = json.dumps({"digest": rel.digest}).encode()
    hub.routes[f"/api/v1/bundles/{rel.digest}/release"] = canonical_json(envelope or rel.envelope)
    for path, data in (files or rel.files).items():
        hub.routes[f"/api/v1/bundles/{rel.digest}/files/{path}"] = data


def pull(hub: EvilHub, root: Any, name: str, version: int, dest: Path) -> Manifest:
    with HubClient(hub.url, "t") as c:
        return c.pull_bundle(name, version, dest, pinned=root)


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def refused(hub: EvilHub, root: Any, name: str, version: int, dest: Path, match: str) -> None:
    before = snapshot(dest)
    with pytest.raises(ProtocolError, match=match):
        pull(hub, root, name, version, dest)
    assert snapshot(dest) == before, "the destination changed"
    assert leftovers(dest.parent) == []


def snapshot(d: Path) -> dict[str, bytes] | None:
    if not d.exists():
        return None
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_a_good_release_pulls_and_the_next_version_replaces_it(hub, root, keys, tmp_path):
    v1, v2 = Release(tmp_path, keys, "scorer", 1), Release(tmp_path, keys, "scorer", 2, seed=3)
    publish(hub, v1)
    publish(hub, v2)
    dest = tmp_path / "out" / "scorer"
    assert pull(hub, root, "scorer", 1, dest).version == 1
    assert (dest / "files" / "model.onnx").read_bytes() == v1.files["model.onnx"]
    assert json.loads((dest / "root.json").read_bytes()) == root
    assert pull(hub, root, "scorer", 2, dest).version == 2
    assert (dest / "files" / "model.onnx").read_bytes() == v2.files["model.onnx"]
    assert leftovers(dest.parent) == []


def test_bad_signature(hub, root, keys, tmp_path):
    rel = Release(tmp_path, keys, "scorer", 1)
    env = json.loads(canonical_json(rel.envelope))
    sig = env["signatures"][0]["sig"]
    env["signatures"][0]["sig"] = ("0" if sig[0] != "0" else "1") + sig[1:]
    publish(hub, rel, envelope=env)
    refused(hub, root, "scorer", 1, tmp_path / "dest", r"release signature check failed: 0 of 1 required \(bad signature by key ")


def test_unknown_key(hub, root, keys, tmp_path):
    rel = Release(tmp_path, keys, "scorer", 1)
    publish(hub, rel, envelope=sign(rel.envelope["signed"], [Ed25519PrivateKey.generate()]))
    refused(hub, root, "scorer", 1, tmp_path / "dest", "signed by a key the root does not trust for this role")


def test_key_revoked_by_rotation(hub, root, keys, tmp_path):
    rel = Release(tmp_path, keys, "scorer", 1)  # signed by the release key that is about to be revoked
    new_release = Ed25519PrivateKey.generate()
    rotated = make_root({"root": [keys["root"]], "release": [new_release], "director": [keys["director"]]},
                        [keys["root"]], version=2)
    hub.routes["/api/v1/root"] = canonical_json(rotated)
    publish(hub, rel)
    refused(hub, root, "scorer", 1, tmp_path / "dest", "was revoked for role 'release' by root version 2")


def test_hash_mismatch_same_length(hub, root, keys, tmp_path):
    rel = Release(tmp_path, keys, "scorer", 1)
    model = bytearray(rel.files["model.onnx"])
    model[-1] ^= 0xFF
    publish(hub, rel, files={**rel.files, "model.onnx": bytes(model)})
    refused(hub, root, "scorer", 1, tmp_path / "dest", "'model.onnx': chunk 0 does not match its manifest hash")


def test_truncated_file(hub, root, keys, tmp_path):
    rel = Release(tmp_path, keys, "scorer", 1)
    size = len(rel.files["model.onnx"])
    publish(hub, rel, files={**rel.files, "model.onnx": rel.files["model.onnx"][:-10]})
    refused(hub, root, "scorer", 1, tmp_path / "dest", f"'model.onnx' is truncated: {size - 10} of {size} bytes")


def test_extra_bytes_appended(hub, root, keys, tmp_path):
    rel = Release(tmp_path, keys, "scorer", 1)
    publish(hub, rel, files={**rel.files, "sample.json": rel.files["sample.json"] + b" "})
    refused(hub, root, "scorer", 1, tmp_path / "dest", "'sample.json' is longer than the .* bytes its manifest lists")


def test_endless_file_and_endless_release_are_cut_off(hub, root, keys, tmp_path):
    rel = Release(tmp_path, keys, "scorer", 1)

    def endless() -> Iterator[bytes]:
        while True:
            yield b"\0" * 65536

    publish(hub, rel, files={**rel.files, "model.onnx": endless})
    refused(hub, root, "scorer", 1, tmp_path / "dest", r"\(oversize or endless data\)|sent more than")
    hub.routes[f"/api/v1/bundles/{rel.digest}/release"] = endless
    refused(hub, root, "scorer", 1, tmp_path / "dest", r"sent more than 524288 bytes \(oversize\)")


def test_rollback_to_an_older_version_keeps_the_newer_bundle(hub, root, keys, tmp_path):
    v1, v2 = Release(tmp_path, keys, "scorer", 1), Release(tmp_path, keys, "scorer", 2, seed=3)
    publish(hub, v1)
    publish(hub, v2)
    dest = tmp_path / "dest"
    pull(hub, root, "scorer", 2, dest)
    refused(hub, root, "scorer", 1, dest, r"bundle version 1 is older than installed 2 \(rollback\)")
    assert json.loads((dest / "release.json").read_bytes())["signed"]["manifest"]["version"] == 2


def test_expired_release(hub, root, keys, tmp_path):
    rel = Release(tmp_path, keys, "scorer", 1, expires=int(time.time()) - 5)
    publish(hub, rel)
    refused(hub, root, "scorer", 1, tmp_path / "dest", r"release document expired at .* \(freeze attack or stale document\)")


def test_manifest_swapped_between_two_modules(hub, root, keys, tmp_path):
    mine, theirs = Release(tmp_path, keys, "scorer", 1), Release(tmp_path, keys, "other", 1, seed=9)
    publish(hub, theirs)
    # the hub names module scorer's bundle by the other module's digest, with its valid release
    hub.routes["/api/v1/modules/scorer/versions/1"] = json.dumps({"digest": theirs.digest}).encode()
    refused(hub, root, "scorer", 1, tmp_path / "a", r"manifest is for module 'other', not 'scorer' \(mix-and-match\)")
    # or serves the other module's release under scorer's own digest
    publish(hub, mine, envelope=theirs.envelope)
    refused(hub, root, "scorer", 1, tmp_path / "b", r"does not match the requested bundle .* \(mix-and-match\)")


def test_path_traversal_in_a_validly_signed_manifest(hub, root, keys, tmp_path):
    rel = Release(tmp_path, keys, "scorer", 1)
    doc = json.loads(canonical_json(release_document(rel.manifest, int(time.time()) + 3600)))
    doc["manifest"]["files"][0]["path"] = "../../etc/x"
    doc["manifest"]["model"] = "../../etc/x"
    doc["bundle"] = digest_of(doc["manifest"])
    hub.routes["/api/v1/modules/scorer/versions/1"] = json.dumps({"digest": doc["bundle"]}).encode()
    hub.routes[f"/api/v1/bundles/{doc['bundle']}/release"] = canonical_json(sign(doc, [keys["release"]]))
    hub.routes[f"/api/v1/bundles/{doc['bundle']}/files/../../etc/x"] = b"owned"
    work = tmp_path / "deep" / "er"
    work.mkdir(parents=True)
    refused(hub, root, "scorer", 1, work / "dest", r"unsafe file path in manifest: '\.\./\.\./etc/x'")
    assert not (tmp_path / "etc").exists() and not (work / "etc").exists()


def test_a_destination_that_is_not_a_bundle_is_never_replaced(hub, root, keys, tmp_path):
    publish(hub, Release(tmp_path, keys, "scorer", 1))
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("precious")
    refused(hub, root, "scorer", 1, home, "exists and is not a bundle directory")
