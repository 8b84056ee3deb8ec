"""The release policy: which module versions are revoked, and each module's minimum version (anti-rollback).

Signed by the ``release`` role (what may run), not by the online ``director`` (what should run
now), so a leaked director key cannot send a device back to a revoked version. The director
embeds the newest policy envelope in every desired state; a device keeps the newest one it has
verified and refuses any state or release that the policy forbids.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta

from protocol.encoding import ProtocolError, digest_of
from protocol.schema import SCHEMA_VERSION, Schema, validate
from protocol.signing import Root

MAX_POLICY_MODULES = 4096
MAX_REVOKED_PER_MODULE = 4096


class ModulePolicy(Schema, frozen=True, kw_only=True):
    min_version: Annotated[int, Meta(ge=0)] = 0  # versions below it may not be installed
    revoked: Annotated[list[Annotated[int, Meta(ge=1)]], Meta(max_length=MAX_REVOKED_PER_MODULE)] = []


class ReleasePolicy(Schema, frozen=True, kw_only=True):
    """The ``signed`` part of a release-policy envelope (release role)."""

    type: Literal["release-policy"] = "release-policy"
    v: Literal[1] = SCHEMA_VERSION
    version: Annotated[int, Meta(ge=1)]  # never decreases; a device refuses an older one (rollback of revocations)
    expires: Annotated[int, Meta(ge=0)]
    modules: Annotated[dict[Annotated[str, Meta(min_length=1, max_length=64)], ModulePolicy],
                       Meta(max_length=MAX_POLICY_MODULES)] = {}

    def refusal(self, name: str, version: int) -> str | None:
        """Why ``name:version`` may not be installed under this policy, or None if it may."""
        rule = self.modules.get(name)
        if rule is None:
            return None
        if version in rule.revoked:
            return f"module {name} version {version} is revoked by release policy version {self.version}"
        if version < rule.min_version:
            return (f"module {name} version {version} is below the minimum {rule.min_version} set by release policy "
                    f"version {self.version} (rollback)")
        return None


def revoke(current: ReleasePolicy | None, name: str, version: int, expires: int, and_older: bool = False
           ) -> ReleasePolicy:
    """The next policy version: ``name:version`` revoked (and, with ``and_older``, every version below it)."""
    modules = dict(current.modules) if current else {}
    rule = modules.get(name, ModulePolicy())
    revoked = sorted({*rule.revoked, version})
    minimum = max(rule.min_version, version + 1) if and_older else rule.min_version
    # versions under the minimum need no entry of their own
    modules[name] = ModulePolicy(min_version=minimum, revoked=[v for v in revoked if v >= minimum])
    return ReleasePolicy(version=(current.version if current else 0) + 1, expires=expires, modules=modules)


def renewed(current: ReleasePolicy, expires: int) -> ReleasePolicy:
    """The same rules as a new version with a later expiry (re-signing keeps the version floor moving up)."""
    return ReleasePolicy(version=current.version + 1, expires=expires, modules=current.modules)


def accept_policy(envelope: Any, root: Root, trusted: ReleasePolicy | None, trusted_digest: str | None,
                  now: float | None = None) -> ReleasePolicy:
    """Verify a release-policy envelope: release-role signatures, not expired, not older than the trusted one."""
    signed = root.verify(envelope, "release", now)
    if signed.get("type") != "release-policy":
        raise ProtocolError(f"expected a release-policy document, got type {signed.get('type')!r} (role confusion)")
    policy = validate(ReleasePolicy, signed)
    if trusted is not None:
        if policy.version < trusted.version:
            raise ProtocolError(f"release policy version {policy.version} is older than the trusted "
                                f"{trusted.version} (rollback of revocations)")
        if policy.version == trusted.version and digest_of(signed) != trusted_digest:
            raise ProtocolError(f"a second, different release policy version {policy.version}")
    return policy
