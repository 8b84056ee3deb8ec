"""Keeping the hub's signed documents alive: renew what it can sign, warn about what it cannot.

Everything signed expires (a freeze attack is bounded by it). Each maintenance pass renews
the root when the hub holds the root key and fewer than ``ROOT_RENEW_BEFORE_S`` remain, desired
states and releases past half their lifetime, and the release policy likewise. What it cannot
renew (an offline root, a release role held by CI) is logged as a warning, then as an error once
expired; ``edgefleet_key_expiry_seconds{role}`` on /metrics shows the time left either way.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from hub.audit import record
from hub.trust.root_admin import renew_root

if TYPE_CHECKING:
    from hub.context import Hub

log = logging.getLogger("edgefleet.hub.renewal")

ROOT_RENEW_BEFORE_S = 60 * 86400  # renew (or start warning about) a root with less than this left
WARN_BEFORE_S = 30 * 86400  # warn about releases or a policy the hub cannot re-sign with less than this left


def key_expiry(hub: Hub, now: float | None = None) -> dict[str, float]:
    """Seconds until the earliest expiry among what each role signs (negative: expired). Absent: nothing signed."""
    now = time.time() if now is None else now
    out = {"root": hub.keys.root.expires - now}
    releases = [env["signed"]["expires"] for env in hub.modules.envelopes() if env["signatures"]]
    policy = hub.policies.envelope()
    if policy is not None:
        releases.append(policy["signed"]["expires"])
    if releases:
        out["release"] = min(releases) - now
    director = hub.db.scalar("SELECT min(desired_expires) FROM devices WHERE desired_expires IS NOT NULL")
    if director is not None:
        out["director"] = director - now
    return out


def trust_status(hub: Hub, now: float | None = None) -> dict[str, Any]:
    """Which roles the hub holds, what expires when, and the problems an operator must act on."""
    expiry = key_expiry(hub, now)
    problems = []
    root_left = expiry["root"]
    if root_left <= 0:
        problems.append(f"root version {hub.keys.root.version} has expired: devices refuse new states until a newer "
                        "root is published" + ("" if hub.keys.holds("root") else " (sign one offline: keys sign-root)"))
    elif root_left < ROOT_RENEW_BEFORE_S and not hub.keys.holds("root"):
        problems.append(f"root version {hub.keys.root.version} expires in {root_left / 86400:.0f} days and the root "
                        "key is offline: sign and publish version "
                        f"{hub.keys.root.version + 1} (keys rotate root --prepare, keys sign-root, keys publish-root)")
    for role in ("release", "director"):
        left = expiry.get(role)
        if left is not None and left < WARN_BEFORE_S and not hub.keys.holds(role):
            problems.append(f"{role} signatures expire in {left / 86400:.1f} days and the hub does not hold the "
                            f"{role} key")
    return {"root_version": hub.keys.root.version, "held": sorted(r for r in ("root", "release", "director")
                                                                   if hub.keys.holds(r)),
            "pending": sorted(hub.keys.pending), "expires_in_s": expiry, "degraded": root_left <= 0,
            "problems": problems}


def maintain(hub: Hub, now: float | None = None) -> dict[str, int]:
    """One maintenance pass; every step is tried even if another fails."""
    now = time.time() if now is None else now
    done = {"root": 0, "director": 0, "release": 0, "policy": 0}
    try:
        renewed = renew_root(hub.keys, now + ROOT_RENEW_BEFORE_S, now)
        if renewed is not None:
            done["root"] = 1
            record(hub.db, "hub", "root.renewed", str(renewed["root_version"]), expires=renewed["expires"])
            hub.after_root_change()
    except Exception:
        log.exception("renewing the root failed")
    try:
        done["director"] = hub.director.renew_expiring() if hub.keys.holds("director") else 0
    except Exception:
        log.exception("renewing desired states failed")
    try:  # releases expire too (freeze protection): re-sign those past half their lifetime
        done["release"] = hub.modules.resign(before=now + hub.config.release_ttl_s / 2)
    except Exception:
        log.exception("renewing release signatures failed")
    try:
        if hub.policies.renew(before=now + hub.config.release_ttl_s / 2):
            done["policy"] = 1
    except Exception:
        log.exception("renewing the release policy failed")
    for problem in trust_status(hub, now)["problems"]:
        (log.error if "expired" in problem else log.warning)("%s", problem)
    return done
