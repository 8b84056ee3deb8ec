"""The agent core's device rules (docs/protocol.md §7a/§7b), pure: an expired root, the revision floor and
its reset on director rotation, the release policy, and what is flagged but kept running."""

from __future__ import annotations

import pytest

from agent.reconcile import ModuleFacts, Refused, RootTrusted, Trust, step
from tests.test_agent_reconcile import DEVICE, NOW, Repo, X, Y, kinds, module

# --- device rules (protocol.md §7a/§7b) ---------------------------------------------------------


def test_an_expired_root_refuses_new_states_until_the_next_root_then_applies_the_held_one():
    repo = Repo()
    repo.roots[1] = repo._root(1, expires=NOW - 10)  # the pinned root has expired on the shelf
    trust = repo.trust()
    assert trust.warnings(NOW) == [trust._root_expired(NOW)]  # flagged before any state comes
    [refused] = trust.on_desired(repo.desired(1, [module()]), NOW)
    assert isinstance(refused, Refused) and refused.reason.startswith("root expired")
    assert trust.desired is None and trust.desired_error.startswith("root expired")
    assert trust.warnings(NOW) == []  # the refusal already says it, once
    version = repo.renew_root(NOW + 86_400)
    events = trust.on_root(version, repo.root(version), NOW)
    assert kinds(events) == ["RootTrusted", "Accepted"] and events[1].recheck
    assert trust.revision == 1 and trust.desired_error == "" and trust.warnings(NOW) == []


def test_an_expired_root_is_judged_after_every_newer_root_available():
    repo = Repo()
    repo.roots[1] = repo._root(1, expires=NOW - 10)
    v2 = repo.renew_root(NOW - 5)  # expired too: an intermediate root of the chain
    v3 = repo.renew_root(NOW + 86_400)
    trust = repo.trust()
    assert kinds(trust.on_root(v3, repo.root(v3), NOW)) == []  # held: v2 is missing
    assert kinds(trust.on_root(v2, repo.root(v2), NOW)) == ["RootTrusted", "RootTrusted"]
    assert kinds(trust.on_desired(repo.desired(1, [module()]), NOW)) == ["Accepted"]


def test_a_root_update_to_a_still_expired_root_keeps_saying_so():
    repo = Repo()
    repo.roots[1] = repo._root(1, expires=NOW - 10)
    v2 = repo.renew_root(NOW - 5)
    trust = repo.trust()
    assert kinds(trust.on_root(v2, repo.root(v2), NOW)) == ["RootTrusted"]
    [warning] = trust.warnings(NOW)
    assert warning.startswith("root expired: trusted root version 2")


def test_director_rotation_resets_the_revision_floor_and_a_restart_keeps_the_floor():
    repo = Repo()
    trust = repo.trust()
    [accepted] = trust.on_desired(repo.desired(2**40, [module()]), NOW)  # a leaked key pushed the floor up
    restarted = Trust(DEVICE, repo.roots[1], accepted.envelope)
    [refused] = restarted.on_desired(repo.desired(5, [module(bundle=Y)]), NOW)
    assert "not newer than applied" in refused.reason  # the floor survived the restart
    version = repo.rotate_director()
    [rooted, recheck] = restarted.on_root(version, repo.root(version), NOW)
    assert isinstance(rooted, RootTrusted) and rooted.floor_reset
    assert isinstance(recheck, Refused) and recheck.recheck  # the held one is signed by the old key
    assert kinds(restarted.on_desired(repo.desired(5, [module(bundle=Y)]), NOW)) == ["Accepted"]
    assert restarted.revision == 5


def test_a_root_that_keeps_the_director_keeps_the_floor():
    repo = Repo()
    trust = repo.trust()
    trust.on_desired(repo.desired(7), NOW)
    version = repo.renew_root(NOW + 86_400)
    [rooted] = trust.on_root(version, repo.root(version), NOW)
    assert not rooted.floor_reset
    assert "not newer than applied 7" in trust.on_desired(repo.desired(6), NOW)[0].reason


@pytest.mark.parametrize("version, why", [(3, "revoked"), (1, "below the minimum 2")])
def test_the_release_policy_in_a_state_refuses_revoked_and_too_old_versions(version, why):
    repo = Repo()
    trust = repo.trust()
    policy = repo.policy(1, {"classifier": {"min_version": 2, "revoked": [3]}})
    [event] = trust.on_desired(repo.desired(1, [module(version=version)], policy=policy), NOW)
    assert isinstance(event, Refused) and why in event.reason and trust.desired is None
    assert why in trust.desired_error
    assert step(NOW, trust.desired, {}) == []  # nothing to install


def test_a_rollback_to_a_revoked_version_is_refused_even_after_a_restart():
    repo = Repo()
    trust = repo.trust()
    policy = repo.policy(1, {"classifier": {"revoked": [1]}})
    [accepted] = trust.on_desired(repo.desired(1, [module(bundle=Y, version=2)], policy=policy), NOW)
    restarted = Trust(DEVICE, repo.roots[1], accepted.envelope, trust.state.policy_envelope)
    [event] = restarted.on_desired(repo.desired(2, [module(bundle=X, version=1)]), NOW)  # no policy carried
    assert isinstance(event, Refused) and "revoked" in event.reason
    assert restarted.desired.modules[0].version == 2


def test_an_applied_state_that_expires_is_flagged_and_kept():
    repo = Repo()
    trust = repo.trust()
    trust.on_desired(repo.desired(1, [module()], expires=NOW + 60), NOW)
    assert trust.warnings(NOW) == []
    [warning] = trust.warnings(NOW + 61)
    assert warning.startswith(f"applied state expired at {int(NOW) + 60}")
    assert kinds(step(NOW + 61, trust.desired, {"classifier": ModuleFacts(X, X)})) == ["SetCollectRate", "Report"]


def test_a_device_clock_far_behind_is_reported_not_bricking():
    repo = Repo()
    trust = repo.trust()
    trust.on_desired(repo.desired(1, [module()]), NOW)
    behind = NOW - 400 * 86_400  # the RTC reset to a year ago, after the state was accepted
    assert any(w.startswith("device clock looks wrong") for w in trust.warnings(behind))
    assert trust.desired is not None
    [event] = trust.on_desired(repo.desired(2), behind)  # a new state: refused, with the clock named
    assert isinstance(event, Refused) and "wrong clock" in event.reason
