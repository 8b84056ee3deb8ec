"""Device-side acceptance checks, pure: what a device must refuse before it acts."""

from __future__ import annotations

import time
from typing import Any

from protocol.encoding import ProtocolError, canonical_json, sha256_hex
from protocol.manifest import Manifest, parse_manifest
from protocol.messages import DesiredState, validate
from protocol.signing import Root

# A desired state may be valid for at most this long: a leaked director key's states die within it.
MAX_DESIRED_LIFETIME_S = 31 * 86400


def accept_desired(
    envelope: Any, root: Root, device_id: str, last_revision: int, now: float | None = None
) -> DesiredState:
    """Verify a desired-state envelope for this device: signature, expiry (and its bound), device, revision."""
    now = time.time() if now is None else now
    signed = root.verify(envelope, "director", now)
    state = validate(DesiredState, signed)
    if state.expires > now + MAX_DESIRED_LIFETIME_S:
        raise ProtocolError(f"desired state expires at {state.expires}, more than {MAX_DESIRED_LIFETIME_S} s after "
                            f"now ({int(now)}): beyond the maximum lifetime (a leaked key, or a wrong clock)")
    if state.device != device_id:
        raise ProtocolError(f"desired state is for device {state.device!r}, not {device_id!r} (replay across devices)")
    if state.revision <= last_revision:
        raise ProtocolError(f"desired revision {state.revision} is not newer than applied {last_revision} (rollback/replay)")
    return state


def accept_manifest(
    envelope: Any, root: Root, expected_digest: str, name: str, min_version: int = 0, now: float | None = None
) -> Manifest:
    """Verify a signed bundle manifest against the digest and name the desired state asked for."""
    signed = root.verify(envelope, "release", now)
    if signed.get("type") != "release" or not isinstance(signed.get("manifest"), dict):
        raise ProtocolError("release document has no manifest")
    digest = sha256_hex(canonical_json(signed["manifest"]))
    if digest != expected_digest or signed.get("bundle") != digest:
        raise ProtocolError(
            f"manifest digest {digest[:12]}… does not match the requested bundle {expected_digest[:12]}… (mix-and-match)"
        )
    manifest = parse_manifest(signed["manifest"])
    if manifest.name != name:
        raise ProtocolError(f"manifest is for module {manifest.name!r}, not {name!r} (mix-and-match)")
    if manifest.version < min_version:
        raise ProtocolError(f"bundle version {manifest.version} is older than installed {min_version} (rollback)")
    return manifest
