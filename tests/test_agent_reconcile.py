"""The agent's pure core (``agent.reconcile``): every action kind and every order of trust messages.

No broker, no files, no clock: real Ed25519 keys and signed documents from a small repository
simulator (in the manner of python-tuf's ``RepositorySimulator``), fed to ``Trust`` in the orders a
device meets on MQTT (retained copies, reconnects, roots out of order, a state before its root).
"""

from __future__ import annotations

import itertools

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.reconcile import (
    MAX_PENDING_ROOTS,
    Accepted,
    Activate,
    CancelInstall,
    Facts,
    Install,
    ModuleFacts,
    Refused,
    Remove,
    Report,
    ResumeBake,
    RootTrusted,
    SetCollectRate,
    Trust,
    step,
    supersede,
)
from protocol.encoding import canonical_json, digest_of
from protocol.messages import DesiredModule, DesiredState
from protocol.signing import make_root, sign

NOW = 1_700_000_000.0
DEVICE = "cam-1"
X, Y, Z = "a" * 64, "b" * 64, "c" * 64  # bundle digests


class Repo:
    """The hub's side of trust: a root key, the online keys, every root version, desired states."""

    def __init__(self) -> None:
        self.root_key, self.release, self.director = (Ed25519PrivateKey.generate() for _ in range(3))
        self.roots = {1: self._root(1)}

    def _root(self, version: int, signers: list[Ed25519PrivateKey] | None = None, expires: float = NOW + 86_400
              ) -> dict:
        return make_root({"root": [self.root_key], "release": [self.release], "director": [self.director]},
                         signers or [self.root_key], version=version, expires=int(expires))

    def renew_root(self, expires: float) -> int:
        """The same keys in a new root version with another expiry; returns the version."""
        version = max(self.roots) + 1
        self.roots[version] = self._root(version, expires=expires)
        return version

    def policy(self, version: int, modules: dict) -> dict:
        """A release-policy envelope signed by the release key."""
        signed = {"type": "release-policy", "v": 1, "version": version, "expires": int(NOW) + 3600, "modules": modules}
        return sign(signed, [self.release])

    def rotate_director(self) -> int:
        """A new director key, in a new root version signed by the root key; returns the version."""
        version = max(self.roots) + 1
        self.director = Ed25519PrivateKey.generate()
        self.roots[version] = self._root(version)
        return version

    def root(self, version: int) -> bytes:
        return canonical_json(self.roots[version])

    def desired(self, revision: int, modules: list[DesiredModule] | None = None, *, device: str = DEVICE,
                key: Ed25519PrivateKey | None = None, expires: float = NOW + 3600, policy: dict | None = None
                ) -> bytes:
        state = DesiredState(device=device, revision=revision, modules=modules or [], expires=int(expires),
                             policy=policy)
        return canonical_json(sign(state.to_dict(), [key or self.director]))

    def trust(self) -> Trust:
        """A device as enrolled: root version 1 pinned, nothing accepted yet."""
        return Trust(DEVICE, self.roots[1])


def module(name: str = "classifier", bundle: str = X, version: int = 1, ppm: int = 0) -> DesiredModule:
    return DesiredModule(name=name, version=version, bundle=bundle, size=10, collect_rate_ppm=ppm)


def state(*modules: DesiredModule, revision: int = 1) -> DesiredState:
    return DesiredState(device=DEVICE, revision=revision, expires=int(NOW) + 3600, modules=list(modules))


def kinds(events: list) -> list[str]:
    return [type(e).__name__ for e in events]


# --- desired states ------------------------------------------------------------------------------


def test_a_valid_state_is_accepted_and_its_retained_copy_is_a_no_op():
    repo = Repo()
    trust = repo.trust()
    payload = repo.desired(1, [module()])
    [event] = trust.on_desired(payload, NOW)
    assert isinstance(event, Accepted) and not event.recheck
    assert event.state.modules[0].bundle == X and trust.revision == 1 and trust.desired == event.state
    assert trust.desired_digest == digest_of(event.envelope) and trust.desired_error == ""
    assert trust.on_desired(payload, NOW) == []  # re-sent on every reconnect: nothing to do, nothing counted


def test_a_restarted_device_ignores_the_retained_copy_of_its_persisted_state():
    repo = Repo()
    payload = repo.desired(5, [module()])
    first = repo.trust()
    [accepted] = first.on_desired(payload, NOW)
    restarted = Trust(DEVICE, repo.roots[1], accepted.envelope)
    assert restarted.on_desired(payload, NOW) == []
    assert restarted.revision == 5


@pytest.mark.parametrize("why, make", [
    ("not newer", lambda r: r.desired(1, [module(bundle=Y)])),
    ("not newer", lambda r: r.desired(0 + 1)),  # the same revision, re-signed: a replay
    ("for device 'cam-2'", lambda r: r.desired(2, device="cam-2")),
    ("expired", lambda r: r.desired(2, expires=NOW - 1)),
    ("not trust for this role", lambda r: r.desired(2, key=r.release)),  # role confusion
    ("not trust for this role", lambda r: r.desired(2, key=Ed25519PrivateKey.generate())),
    ("not JSON", lambda r: b"{not json"),
    ("not a signed envelope", lambda r: b"[]"),
    ("no signatures", lambda r: b'{"signed": {"type": "desired"}, "signatures": []}'),
])
def test_refused_states_leave_the_accepted_one_in_force(why, make):
    repo = Repo()
    trust = repo.trust()
    trust.on_desired(repo.desired(1, [module()]), NOW)
    [event] = trust.on_desired(make(repo), NOW)
    assert isinstance(event, Refused) and event.kind == "desired" and not event.recheck
    assert why in event.reason
    assert trust.revision == 1 and trust.desired.modules[0].bundle == X
    assert trust.desired_error == f"desired state refused: {event.reason}"


def test_a_refused_state_sent_again_is_refused_and_counted_again():
    repo = Repo()
    trust = repo.trust()
    bad = repo.desired(1, key=Ed25519PrivateKey.generate())
    assert kinds(trust.on_desired(bad, NOW)) == ["Refused"]
    [again] = trust.on_desired(bad, NOW)
    assert isinstance(again, Refused) and not again.recheck


def test_an_accepted_state_clears_the_error_and_the_held_state():
    repo = Repo()
    trust = repo.trust()
    trust.on_desired(repo.desired(1, key=repo.release), NOW)
    assert trust.desired_error and trust.held is not None
    trust.on_desired(repo.desired(2), NOW)
    assert trust.desired_error == "" and trust.held is None and trust.revision == 2


# --- roots, and roots with states -------------------------------------------------------------------


def test_root_then_a_state_signed_by_the_new_director_key():
    repo = Repo()
    trust = repo.trust()
    v2 = repo.rotate_director()
    [trusted] = trust.on_root(v2, repo.root(v2), NOW)
    assert isinstance(trusted, RootTrusted) and trusted.root.version == 2 and trust.root.version == 2
    assert trusted.envelope == repo.roots[2]  # what the device persists
    [accepted] = trust.on_desired(repo.desired(1, [module()]), NOW)
    assert isinstance(accepted, Accepted) and not accepted.recheck


def test_a_state_before_its_root_is_held_and_applied_once_the_root_comes():
    """Rotation strands no device (issue 12): the retained state may reach it before the new root."""
    repo = Repo()
    trust = repo.trust()
    v2 = repo.rotate_director()
    [refused] = trust.on_desired(repo.desired(1, [module()]), NOW)
    assert isinstance(refused, Refused) and "not trust" in refused.reason and trust.revision == 0
    events = trust.on_root(v2, repo.root(v2), NOW)
    assert kinds(events) == ["RootTrusted", "Accepted"]
    assert events[1].recheck and trust.revision == 1 and trust.desired_error == "" and trust.held is None


def test_a_held_state_still_refused_after_the_root_update_is_not_counted_again():
    repo = Repo()
    trust = repo.trust()
    v2 = repo.rotate_director()
    trust.on_desired(repo.desired(1, device="cam-2"), NOW)  # no root can make this one right
    events = trust.on_root(v2, repo.root(v2), NOW)
    assert kinds(events) == ["RootTrusted", "Refused"]
    assert events[1].recheck and "cam-2" in trust.desired_error


def test_no_recheck_without_a_root_update_or_without_a_held_state():
    repo = Repo()
    trust = repo.trust()
    v2 = repo.rotate_director()
    assert kinds(trust.on_root(v2, repo.root(v2), NOW)) == ["RootTrusted"]  # nothing held
    trust.on_desired(repo.desired(1, key=repo.release), NOW)
    assert trust.on_root(v2, repo.root(v2), NOW) == []  # a retained copy of the root already trusted


def test_a_state_signed_by_the_rotated_out_key_is_refused_after_the_root():
    repo = Repo()
    trust = repo.trust()
    old = repo.director
    v2 = repo.rotate_director()
    trust.on_root(v2, repo.root(v2), NOW)
    [event] = trust.on_desired(repo.desired(1, key=old), NOW)
    assert isinstance(event, Refused) and trust.revision == 0


def test_roots_out_of_order_are_held_until_the_one_before_them_comes():
    repo = Repo()
    trust = repo.trust()
    v2, v3 = repo.rotate_director(), repo.rotate_director()
    assert trust.on_root(v3, repo.root(v3), NOW) == []  # held: 2 is missing
    assert trust.root.version == 1 and set(trust.pending_roots) == {3}
    events = trust.on_root(v2, repo.root(v2), NOW)
    assert [e.root.version for e in events] == [2, 3] and trust.root.version == 3 and not trust.pending_roots


def test_retained_root_history_and_cleared_roots_are_ignored():
    repo = Repo()
    trust = repo.trust()
    v2 = repo.rotate_director()
    trust.on_root(v2, repo.root(v2), NOW)
    assert trust.on_root(1, repo.root(1), NOW) == []
    assert trust.on_root(2, repo.root(2), NOW) == []
    assert trust.on_root(3, b"", NOW) == []  # a cleared retained message
    assert trust.root.version == 2 and not trust.pending_roots


def test_a_forged_root_is_refused_and_the_genuine_one_still_applies():
    repo = Repo()
    trust = repo.trust()
    stranger = Ed25519PrivateKey.generate()
    forged = make_root({r: [stranger] for r in ("root", "release", "director")}, [stranger], version=2,
                       expires=int(NOW) + 86_400)
    [refused] = trust.on_root(2, canonical_json(forged), NOW)
    assert isinstance(refused, Refused) and refused.kind == "root" and "root version 2 refused" in refused.reason
    assert trust.root.version == 1 and not trust.pending_roots
    v2 = repo.rotate_director()
    assert kinds(trust.on_root(v2, repo.root(v2), NOW)) == ["RootTrusted"]


def test_a_root_on_the_wrong_versions_topic_is_refused():
    repo = Repo()
    trust = repo.trust()
    repo.rotate_director()
    repo.roots[3] = repo._root(3)
    [refused] = trust.on_root(2, repo.root(3), NOW)  # version 3's document on root/2
    assert isinstance(refused, Refused) and "is version 3" in refused.reason and trust.root.version == 1


def test_garbage_on_a_root_topic_is_refused():
    trust = Repo().trust()
    [refused] = trust.on_root(2, b"\xff\xfe", NOW)
    assert isinstance(refused, Refused) and refused.kind == "root" and not trust.pending_roots


def test_pending_roots_are_bounded():
    repo = Repo()
    trust = repo.trust()
    payload = repo.root(1)
    for version in range(3, 3 + MAX_PENDING_ROOTS):
        assert trust.on_root(version, payload, NOW) == []  # held (version 2 never comes)
    [refused] = trust.on_root(3 + MAX_PENDING_ROOTS, payload, NOW)
    assert isinstance(refused, Refused) and "pending" in refused.reason
    assert trust.on_root(3, payload, NOW) == []  # one already held may be replaced


@pytest.mark.parametrize("order", sorted(set(itertools.permutations(["r2", "r3", "d", "r2", "d", "r3"]))))
def test_every_order_of_two_rotations_and_a_state_ends_in_the_same_place(order):
    """Roots and the state in any order, each delivered twice (retained copies): root 3 and revision 1."""
    repo = Repo()
    trust = repo.trust()
    v2, v3 = repo.rotate_director(), repo.rotate_director()
    messages = {"r2": (v2, repo.root(v2)), "r3": (v3, repo.root(v3)), "d": repo.desired(1, [module()])}
    accepted = 0
    for name in order:
        msg = messages[name]
        events = trust.on_desired(msg, NOW) if name == "d" else trust.on_root(*msg, NOW)
        accepted += sum(isinstance(e, Accepted) for e in events)
    assert trust.root.version == 3 and trust.revision == 1 and trust.desired_error == ""
    assert accepted == 1 and trust.held is None and not trust.pending_roots


# --- step: what to do ------------------------------------------------------------------------------


def test_nothing_desired_yet_is_nothing_to_do():
    assert step(NOW, None, {"classifier": ModuleFacts(current=X, active=X)}) == []


def test_a_fresh_device_installs_every_module_in_order_then_reports():
    a, b = module("a", X), module("b", Y)
    assert step(NOW, state(a, b), {}) == [Install(a), Install(b), Report()]


def test_a_serving_module_gets_only_its_collection_rate():
    m = module(ppm=500)
    assert step(NOW, state(m), {"classifier": ModuleFacts(current=X, active=X, journal="committed",
                                                          journal_bundle=X)}) == [SetCollectRate("classifier", 500),
                                                                                   Report()]


@pytest.mark.parametrize("active", [None, Y])
def test_an_installed_version_not_serving_is_activated(active):
    m = module()
    facts = {"classifier": ModuleFacts(current=X, active=active)}
    assert step(NOW, state(m), facts) == [Activate("classifier"), SetCollectRate("classifier", 0), Report()]


def test_a_new_version_is_installed_over_the_serving_one():
    m = module(bundle=Y, version=2)
    facts = {"classifier": ModuleFacts(current=X, active=X, journal="committed", journal_bundle=X)}
    assert step(NOW, state(m), facts) == [Install(m), Report()]


@pytest.mark.parametrize("journal", ["rolled_back", "failed"])
def test_a_version_judged_unusable_here_is_not_tried_again(journal):
    bad, other = module(bundle=Y, version=2), module(bundle=Z, version=3)
    facts = {"classifier": ModuleFacts(current=X, active=X, journal=journal, journal_bundle=Y)}
    assert step(NOW, state(bad), facts) == [Report()]
    assert step(NOW, state(other), facts) == [Install(other), Report()]  # a different bundle is tried


def test_an_install_cut_short_is_started_again():
    m = module()
    assert step(NOW, state(m), {"classifier": ModuleFacts(journal="downloading", journal_bundle=X)}) == [
        Install(m), Report()]


def test_modules_no_longer_desired_are_removed_first():
    keep = module("keep", Z)
    facts = {
        "old": ModuleFacts(current=X, active=X, journal="committed", journal_bundle=X),
        "stale": ModuleFacts(active=Y),  # serving without a current link: stopped too
        "keep": ModuleFacts(current=Z, active=Z),
        "never": ModuleFacts(journal="failed", journal_bundle=Y),  # nothing installed: its record stays
    }
    assert step(NOW, state(keep), facts) == [Remove("old"), Remove("stale"), SetCollectRate("keep", 0), Report()]
    assert step(NOW, state(), facts) == [Remove("keep"), Remove("old"), Remove("stale"), Report()]


def test_a_version_baking_is_left_to_its_bake():
    m = module()
    facts = {"classifier": ModuleFacts(current=X, active=X, journal="baking", journal_bundle=X)}
    assert step(NOW, state(m), facts) == [SetCollectRate("classifier", 0), Report()]


def test_at_start_interrupted_bakes_resume_before_anything_else():
    facts = {"b": ModuleFacts(current=Y, journal="baking", journal_bundle=Y),
             "a": ModuleFacts(current=X, journal="baking", journal_bundle=X),
             "c": ModuleFacts(current=Z, journal="committed", journal_bundle=Z)}
    assert step(NOW, state(module("d", X)), facts, Facts(starting=True)) == [ResumeBake("a"), ResumeBake("b"),
                                                                             Report()]
    assert step(NOW, None, {}, Facts(starting=True)) == [Report()]


# --- a newer state during an install ------------------------------------------------------------------


def test_a_newer_state_cancels_a_download_it_no_longer_wants():
    repo = Repo()
    trust = repo.trust()
    trust.on_desired(repo.desired(1, [module(bundle=X)]), NOW)
    [install] = [a for a in step(NOW, trust.desired, {}) if isinstance(a, Install)]
    [newer] = trust.on_desired(repo.desired(2, [module(bundle=Y, version=2)]), NOW)
    assert supersede(newer.state, ("classifier", install.module.bundle), "downloading") == [
        CancelInstall("classifier", X)]
    facts = {"classifier": ModuleFacts()}  # the cancelled download's record dropped
    assert step(NOW, trust.desired, facts) == [Install(module(bundle=Y, version=2)), Report()]


@pytest.mark.parametrize("journal", ["verifying", "staged", "activating", "health_check", "baking", "committed", None])
def test_an_install_past_its_download_finishes(journal):
    assert supersede(state(module(bundle=Y)), ("classifier", X), journal) == []


def test_a_newer_state_that_still_wants_the_bundle_keeps_its_download():
    assert supersede(state(module(bundle=X), module("other", Y), revision=2), ("classifier", X), "downloading") == []
    assert supersede(state(module(bundle=Y)), None, None) == []
