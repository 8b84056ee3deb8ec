"""Changing the root of trust: offline-root set-up, prepared rotations, publishing a root signed elsewhere,
online rotation and renewal. Every new root passes exactly the check a device makes before the hub uses it.

Commit order (crash-safe, see ``hub.keys.load_or_create_keys``): a new key is written as
``{role}.key.new``; then ``roots/{N+1}.json`` and ``root.json`` (the commit point); then the
``.new`` file is renamed and keys the new root no longer lists are moved aside.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hub.errors import Conflict, Invalid
from hub.trust.keys import (
    ROOT_FILE,
    ROOTS_DIR,
    KeyRing,
    KeySetupError,
    private_dir,
    retire_key,
    write_json,
    write_key,
)
from protocol.encoding import ProtocolError
from protocol.signing import ROLES, AnyKey, add_signatures, key_id, make_root, role_publics, root_body, update_root

log = logging.getLogger("edgefleet.hub.root_admin")

ONLINE_ROLES = ("release", "director")  # roles whose new key a prepared rotation generates on the hub


def init_offline(keys_dir: Path, offline_dir: Path, root_keys: int = 1, threshold: int = 1,
                 expires: int | None = None) -> dict[str, Any]:
    """First set-up with the root role kept off the hub: ``root_keys`` root keys (any ``threshold`` of them
    sign a root) in ``offline_dir``; the hub's ``keys_dir`` gets root.json and its release and director keys."""
    if (keys_dir / ROOT_FILE).exists():
        raise KeySetupError(f"{keys_dir / ROOT_FILE} exists: this hub already has a root of trust")
    if not 1 <= threshold <= root_keys:
        raise KeySetupError(f"root threshold {threshold} must be between 1 and the {root_keys} root key(s)")
    if offline_dir.resolve() == keys_dir.resolve() or keys_dir.resolve() in offline_dir.resolve().parents:
        raise KeySetupError(f"{offline_dir} is inside the hub's key directory: keep root keys off the hub")
    private_dir(offline_dir)
    if any(offline_dir.glob("root-*.key")):
        raise KeySetupError(f"{offline_dir} already holds root keys: refusing to overwrite them")
    roots = [Ed25519PrivateKey.generate() for _ in range(root_keys)]
    online = {r: Ed25519PrivateKey.generate() for r in ONLINE_ROLES}
    envelope = make_root({"root": roots, **{r: [k] for r, k in online.items()}}, roots, expires=expires,
                         thresholds={"root": threshold})
    files = []
    for i, key in enumerate(roots, 1):
        write_key(offline_dir / f"root-{i}.key", key)
        files.append(str(offline_dir / f"root-{i}.key"))
    write_json(offline_dir / ROOT_FILE, envelope)
    private_dir(keys_dir)
    for role, key in online.items():
        write_key(keys_dir / f"{role}.key", key)
    write_json(keys_dir / ROOT_FILE, envelope)
    return {"keys_dir": str(keys_dir), "offline_dir": str(offline_dir), "root_key_files": files,
            "root_threshold": threshold, "version": 1, "expires": envelope["signed"]["expires"]}


def next_root_body(ring: KeyRing, replace: dict[str, list[AnyKey]] | None = None,
                   expires: int | None = None) -> dict[str, Any]:
    """Root version N+1: the current keys and thresholds with ``replace``'s roles swapped, a fresh expiry."""
    replace = replace or {}
    role_keys: dict[str, list[AnyKey]] = {r: list(replace.get(r, role_publics(ring.root, r))) for r in ROLES}
    thresholds = {r: min(ring.root.roles[r][1], len(role_keys[r])) for r in ROLES}
    return root_body(role_keys, ring.root.version + 1, expires, thresholds)


def prepare_rotation(ring: KeyRing, role: str) -> dict[str, Any]:
    """Root version N+1, unsigned, for signing elsewhere (``keys sign-root``). For release or director a new key
    is generated and kept pending on the hub until that root is published; for root the body only renews
    the expiry (change root keys while signing, with ``keys sign-root --set root=…``)."""
    if role not in ROLES:
        raise Invalid(f"unknown role {role!r}: one of {list(ROLES)}")
    keys_dir = _dir(ring)
    with ring.lock:
        if role in ONLINE_ROLES:
            new = Ed25519PrivateKey.generate()
            write_key(keys_dir / f"{role}.key.new", new)
            ring.pending[role] = new
            body = next_root_body(ring, {role: [new]})
        else:
            body = next_root_body(ring)
    return {"signed": body, "signatures": []}


def publish_root(ring: KeyRing, envelope: Any, now: float | None = None) -> dict[str, Any]:
    """Make ``envelope`` (root version N+1, signed elsewhere or here) the hub's root, if a device would accept it."""
    keys_dir = _dir(ring)
    with ring.lock:
        try:
            new = update_root(ring.root, envelope)
        except ProtocolError as exc:
            raise Invalid(f"root refused: {exc}") from None
        if new.version != ring.root.version + 1:
            raise Invalid(f"root version {new.version} does not follow the current {ring.root.version}: "
                          f"publish version {ring.root.version + 1} first")
        if new.expired(now):
            raise Invalid(f"root version {new.version} expired at {new.expires}: sign one with a later expiry")
        held: dict[str, Ed25519PrivateKey] = {}
        commit: list[str] = []
        for role in ROLES:
            listed = new.roles[role][0]
            pending, current = ring.pending.get(role), ring.held.get(role)
            if pending is not None and key_id(pending) in listed:
                held[role] = pending
                commit.append(role)
            elif current is not None and key_id(current) in listed:
                held[role] = current
        if "director" in ring.held and "director" not in held:
            raise Conflict(f"root version {new.version} lists neither the hub's director key nor a prepared one: the "
                           "hub could no longer sign desired states (prepare with: keys rotate director --prepare)")
        (keys_dir / ROOTS_DIR).mkdir(exist_ok=True, mode=0o700)
        if not (keys_dir / ROOTS_DIR / f"{ring.root.version}.json").exists():
            write_json(keys_dir / ROOTS_DIR / f"{ring.root.version}.json", ring.root_envelope)
        write_json(keys_dir / ROOTS_DIR / f"{new.version}.json", envelope)
        write_json(keys_dir / ROOT_FILE, envelope)  # the commit point
        for role in commit:
            os.replace(keys_dir / f"{role}.key.new", keys_dir / f"{role}.key")
            ring.pending.pop(role, None)
        retired = [r for r in ring.held if r not in held]
        for role in retired:
            retire_key(keys_dir, role)
        ring.held, ring.root = held, new
    log.warning("published root version %d (new keys for %s; no longer held: %s)", new.version,
                ", ".join(commit) or "no role", ", ".join(retired) or "none")
    return {"root_version": new.version, "expires": new.expires, "committed": commit, "retired": retired,
            "held": sorted(held)}


def rotate_key(ring: KeyRing, role: str) -> dict[str, Any]:
    """Online rotation (the hub holds the root key): new key for ``role``, root N+1 signed here; old key revoked."""
    if role not in ROLES:
        raise Invalid(f"unknown role {role!r}: one of {list(ROLES)}")
    with ring.lock:
        root_key = ring.key("root")
        old = ring.held.get(role)
        if role == "root":
            new = Ed25519PrivateKey.generate()
            write_key(_dir(ring) / "root.key.new", new)
            ring.pending["root"] = new
            envelope = make_root({r: [new] if r == "root" else role_publics(ring.root, r) for r in ROLES},
                                 [root_key, new], ring.root.version + 1,
                                 thresholds={r: ring.root.roles[r][1] for r in ROLES if r != "root"})
        else:
            envelope = add_signatures(prepare_rotation(ring, role), [root_key])
            new = ring.pending[role]
        result = publish_root(ring, envelope)
    log.warning("rotated the %s key: root version %d", role, result["root_version"])
    return {"role": role, "keyid": key_id(new), "revoked": key_id(old) if old else None,
            "root_version": result["root_version"]}


def renew_root(ring: KeyRing, before: float, now: float | None = None) -> dict[str, Any] | None:
    """With the root key online and the root expiring before ``before``: root version N+1 with the same keys and a
    fresh expiry. None when not due or not held."""
    with ring.lock:  # checked under the lock: two passes at once renew once
        if not ring.holds("root") or ring.root.expires >= before:
            return None
        envelope = add_signatures({"signed": next_root_body(ring), "signatures": []}, [ring.key("root")])
        return publish_root(ring, envelope, now)


def _dir(ring: KeyRing) -> Path:
    if ring.keys_dir is None:
        raise Invalid("this key ring has no directory to write to")
    return ring.keys_dir

