"""The hub's Ed25519 keys (root, release, director) and the root of trust they form."""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol.signing import (
    ROLES,
    Root,
    key_id,
    load_private,
    load_trusted_root,
    make_root,
    private_hex,
    update_root,
)

log = logging.getLogger("edgefleet.hub.keys")


ROOTS_DIR = "roots"  # roots/<version>.json: every root ever published, so a verifier can walk the chain


@dataclass(eq=False)
class KeyRing:
    """The hub's signing keys. One shared instance: a rotation swaps keys in place, so every signer sees it."""

    root_key: Ed25519PrivateKey
    release_key: Ed25519PrivateKey
    director_key: Ed25519PrivateKey
    root: Root
    keys_dir: Path | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def root_envelope(self) -> dict[str, Any]:
        return self.root.document

    def key(self, role: str) -> Ed25519PrivateKey:
        return {"root": self.root_key, "release": self.release_key, "director": self.director_key}[role]

    def root_version(self, version: int) -> dict[str, Any] | None:
        """A past (or the current) root envelope, or None if this hub never published that version."""
        if version == self.root.version:
            return self.root_envelope
        path = self.keys_dir / ROOTS_DIR / f"{version}.json" if self.keys_dir else None
        return json.loads(path.read_text()) if path is not None and path.is_file() else None


def _write_json(path: Path, doc: Any) -> None:
    """Write beside, then rename: readers never see half a root."""
    tmp = path.with_name(path.name + ".tmp")
    write_secret(tmp, json.dumps(doc, indent=2, sort_keys=True) + "\n")  # public, yet one rule for DATA: 0600
    os.replace(tmp, path)


def rotate_key(ring: KeyRing, role: str) -> dict[str, Any]:
    """Replace ``role``'s key: publish root version N+1 signed by the old and the new root keys; the old key is revoked.

    Crash-safe order: the new key is written as ``<role>.key.new``, then the new
    root replaces root.json (the commit point), then the key file is renamed;
    load_or_create_keys finishes or drops a leftover ``.new`` file.
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: one of {list(ROLES)}")
    if ring.keys_dir is None:
        raise ValueError("this key ring has no directory to write to")
    with ring.lock:
        old, new = ring.key(role), Ed25519PrivateKey.generate()
        role_keys = {r: [new if r == role else ring.key(r)] for r in ROLES}
        thresholds = {r: ring.root.roles[r][1] for r in ROLES}
        signers = [ring.root_key, new] if role == "root" else [ring.root_key]
        envelope = make_root(role_keys, signers, version=ring.root.version + 1, thresholds=thresholds)
        new_root = update_root(ring.root, envelope)  # exactly the check a device makes
        keys_dir = ring.keys_dir
        (keys_dir / ROOTS_DIR).mkdir(exist_ok=True, mode=0o700)
        if not (keys_dir / ROOTS_DIR / f"{ring.root.version}.json").exists():
            _write_json(keys_dir / ROOTS_DIR / f"{ring.root.version}.json", ring.root_envelope)
        write_secret(keys_dir / f"{role}.key.new", private_hex(new) + "\n")
        _write_json(keys_dir / ROOTS_DIR / f"{new_root.version}.json", envelope)
        _write_json(keys_dir / "root.json", envelope)
        os.replace(keys_dir / f"{role}.key.new", keys_dir / f"{role}.key")
        setattr(ring, f"{role}_key", new)
        ring.root = new_root
    log.warning("rotated the %s key: root version %d, key %s revoked", role, new_root.version, key_id(old)[:12])
    return {"role": role, "keyid": key_id(new), "revoked": key_id(old), "root_version": new_root.version}


def write_secret(path: Path, text: str) -> None:
    """Create ``path`` readable by its owner only, from the first byte (no window with wider rights)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) if needed and make it the owner's alone (0700), also when it existed."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def private_file(path: Path) -> None:
    """Make an existing file the owner's alone (0600): files an older hub left readable by everyone."""
    if path.exists():
        os.chmod(path, 0o600)


def load_or_create_keys(keys_dir: Path) -> KeyRing:
    """Load ``keys_dir/{root,release,director}.key`` and ``root.json``; create them at first start."""
    private_dir(keys_dir)
    keys: dict[str, Ed25519PrivateKey] = {}
    _finish_rotation(keys_dir)
    for role in ROLES:
        path = keys_dir / f"{role}.key"
        if path.exists():
            keys[role] = load_private(path.read_text())
        else:
            keys[role] = Ed25519PrivateKey.generate()
            write_secret(path, private_hex(keys[role]) + "\n")
            log.info("generated %s key %s", role, path)
    root_path = keys_dir / "root.json"
    if root_path.exists():
        envelope = json.loads(root_path.read_text())
    else:
        envelope = make_root({r: [keys[r]] for r in ROLES}, [keys["root"]])
        _write_json(root_path, envelope)
    root = load_trusted_root(envelope)  # refuse to start on a corrupt or expired root
    for role in ROLES:
        if key_id(keys[role]) not in root.roles[role][0]:
            raise ValueError(f"{keys_dir / (role + '.key')} is not a {role} key of {root_path} (version {root.version})")
    return KeyRing(keys["root"], keys["release"], keys["director"], root, keys_dir)


def _finish_rotation(keys_dir: Path) -> None:
    """After a crash mid-rotation: keep a ``.new`` key the current root lists, drop one it does not."""
    root_path = keys_dir / "root.json"
    for leftover in keys_dir.glob("*.key.new"):
        role = leftover.name.removesuffix(".key.new")
        listed: list[str] = []
        if root_path.exists() and role in ROLES:
            listed = json.loads(root_path.read_text())["signed"]["roles"][role]["keyids"]
        if key_id(load_private(leftover.read_text())) in listed:
            os.replace(leftover, keys_dir / f"{role}.key")
        else:
            leftover.unlink()
