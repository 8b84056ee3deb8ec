"""What a device trusts, and every decision it makes with it: a pure verifier in the manner of python-tuf's
``TrustedMetadataSet``. The caller does the I/O: it feeds documents in and persists what changed.

State: the trusted root, the applied desired state (whose revision is the floor), the newest
release policy and the last refused desired state (re-checked after each root update).

Rules (docs/protocol.md §7a):

* The pinned root is loaded without judging its expiry (TUF §5.2). Newer roots are applied one
  version at a time, each signed by a threshold of the trusted root's root keys and of its own.
  Expiry is judged on the root reached, before every desired state and release: an expired root
  refuses new states (the caller keeps running what it has and reports why) until a newer root comes.
* The revision floor is the revision of the applied state *while the trusted root still accepts
  that state's signatures*. A root that drops the key(s) that signed it (director rotation after a
  leak) resets the floor to 0: TUF's fast-forward recovery (§5.3.11). The same holds for the
  release policy's version floor and the release role.
* A desired state may not be valid for more than ``MAX_DESIRED_LIFETIME_S``: a leaked director key's
  states die within that bound, and the hub re-signs well before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from protocol.encoding import ProtocolError, digest_of
from protocol.manifest import Manifest
from protocol.messages import DesiredState, validate
from protocol.policy import ReleasePolicy, accept_policy
from protocol.signing import Root, SignatureError, load_trusted_root, update_root
from protocol.verify import MAX_DESIRED_LIFETIME_S, accept_desired, accept_manifest

__all__ = ["MAX_DESIRED_LIFETIME_S", "RootUpdate", "TrustState", "signed_by"]


@dataclass(frozen=True)
class RootUpdate:
    """One root version applied. ``floor_reset``: the applied desired state no longer verifies (fast-forward
    recovery), so any newer revision is accepted again. ``policy_reset``: the same for the release policy."""

    root: Root
    floor_reset: bool
    policy_reset: bool


def signed_by(root: Root, envelope: Any, role: str) -> bool:
    """Whether ``root`` accepts ``envelope``'s signatures for ``role`` (expiry not judged)."""
    try:
        root.check_signatures(envelope, role)
    except SignatureError:
        return False
    return True


class TrustState:
    """A device's trust, in memory. Persist ``root.document``, ``applied`` and ``policy_envelope`` after changes."""

    def __init__(self, root_envelope: Any, applied: Any | None = None, policy: Any | None = None) -> None:
        self.root: Root = load_trusted_root(root_envelope)  # §5.2: signatures only, no expiry
        self.applied: Any | None = applied  # envelope of the desired state last accepted
        self.refused: Any | None = None  # the last refused desired envelope, re-checked after a root update
        self.policy_envelope: Any | None = policy
        self.policy: ReleasePolicy | None = None
        if policy is not None and signed_by(self.root, policy, "release"):
            self.policy = validate(ReleasePolicy, policy["signed"])
        elif policy is not None:
            self.policy_envelope = None

    # --- roots ---------------------------------------------------------------------------------

    @property
    def floor(self) -> int:
        """Revisions at or below this are refused: the applied state's, unless the root no longer trusts its signer."""
        if self.applied is None or not signed_by(self.root, self.applied, "director"):
            return 0
        revision = self.applied["signed"].get("revision", 0)
        return revision if isinstance(revision, int) else 0

    def expired(self, now: float) -> bool:
        return self.root.expired(now)

    def update_root(self, envelope: Any) -> RootUpdate:
        """Apply root version N+1 (exactly: a skipped version is refused, the chain must be walked)."""
        new = update_root(self.root, envelope)
        if new.version != self.root.version + 1:
            raise SignatureError(f"root version {new.version} does not follow the trusted {self.root.version}: "
                                 f"apply version {self.root.version + 1} first")
        floor_before = self.floor
        self.root = new
        floor_reset = floor_before > 0 and self.floor == 0
        policy_reset = self.policy_envelope is not None and not signed_by(new, self.policy_envelope, "release")
        if policy_reset:  # signed by a revoked release key: it no longer counts, in either direction
            self.policy, self.policy_envelope = None, None
        return RootUpdate(new, floor_reset, policy_reset)

    def update_roots(self, pending: dict[int, Any]) -> tuple[list[RootUpdate], dict[int, str]]:
        """Apply every consecutive version in ``pending`` after the trusted one; removes what it handled.

        Returns the updates made and, per refused version, why (a refused version stops the walk
        until a valid copy of it arrives).
        """
        applied: list[RootUpdate] = []
        refused: dict[int, str] = {}
        for version in [v for v in pending if v <= self.root.version]:
            del pending[version]
        while (nxt := self.root.version + 1) in pending:
            envelope = pending.pop(nxt)
            try:
                version = envelope["signed"]["version"] if isinstance(envelope, dict) else None
                if version != nxt:
                    raise ProtocolError(f"root offered as version {nxt} is version {version!r}")
                applied.append(self.update_root(envelope))
            except (ProtocolError, TypeError, KeyError) as exc:
                refused[nxt] = str(exc)
                break
        return applied, refused

    # --- desired states ------------------------------------------------------------------------

    def accept_desired(self, envelope: Any, device_id: str, now: float) -> DesiredState:
        """Verify a desired state for this device; on success it becomes the applied one, else the refused one."""
        try:
            state = self._check_desired(envelope, device_id, now)
        except ProtocolError:
            self.refused = envelope
            raise
        self.applied, self.refused = envelope, None
        return state

    def recheck(self, device_id: str, now: float) -> DesiredState | None:
        """After a root update: the refused state, if it is now accepted (else None, and it stays refused)."""
        if self.refused is None:
            return None
        try:
            return self.accept_desired(self.refused, device_id, now)
        except ProtocolError:
            return None

    def _check_desired(self, envelope: Any, device_id: str, now: float) -> DesiredState:
        self._check_root_current(now)
        state = accept_desired(envelope, self.root, device_id, self.floor, now)
        policy, policy_envelope = self.policy, self.policy_envelope
        if state.policy is not None:
            policy = accept_policy(state.policy, self.root, self.policy,
                                   digest_of(self.policy_envelope["signed"]) if self.policy_envelope else None, now)
            policy_envelope = state.policy
        for module in state.modules:
            versions = [module.version] + ([module.shadow.version] if module.shadow else [])
            why = next((w for v in versions if (w := policy.refusal(module.name, v))), None) if policy else None
            if why:
                raise ProtocolError(why)
        self.policy, self.policy_envelope = policy, policy_envelope
        return state

    def _check_root_current(self, now: float) -> None:
        if self.root.expired(now):
            raise ProtocolError(f"trusted root version {self.root.version} expired at {self.root.expires} "
                                f"(now {int(now)}): new states are refused until a newer root arrives")

    # --- releases ------------------------------------------------------------------------------

    def accept_release(self, envelope: Any, expected_digest: str, name: str, installed_version: int,
                       now: float) -> Manifest:
        """A bundle's release envelope, as for ``protocol.verify.accept_manifest`` plus root expiry and policy."""
        self._check_root_current(now)
        manifest = accept_manifest(envelope, self.root, expected_digest, name, installed_version, now)
        why = self.policy.refusal(manifest.name, manifest.version) if self.policy else None
        if why:
            raise ProtocolError(why)
        return manifest
