"""Release revocation on the hub: the signed release policy (protocol/policy.py) and its versions.

The hub signs a new policy version with its release key when it holds one; otherwise the policy
is signed where the release key lives (CI, ``edgefleet module revoke --key``) and uploaded, and the
hub only checks it as a device would. The director embeds the current envelope in every state.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from hub.audit import record
from hub.errors import Conflict, Invalid, NotFound
from hub.rollout.rollout_states import HOLDING
from hub.store import Database, dumps, loads, now
from hub.trust.keys import KeyRing
from protocol.encoding import ProtocolError, digest_of
from protocol.policy import ReleasePolicy, accept_policy, renewed, revoke
from protocol.schema import validate
from protocol.signing import sign
from protocol.trust import signed_by

log = logging.getLogger("edgefleet.hub.release_policy")

class ReleasePolicies:
    def __init__(self, db: Database, keys: KeyRing, ttl_s: int) -> None:
        self.db, self.keys, self.ttl_s = db, keys, ttl_s
        self.on_change: Callable[[], Any] = lambda: None  # the hub re-signs desired states (they embed the policy)
        self._cached: tuple[int | None, dict[str, Any] | None] | None = None  # (version, envelope)

    def envelope(self) -> dict[str, Any] | None:
        """The current signed policy, or None before the first revocation."""
        # the version is read each time (one index lookup): another hub replica may have published a newer one
        version = self.db.scalar("SELECT max(version) FROM release_policies")
        if self._cached is None or self._cached[0] != version:
            row = self.db.one("SELECT envelope FROM release_policies WHERE version = ?", (version,))
            self._cached = (version, loads(row["envelope"]) if row else None)
        return self._cached[1]

    def current(self) -> ReleasePolicy | None:
        env = self.envelope()
        return validate(ReleasePolicy, env["signed"]) if env else None

    def refusal(self, name: str, version: int) -> str | None:
        """Why ``name:version`` may not be deployed, or None."""
        policy = self.current()
        return policy.refusal(name, version) if policy else None

    def draft_revoke(self, name: str, version: int, and_older: bool = False) -> dict[str, Any]:
        """The next policy version with ``name:version`` revoked, unsigned (to sign where the release key is)."""
        if self.db.one("SELECT 1 FROM modules WHERE name = ? AND version = ?", (name, version)) is None:
            raise NotFound(f"module {name}:{version} does not exist")
        users = self._deployed(name, version, and_older)
        if users:
            raise Conflict(f"module {name}:{version}{' or older' if and_older else ''} is deployed by "
                           f"{', '.join(users)}: deploy another version (or delete the deployment) first")
        return revoke(self.current(), name, version, int(time.time()) + self.ttl_s, and_older).to_dict()

    def revoke(self, name: str, version: int, and_older: bool = False, actor: str = "") -> dict[str, Any]:
        """Revoke ``name:version`` (and older) with the hub's release key: a new policy version."""
        envelope = sign(self.draft_revoke(name, version, and_older), [self.keys.key("release")])
        return self._store(envelope, actor, f"{name}:{version}")

    def publish(self, envelope: Any, actor: str = "") -> dict[str, Any]:
        """Store a policy signed elsewhere, after the checks a device makes (and a strictly newer version)."""
        current = self.envelope()
        try:
            policy = accept_policy(envelope, self.keys.root, self.current(),
                                   digest_of(current["signed"]) if current else None)
        except ProtocolError as exc:
            raise Invalid(f"release policy refused: {exc}") from None
        if current is not None and policy.version == current["signed"]["version"]:
            raise Conflict(f"release policy version {policy.version} is already the current one")
        for name, rule in policy.modules.items():
            for version in [*rule.revoked, *range(1, rule.min_version)]:
                users = self._deployed(name, version, False)
                if users:
                    raise Conflict(f"the policy revokes {name}:{version}, deployed by {', '.join(users)}")
        return self._store(envelope, actor, "upload")

    def renew(self, before: float) -> bool:
        """Re-sign (as a new version) when the policy expires before ``before`` or the root no longer trusts its
        signer; False when there is nothing to do or the release key is not held (then a warning is logged)."""
        env = self.envelope()
        if env is None or (env["signed"]["expires"] >= before and signed_by(self.keys.root, env, "release")):
            return False
        if not self.keys.holds("release"):
            log.warning("release policy version %d needs re-signing (expires %d) but the release key is held "
                        "elsewhere: sign a new version there", env["signed"]["version"], env["signed"]["expires"])
            return False
        fresh = renewed(validate(ReleasePolicy, env["signed"]), int(time.time()) + self.ttl_s)
        self._store(sign(fresh.to_dict(), [self.keys.key("release")]), "hub", "renewal")
        return True

    def _store(self, envelope: dict[str, Any], actor: str, what: str) -> dict[str, Any]:
        version = envelope["signed"]["version"]
        with self.db.transaction() as tx:
            tx.execute("INSERT INTO release_policies (version, envelope, created_at, created_by) VALUES (?, ?, ?, ?)",
                       (version, dumps(envelope), now(), actor))
            record(self.db, actor, "release_policy.published", what, version=version)
        self._cached = None
        log.warning("release policy version %d published (%s)", version, what)
        self.on_change()
        return {"version": version, "expires": envelope["signed"]["expires"], "modules": envelope["signed"]["modules"]}

    def _deployed(self, name: str, version: int, and_older: bool) -> list[str]:
        """Active deployments whose stable revision, or a live rollout's, runs ``name:version`` (or older)."""
        holding = ",".join(f"'{s}'" for s in sorted(HOLDING))
        op = "<=" if and_older else "="
        rows = self.db.query(
            "SELECT DISTINCT r.deployment FROM deployment_revisions r JOIN deployments d ON d.name = r.deployment"
            f" WHERE d.active = 1 AND r.module_name = ? AND r.module_version {op} ? AND (r.revision = d.stable_revision"
            f" OR r.revision IN (SELECT revision FROM rollouts o WHERE o.deployment = d.name AND o.state IN ({holding})))"
            " ORDER BY r.deployment", (name, version))
        return [r["deployment"] for r in rows]
