"""The hub's online keys and the root of trust they belong to (docs/security.md).

``DATA/keys/`` holds ``root.json`` (the current root), ``roots/{version}.json`` (every root
published, for devices walking the chain) and a ``{role}.key`` file per role the hub holds.
The hub needs only ``root.json`` to start: a role whose key is absent is *not held* (the root
role kept offline, the release role held by CI) and whatever needs it is refused with a reason.
The hub generates keys only on a completely empty key directory (its very first start); it
never replaces a missing key, since a new root key would not follow from the root devices pin.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hub.errors import Conflict
from protocol.encoding import ProtocolError
from protocol.signing import ROLES, Root, key_id, load_private, load_trusted_root, make_root, private_hex

log = logging.getLogger("edgefleet.hub.keys")

ROOTS_DIR = "roots"  # roots/<version>.json: every root ever published, so a verifier can walk the chain
ROOT_FILE = "root.json"


class KeySetupError(RuntimeError):
    """The key directory cannot be used as it is; the text says why and what to do (one line)."""


class KeyNotHeld(Conflict):
    """The hub does not hold (enough of) a role's keys to sign alone."""


@dataclass(eq=False)
class KeyRing:
    """The hub's keys. One shared instance: a rotation swaps keys in place, so every signer sees it."""

    held: dict[str, Ed25519PrivateKey]  # role -> the online key the hub holds, listed by the current root
    root: Root
    keys_dir: Path | None = None
    pending: dict[str, Ed25519PrivateKey] = field(default_factory=dict)  # prepared keys awaiting a signed root
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    @property
    def root_envelope(self) -> dict[str, Any]:
        return self.root.document

    def holds(self, role: str) -> bool:
        """Whether the hub can sign for ``role`` alone: it holds a listed key and the threshold is 1."""
        key = self.held.get(role)
        keyids, threshold = self.root.roles[role]
        return key is not None and key_id(key) in keyids and threshold == 1

    def key(self, role: str) -> Ed25519PrivateKey:
        """The key to sign ``role`` documents with; ``KeyNotHeld`` (409) naming what to do otherwise."""
        if not self.holds(role):
            how = {"root": "sign roots offline (edgefleet keys sign-root) and publish them (keys publish-root)",
                   "release": "sign releases outside the hub (edgefleet module sign, docs/security.md)",
                   "director": "rotate the director role (edgefleet keys rotate director --prepare)"}[role]
            raise KeyNotHeld(f"the hub does not hold the {role} key of root version {self.root.version}: {how}")
        return self.held[role]

    @property
    def root_key(self) -> Ed25519PrivateKey:
        return self.key("root")

    @property
    def release_key(self) -> Ed25519PrivateKey:
        return self.key("release")

    @property
    def director_key(self) -> Ed25519PrivateKey:
        return self.key("director")

    def root_version(self, version: int) -> dict[str, Any] | None:
        """A past (or the current) root envelope, or None if this hub never published that version."""
        if version == self.root.version:
            return self.root_envelope
        path = self.keys_dir / ROOTS_DIR / f"{version}.json" if self.keys_dir else None
        return json.loads(path.read_text()) if path is not None and path.is_file() else None


def write_json(path: Path, doc: Any) -> None:
    """Write beside, then rename: readers never see half a root."""
    tmp = path.with_name(path.name + ".tmp")
    write_secret(tmp, json.dumps(doc, indent=2, sort_keys=True) + "\n")  # public, yet one rule for DATA: 0600
    os.replace(tmp, path)


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


def write_key(path: Path, key: Ed25519PrivateKey) -> None:
    write_secret(path, private_hex(key) + "\n")


def read_key(path: Path) -> Ed25519PrivateKey:
    try:
        return load_private(path.read_text())
    except (OSError, ValueError) as exc:
        raise KeySetupError(f"{path}: not an Ed25519 private key file ({exc})") from None


def load_or_create_keys(keys_dir: Path) -> KeyRing:
    """Load ``keys_dir``; on a completely empty directory (first start) create all three keys and root.json.

    Raises ``KeySetupError`` (one line) for a directory it must not guess about: keys without a
    root.json, an invalid root.json, a key file the root does not list.
    """
    private_dir(keys_dir)
    root_path = keys_dir / ROOT_FILE
    if not root_path.exists():
        present = sorted(p.name for p in keys_dir.glob("*.key*"))
        if present:
            raise KeySetupError(f"{root_path} is missing but {', '.join(present)} exist: restore root.json (it is "
                                "public: GET /api/v1/root, or a device's identity.json) instead of starting a new root")
        fresh = {r: Ed25519PrivateKey.generate() for r in ROLES}
        for role, key in fresh.items():
            write_key(keys_dir / f"{role}.key", key)
        write_json(root_path, make_root({r: [k] for r, k in fresh.items()}, [fresh["root"]]))
        log.info("generated root, release and director keys in %s", keys_dir)
    try:
        root = load_trusted_root(json.loads(root_path.read_text()))  # expiry is not judged: see hub/trust/renewal.py
    except (ValueError, ProtocolError) as exc:
        raise KeySetupError(f"{root_path} is not a valid root of trust: {exc}") from None
    pending = _finish_rotation(keys_dir, root)
    held: dict[str, Ed25519PrivateKey] = {}
    for role in ROLES:
        path = keys_dir / f"{role}.key"
        if not path.exists():
            log.warning("%s is absent: the hub does not hold the %s role (root version %d)", path, role, root.version)
            continue
        key = read_key(path)
        if key_id(key) not in root.roles[role][0] and _revoked_earlier(keys_dir, role, key_id(key)):
            retire_key(keys_dir, role)  # a crash between publishing a root that revoked it and moving it aside
            continue
        if key_id(key) not in root.roles[role][0]:
            raise KeySetupError(f"{path} is not a {role} key of {root_path} (version {root.version}): restore the "
                                f"matching key or move this one aside")
        held[role] = key
    return KeyRing(held, root, keys_dir, pending)


def _finish_rotation(keys_dir: Path, root: Root) -> dict[str, Ed25519PrivateKey]:
    """``{role}.key.new`` files: the root lists it (a crash after the root was written): make it the key.
    Otherwise it is a prepared key still waiting for its root to be signed and published: keep it pending."""
    pending: dict[str, Ed25519PrivateKey] = {}
    for leftover in keys_dir.glob("*.key.new"):
        role = leftover.name.removesuffix(".key.new")
        if role not in ROLES:
            continue
        key = read_key(leftover)
        if key_id(key) in root.roles[role][0]:
            os.replace(leftover, keys_dir / f"{role}.key")
        else:
            pending[role] = key
    return pending


def _revoked_earlier(keys_dir: Path, role: str, kid: str) -> bool:
    """Whether an older root this hub published listed ``kid`` for ``role`` (so a newer one revoked it)."""
    for path in (keys_dir / ROOTS_DIR).glob("*.json"):
        try:
            if kid in json.loads(path.read_text())["signed"]["roles"][role]["keyids"]:
                return True
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return False


def retire_key(keys_dir: Path, role: str) -> None:
    """Move a revoked ``{role}.key`` aside (kept for the record, never loaded again)."""
    path = keys_dir / f"{role}.key"
    if path.exists():
        os.replace(path, keys_dir / f"{role}.key.revoked")
        log.warning("%s is no longer listed by the root: moved to %s.revoked", path, path.name)
