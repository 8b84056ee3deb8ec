"""The hub's Ed25519 keys (root, release, director) and the root of trust they form."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol.signing import ROLES, Root, load_private, load_trusted_root, make_root, private_hex

log = logging.getLogger("edgefleet.hub.keys")


@dataclass(frozen=True)
class KeyRing:
    root_key: Ed25519PrivateKey
    release_key: Ed25519PrivateKey
    director_key: Ed25519PrivateKey
    root: Root

    @property
    def root_envelope(self) -> dict[str, Any]:
        return self.root.document


def write_secret(path: Path, text: str) -> None:
    """Create ``path`` readable by its owner only, from the first byte (no window with wider rights)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def load_or_create_keys(keys_dir: Path) -> KeyRing:
    """Load ``keys_dir/{root,release,director}.key`` and ``root.json``; create them at first start."""
    keys_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(keys_dir, 0o700)
    keys: dict[str, Ed25519PrivateKey] = {}
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
        root_path.write_text(json.dumps(envelope, indent=2, sort_keys=True) + "\n")
    root = load_trusted_root(envelope)  # refuse to start on a corrupt or expired root
    return KeyRing(keys["root"], keys["release"], keys["director"], root)
