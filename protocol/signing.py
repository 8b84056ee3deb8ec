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

    def check_signatures(self, envelope: Any, role: str) -> dict[str, Any]:
        """Return ``envelope["signed"]`` if ``role``'s threshold of distinct keys signed it (expiry not judged)."""
        signed = check_envelope(envelope)
        keyids, threshold = self.roles[role]
        verified_by = _verified_keyids(envelope, {k: self.keys[k] for k in keyids if k in self.keys})
        if len(verified_by) < threshold:
            known = {s.get("keyid") for s in envelope["signatures"] if isinstance(s, dict)} & set(keyids)
            bad = sorted(known - verified_by)
            why = ("signed by a key the root does not trust for this role" if not known else
                   f"bad signature by key {bad[0][:12]}…" if bad else "too few of the role's keys signed")
            raise SignatureError(f"{role} signature check failed: {len(verified_by)} of {threshold} required ({why})")
        return signed

    def verify(self, envelope: Any, role: str, now: float | None = None) -> dict[str, Any]:
        """Return ``envelope["signed"]`` if ``role``'s threshold of keys signed it and it has not expired."""
        signed = self.check_signatures(envelope, role)
        expires = signed.get("expires")
        if not isinstance(expires, int) or isinstance(expires, bool):
            raise SignatureError(f"{role} document has no integer 'expires'")
        if expires <= (time.time() if now is None else now):
            raise SignatureError(f"{role} document expired at {expires} (freeze attack or stale document)")
        return signed

    def expired(self, now: float | None = None) -> bool:
        """Whether this root is past its own ``expires`` (judged only after the whole chain, TUF §5.3.10)."""
        return self.expires <= (time.time() if now is None else now)


def check_envelope(envelope: Any) -> dict[str, Any]:
    if not isinstance(envelope, dict) or not isinstance(envelope.get("signed"), dict):
        raise SignatureError("not a signed envelope: want {'signed': {...}, 'signatures': [...]}")
    if not isinstance(envelope.get("signatures"), list) or not envelope["signatures"]:
        raise SignatureError("envelope has no signatures")
    return envelope["signed"]


def _verified_keyids(envelope: dict[str, Any], trusted: dict[str, str]) -> set[str]:
    """The trusted key ids with a valid signature; one public key counts once, whatever ids it is listed under."""
    body = canonical_json(envelope["signed"])
    good: dict[str, str] = {}  # public key -> key id: a key listed twice must not meet a threshold of two
    for entry in envelope["signatures"]:
        if not isinstance(entry, dict):
            continue
        kid, sig = entry.get("keyid"), entry.get("sig")
        if kid not in trusted or not isinstance(sig, str) or trusted[kid] in good:
            continue
        try:
            Ed25519PublicKey.from_public_bytes(bytes.fromhex(trusted[kid])).verify(bytes.fromhex(sig), body)
        except (InvalidSignature, ValueError):
            continue
        good[trusted[kid]] = kid
    return set(good.values())


ROOT_LIFETIME_S = 365 * 86400
AnyKey = Ed25519PrivateKey | Ed25519PublicKey | str  # a key, or its public half as hex


def root_body(role_keys: dict[str, list[AnyKey]], version: int = 1, expires: int | None = None,
              thresholds: dict[str, int] | None = None) -> dict[str, Any]:
    """The ``signed`` part of a root listing ``role_keys`` (private, public or public-hex keys) per role."""
    keys: dict[str, dict[str, str]] = {}
    roles: dict[str, dict[str, Any]] = {}
    for role in ROLES:
        publics = sorted({k if isinstance(k, str) else public_hex(k) for k in role_keys[role]})
        for pub in publics:
            keys[sha256_hex(bytes.fromhex(pub))] = {"keytype": "ed25519", "public": pub}
        roles[role] = {"keyids": sorted(sha256_hex(bytes.fromhex(p)) for p in publics),
                       "threshold": (thresholds or {}).get(role, 1)}
    return {"type": "root", "v": 1, "version": version,
            "expires": expires if expires is not None else int(time.time()) + ROOT_LIFETIME_S,
            "keys": keys, "roles": roles}


def make_root(
    role_keys: dict[str, list[AnyKey]],
    signers: list[Ed25519PrivateKey],
    version: int = 1,
    expires: int | None = None,
    thresholds: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Build and sign a root envelope. ``signers`` are root keys (old and new ones when rotating)."""
    return sign(root_body(role_keys, version, expires, thresholds), signers)


def add_signatures(envelope: dict[str, Any], keys: list[Ed25519PrivateKey]) -> dict[str, Any]:
    """``envelope`` with signatures by ``keys`` added (a key that already signed is not added twice)."""
    signed = check_envelope(envelope) if envelope.get("signatures") else envelope["signed"]
    fresh = sign(signed, keys)["signatures"]
    have = {s.get("keyid") for s in envelope.get("signatures", []) if isinstance(s, dict)}
    return {"signed": signed, "signatures": [*envelope.get("signatures", []),
                                             *(s for s in fresh if s["keyid"] not in have)]}


def role_publics(root: Root, role: str) -> list[str]:
    """The public keys (hex) ``root`` lists for ``role``."""
    return [root.keys[k] for k in root.roles[role][0]]


def _parse_root(envelope: Any) -> Root:
    signed = check_envelope(envelope)
    try:
        if signed["type"] != "root":
            raise SignatureError(f"expected a root document, got type {signed['type']!r}")
        keys = {kid: _checked_key(kid, entry) for kid, entry in signed["keys"].items()}
        roles = {r: _checked_role(r, signed["roles"][r], keys) for r in ROLES}
        version, expires = signed["version"], signed["expires"]
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise SignatureError(f"malformed root document: {exc!r}") from None
    for name, value in (("version", version), ("expires", expires)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SignatureError(f"malformed root document: {name} {value!r} is not a positive integer")
    return Root(version, expires, keys, roles, envelope)


def _checked_key(kid: Any, entry: Any) -> str:
    """The public key (hex) of one ``keys`` entry; its id must be the sha256 of the key (no key id confusion)."""
    if not isinstance(entry, dict) or entry.get("keytype") != "ed25519":
        raise SignatureError(f"root key {str(kid)[:12]}… is not an ed25519 key entry")
    public = entry.get("public")
    try:
        raw = bytes.fromhex(public) if isinstance(public, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != 32 or public != raw.hex():
        raise SignatureError(f"root key {str(kid)[:12]}… has no 32-byte lowercase-hex public key")
    if kid != sha256_hex(raw):
        raise SignatureError(f"root lists key id {str(kid)[:12]}… that is not the sha256 of its public key "
                             f"({sha256_hex(raw)[:12]}…): refused (one key under two ids would count twice)")
    return public


def _checked_role(role: str, entry: Any, keys: dict[str, str]) -> tuple[list[str], int]:
    keyids, threshold = entry["keyids"], entry["threshold"]
    if not isinstance(keyids, list) or not all(isinstance(k, str) for k in keyids) or len(set(keyids)) != len(keyids):
        raise SignatureError(f"root role {role!r}: keyids must be a list of distinct key ids")
    unknown = [k for k in keyids if k not in keys]
    if unknown:
        raise SignatureError(f"root role {role!r} names key {unknown[0][:12]}… that the root does not list")
    if not isinstance(threshold, int) or isinstance(threshold, bool) or not 1 <= threshold <= len(keyids):
        raise SignatureError(f"root role {role!r}: threshold {threshold!r} must be between 1 and its "
                             f"{len(keyids)} key(s)")
    return list(keyids), threshold


def load_trusted_root(envelope: Any) -> Root:
    """Load a pinned (or first-use) root: signed by its own root role. Expiry is NOT judged here (TUF §5.2):
    a device with an expired root must still be able to walk to a newer one; see ``Root.expired``."""
    root = _parse_root(envelope)
    root.check_signatures(envelope, "root")
    return root


def update_root(current: Root, envelope: Any, now: float | None = None) -> Root:
    """Accept a newer root only if a threshold of the current root's root keys AND of its own root keys sign it.

    Expiry is not judged (an intermediate root of a chain may have expired, TUF §5.3.4-10): judge the
    final root with ``Root.expired``. ``now`` is accepted for older callers and unused.
    """
    del now
    new = _parse_root(envelope)
    current.check_signatures(envelope, "root")  # the old keys vouch for the new root
    new.check_signatures(envelope, "root")  # and the new root can sign for itself
    if new.version <= current.version:
        raise SignatureError(f"root version {new.version} is not newer than the trusted {current.version} (rollback)")
    return new


def parse_envelope(payload: bytes) -> Any:
    return parse_json(payload, MAX_ENVELOPE_BYTES)
