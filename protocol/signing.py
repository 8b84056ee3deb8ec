"""Ed25519 signatures over canonical JSON, and the root of trust that names the keys.

Documents travel as envelopes ``{"signed": {...}, "signatures": [{"keyid", "sig"}]}``
in the manner of TUF. The root document lists keys and, per role, which keys may
sign and how many must (threshold). Roles:

* ``root``     signs new roots (rotation, revocation);
* ``release``  signs bundle manifests (the image side);
* ``director`` signs per-device desired states.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol.encoding import ProtocolError, canonical_json, parse_json, sha256_hex

ROLES = ("root", "release", "director")
MAX_ENVELOPE_BYTES = 512 * 1024


class SignatureError(ProtocolError):
    """Signature, key, threshold or expiry check failed."""


def public_hex(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def key_id(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    return sha256_hex(bytes.fromhex(public_hex(key)))


def private_hex(key: Ed25519PrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    ).hex()


def load_private(hex_text: str) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(hex_text.strip()))


def sign(signed: dict[str, Any], keys: list[Ed25519PrivateKey]) -> dict[str, Any]:
    """Wrap ``signed`` in an envelope signed by each of ``keys``."""
    body = canonical_json(signed)
    return {"signed": signed, "signatures": [{"keyid": key_id(k), "sig": k.sign(body).hex()} for k in keys]}


@dataclass(frozen=True)
class Root:
    """A verified root document."""

    version: int
    expires: int
    keys: dict[str, str]  # keyid -> public key hex
    roles: dict[str, tuple[list[str], int]]  # role -> (keyids, threshold)
    document: dict[str, Any]  # the whole envelope, as pinned on devices

    def verify(self, envelope: Any, role: str, now: float | None = None) -> dict[str, Any]:
        """Return ``envelope["signed"]`` if ``role``'s threshold of keys signed it and it has not expired."""
        signed = check_envelope(envelope)
        keyids, threshold = self.roles[role]
        verified_by = _verified_keyids(envelope, {k: self.keys[k] for k in keyids if k in self.keys})
        if len(verified_by) < threshold:
            known = {s.get("keyid") for s in envelope["signatures"] if isinstance(s, dict)}
            why = "signed by a key the root does not trust for this role" if not known & set(keyids) else "bad signature"
            raise SignatureError(f"{role} signature check failed: {len(verified_by)} of {threshold} required ({why})")
        expires = signed.get("expires")
        if not isinstance(expires, int):
            raise SignatureError(f"{role} document has no integer 'expires'")
        if expires <= (time.time() if now is None else now):
            raise SignatureError(f"{role} document expired at {expires} (freeze attack or stale document)")
        return signed


def check_envelope(envelope: Any) -> dict[str, Any]:
    if not isinstance(envelope, dict) or not isinstance(envelope.get("signed"), dict):
        raise SignatureError("not a signed envelope: want {'signed': {...}, 'signatures': [...]}")
    if not isinstance(envelope.get("signatures"), list) or not envelope["signatures"]:
        raise SignatureError("envelope has no signatures")
    return envelope["signed"]


def _verified_keyids(envelope: dict[str, Any], trusted: dict[str, str]) -> set[str]:
    body = canonical_json(envelope["signed"])
    good: set[str] = set()
    for entry in envelope["signatures"]:
        if not isinstance(entry, dict):
            continue
        kid, sig = entry.get("keyid"), entry.get("sig")
        if kid not in trusted or not isinstance(sig, str):
            continue
        try:
            Ed25519PublicKey.from_public_bytes(bytes.fromhex(trusted[kid])).verify(bytes.fromhex(sig), body)
        except (InvalidSignature, ValueError):
            continue
        good.add(kid)
    return good


def make_root(
    role_keys: dict[str, list[Ed25519PrivateKey]],
    signers: list[Ed25519PrivateKey],
    version: int = 1,
    expires: int | None = None,
    thresholds: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Build and sign a root envelope. ``signers`` are root keys (old and new ones when rotating)."""
    keys: dict[str, dict[str, str]] = {}
    roles: dict[str, dict[str, Any]] = {}
    for role in ROLES:
        members = role_keys[role]
        for k in members:
            keys[key_id(k)] = {"keytype": "ed25519", "public": public_hex(k)}
        roles[role] = {"keyids": sorted(key_id(k) for k in members), "threshold": (thresholds or {}).get(role, 1)}
    signed = {
        "type": "root",
        "v": 1,
        "version": version,
        "expires": expires if expires is not None else int(time.time()) + 365 * 86400,
        "keys": keys,
        "roles": roles,
    }
    return sign(signed, signers)


def _parse_root(envelope: Any) -> Root:
    signed = check_envelope(envelope)
    try:
        if signed["type"] != "root":
            raise SignatureError(f"expected a root document, got type {signed['type']!r}")
        keys = {kid: entry["public"] for kid, entry in signed["keys"].items()}
        roles = {r: (list(signed["roles"][r]["keyids"]), int(signed["roles"][r]["threshold"])) for r in ROLES}
        version, expires = int(signed["version"]), int(signed["expires"])
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise SignatureError(f"malformed root document: {exc!r}") from None
    if any(t < 1 for _, t in roles.values()):
        raise SignatureError("root document has a threshold below 1")
    return Root(version, expires, keys, roles, envelope)


def load_trusted_root(envelope: Any, now: float | None = None) -> Root:
    """Trust a root on first use (enrolment): it must be signed by its own root role."""
    root = _parse_root(envelope)
    root.verify(envelope, "root", now)
    return root


def update_root(current: Root, envelope: Any, now: float | None = None) -> Root:
    """Accept a new root only if the current root's and the new root's root keys both sign it, version+1 or more."""
    new = _parse_root(envelope)
    current.verify(envelope, "root", now=0)  # old keys vouch for the new root (expiry judged on the new one)
    new.verify(envelope, "root", now)
    if new.version <= current.version:
        raise SignatureError(f"root version {new.version} is not newer than the trusted {current.version} (rollback)")
    return new


def parse_envelope(payload: bytes) -> Any:
    return parse_json(payload, MAX_ENVELOPE_BYTES)
