"""The device's trust decisions (protocol/trust.py), attack by attack, on the repository simulator in
tests/trustsim.py: root key rotations and thresholds, key id confusion, expired roots (TUF §5.2),
fast-forward recovery, the maximum lifetime of a state, release revocation and anti-rollback."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest

from protocol.encoding import ProtocolError
from protocol.signing import SignatureError, key_id, load_trusted_root, public_hex, sign
from protocol.trust import MAX_DESIRED_LIFETIME_S, TrustState
from tests.trustsim import NOW, POOL, Repo, desired, policy, release


@dataclass
class V:
    """One root version: its root keys and threshold, who signs it, and whether a device must accept it."""

    keys: list[int]
    threshold: int
    sigs: list[int]
    ok: bool = True


ROOT_ROTATIONS = {
    "1-of-1 key rotation": [V([1], 1, [1]), V([2], 1, [2, 1]), V([2], 1, [2])],
    "1-of-1 rotation, unused signatures": [V([1], 1, [3, 1, 4]), V([2], 1, [3, 2, 1, 4]), V([2], 1, [3, 2, 4])],
    "1-of-1 rotation fails: not signed with the old key": [V([1], 1, [1]), V([2], 1, [2, 3, 4], ok=False)],
    "1-of-1 rotation fails: not signed with the new key": [V([1], 1, [1]), V([2], 1, [1, 3, 4], ok=False)],
    "1-of-1 -> 2-of-3 -> 1-of-2": [V([1], 1, [1]), V([1, 2, 3], 2, [1, 2, 3]), V([4, 5], 1, [2, 3, 4])],
    "1-of-1 -> 2-of-3 fails: one new signature": [V([1], 1, [1]), V([1, 2, 3], 2, [1], ok=False)],
    "2-of-3 -> 1-of-2 fails: old threshold not met": [V([1, 2, 3], 2, [1, 2]), V([4, 5], 1, [1, 4], ok=False)],
    "3-of-5, one key rotated": [V([0, 1, 2, 3, 4], 3, [0, 2, 4]), V([0, 1, 3, 4, 5], 3, [0, 4, 1])],
    "3-of-5 rotation fails: 3 old but 2 new": [V([0, 1, 2, 3, 4], 3, [0, 2, 4]),
                                              V([0, 1, 3, 4, 5], 3, [0, 2, 4], ok=False)],
    "3-of-5 rotation fails: 3 new but 2 old": [V([0, 1, 2, 3, 4], 3, [0, 2, 4]),
                                              V([0, 1, 3, 4, 5], 3, [0, 4, 5], ok=False)],
    "3-of-5, all keys rotated in one step": [V([0, 1, 2, 3, 4], 3, [0, 2, 4]),
                                            V([5, 6, 7, 8, 9], 3, [0, 2, 4, 5, 6, 7]), V([5, 6, 7, 8, 9], 3, [5, 6, 7])],
    "threshold up: 1-of-3 -> 2-of-3": [V([1, 2, 3], 1, [1]), V([1, 2, 3], 2, [1, 2])],
    "threshold up fails: new threshold not met": [V([1, 2, 3], 1, [1]), V([1, 2, 3], 2, [2], ok=False)],
    "threshold down: 2-of-3 -> 1-of-3": [V([1, 2, 3], 2, [1, 2]), V([1, 2, 3], 1, [1, 2]), V([1, 2, 3], 1, [1])],
    "threshold down fails: old threshold not met": [V([1, 2, 3], 2, [1, 2]), V([1, 2, 3], 1, [1], ok=False)],
    "a revoked key cannot sign the next root": [V([1], 1, [1]), V([2], 1, [1, 2]), V([1], 1, [1], ok=False)],
}


@pytest.mark.parametrize("chain", ROOT_ROTATIONS.values(), ids=ROOT_ROTATIONS.keys())
def test_root_rotation_matrix(chain):
    repo = Repo()
    for v in chain:
        repo.set_role("root", v.keys, v.threshold)
        repo.publish_root(v.sigs)
    trust = TrustState(repo.roots[0])
    pending = {i + 1: env for i, env in enumerate(repo.roots)}
    applied, refused = trust.update_roots(pending)
    want = len(chain) if chain[-1].ok else len(chain) - 1
    assert trust.root.version == want and len(applied) == want - 1
    assert bool(refused) is not chain[-1].ok
    if not chain[-1].ok:
        assert "root signature check failed" in refused[len(chain)]


@pytest.mark.parametrize("keys,threshold,sigs,ok", [
    ([2], 1, [2], True), ([2, 3, 4], 2, [2, 4], True), ([2, 3, 4], 2, [2], False), ([2, 3, 4], 2, [2, 2], False),
    ([2, 3, 4], 3, [4, 3, 2, 5], True), ([2, 3], 1, [5, 6], False)])
def test_director_threshold(keys, threshold, sigs, ok):
    repo = Repo()
    repo.set_role("director", keys, threshold)
    trust = TrustState(repo.publish_root())
    env = desired(1, sigs)
    if ok:
        assert trust.accept_desired(env, "dev-1", NOW).revision == 1
    else:
        with pytest.raises(SignatureError, match=f"of {threshold} required"):
            trust.accept_desired(env, "dev-1", NOW)


def test_key_ids_must_be_the_hash_of_the_key():
    repo = Repo()
    root = repo.publish_root()
    real = key_id(POOL[2])
    # the director's key listed again under a made-up id, and the role naming both: a 2-of-2 met by one key
    forged = copy.deepcopy(root)
    forged["signed"]["keys"]["f" * 64] = {"keytype": "ed25519", "public": public_hex(POOL[2])}
    forged["signed"]["roles"]["director"] = {"keyids": [real, "f" * 64], "threshold": 2}
    with pytest.raises(SignatureError, match="not the sha256 of its public key"):
        load_trusted_root(sign(forged["signed"], [POOL[0]]))
    with pytest.raises(SignatureError, match="not the sha256 of its public key"):
        TrustState(root).update_root(sign({**forged["signed"], "version": 2}, [POOL[0]]))

    duplicate = copy.deepcopy(root["signed"])
    duplicate["roles"]["director"] = {"keyids": [real, real], "threshold": 2}
    with pytest.raises(SignatureError, match="distinct key ids"):
        load_trusted_root(sign(duplicate, [POOL[0]]))
    unmeetable = copy.deepcopy(root["signed"])
    unmeetable["roles"]["director"] = {"keyids": [real], "threshold": 2}
    with pytest.raises(SignatureError, match="threshold 2 must be between 1 and its 1 key"):
        load_trusted_root(sign(unmeetable, [POOL[0]]))


def test_the_same_signature_twice_counts_once():
    repo = Repo()
    repo.set_role("director", [2, 3], 2)
    trust = TrustState(repo.publish_root())
    env = desired(1, [2])
    env["signatures"] = env["signatures"] * 2
    with pytest.raises(SignatureError, match="1 of 2 required"):
        trust.accept_desired(env, "dev-1", NOW)


def test_root_expired_at_load_refuses_states_then_a_newer_root_revives_them():
    repo = Repo()
    trust = TrustState(repo.publish_root(expires=NOW - 10))  # §5.2: loading never judges expiry
    assert trust.expired(NOW)
    state = desired(1, [2])
    with pytest.raises(ProtocolError, match="trusted root version 1 expired"):
        trust.accept_desired(state, "dev-1", NOW)
    assert trust.recheck("dev-1", NOW) is None  # still refused while the root is expired

    trust.update_root(repo.publish_root())  # version 2, fresh
    assert not trust.expired(NOW)
    assert trust.recheck("dev-1", NOW).revision == 1  # the refused state is accepted without being re-sent
    assert trust.floor == 1 and trust.refused is None


def test_an_expired_intermediate_root_does_not_stop_the_walk():
    repo = Repo()
    repo.publish_root()
    repo.publish_root(expires=NOW - 100)
    repo.publish_root()
    trust = TrustState(repo.roots[0])
    applied, refused = trust.update_roots({2: repo.roots[1], 3: repo.roots[2]})
    assert (trust.root.version, len(applied), refused) == (3, 2, {})
    assert not trust.expired(NOW)


def test_roots_are_applied_in_order_without_gaps():
    repo = Repo()
    for _ in range(3):
        repo.publish_root()
    trust = TrustState(repo.roots[0])
    with pytest.raises(SignatureError, match="apply version 2 first"):
        trust.update_root(repo.roots[2])
    pending = {3: repo.roots[2]}
    assert trust.update_roots(pending) == ([], {}) and trust.root.version == 1 and 3 in pending
    pending[2] = repo.roots[1]
    applied, _ = trust.update_roots(pending)
    assert [u.root.version for u in applied] == [2, 3] and not pending
    pending = {2: repo.roots[1], 1: repo.roots[0]}  # the retained history, re-sent: ignored
    assert trust.update_roots(pending) == ([], {}) and not pending


def test_fast_forward_by_a_leaked_director_key_then_recovery():
    repo = Repo()
    trust = TrustState(repo.publish_root())
    assert trust.accept_desired(desired(5, [2]), "dev-1", NOW).revision == 5
    trust.accept_desired(desired(2**62, [2]), "dev-1", NOW)  # the attacker's state, with the leaked key 2
    with pytest.raises(ProtocolError, match="not newer"):
        trust.accept_desired(desired(6, [2]), "dev-1", NOW)  # the hub's next state: stuck forever, until...

    repo.set_role("director", [3])  # the hub rotates the director key
    update = trust.update_root(repo.publish_root())
    assert update.floor_reset and trust.floor == 0
    with pytest.raises(SignatureError):
        trust.accept_desired(desired(2**62 + 1, [2]), "dev-1", NOW)  # the leaked key no longer counts
    assert trust.accept_desired(desired(7, [3]), "dev-1", NOW).revision == 7
    with pytest.raises(ProtocolError, match="not newer"):
        trust.accept_desired(desired(6, [3]), "dev-1", NOW)  # the floor holds again


def test_adding_a_director_key_keeps_the_floor():
    """Only a root that stops trusting the applied state's signer resets the floor: adding a key must not open
    a replay of older states still signed by a trusted key."""
    repo = Repo()
    trust = TrustState(repo.publish_root())
    old = desired(3, [2])
    trust.accept_desired(desired(4, [2]), "dev-1", NOW)
    repo.set_role("director", [2, 3])
    assert not trust.update_root(repo.publish_root()).floor_reset
    with pytest.raises(ProtocolError, match="not newer"):
        trust.accept_desired(old, "dev-1", NOW)


def test_the_floor_survives_a_restart_and_resets_consistently():
    """The floor is a function of (root, applied state), so a device that persisted the new root but crashed
    before anything else still computes the right floor."""
    repo = Repo()
    first = repo.publish_root()
    applied = desired(2**62, [2])
    assert TrustState(first, applied=applied).floor == 2**62
    repo.set_role("director", [3])
    assert TrustState(repo.publish_root([0]), applied=applied).floor == 0


def test_a_state_valid_too_long_is_refused():
    trust = TrustState(Repo().publish_root())
    with pytest.raises(ProtocolError, match="beyond the maximum lifetime"):
        trust.accept_desired(desired(1, [2], expires=NOW + MAX_DESIRED_LIFETIME_S + 60), "dev-1", NOW)
    assert trust.accept_desired(desired(1, [2], expires=NOW + MAX_DESIRED_LIFETIME_S - 60), "dev-1", NOW)


def test_a_state_signed_by_a_rotated_key_is_accepted_once_its_root_arrives():
    """Order on the wire is not guaranteed: the state may come before the root that trusts its key."""
    repo = Repo()
    trust = TrustState(repo.publish_root())
    early = desired(1, [3])
    with pytest.raises(SignatureError):
        trust.accept_desired(early, "dev-1", NOW)
    repo.set_role("director", [3])
    trust.update_root(repo.publish_root())
    assert trust.recheck("dev-1", NOW).revision == 1


def test_revocation_and_rollback_to_a_revoked_version_refused():
    repo = Repo()
    trust = TrustState(repo.publish_root())
    p1 = policy(1, [1], {"m": {"min_version": 2, "revoked": [3]}})
    assert trust.accept_desired(desired(1, [2], modules=[("m", 4)], policy=p1), "dev-1", NOW)
    assert trust.policy.version == 1
    for version, why in ((3, "version 3 is revoked"), (1, "below the minimum 2")):
        with pytest.raises(ProtocolError, match=why):  # the policy travels no more: the device remembers it
            trust.accept_desired(desired(2, [2], modules=[("m", version)]), "dev-1", NOW)
    rel, digest = release("m", 3, [1])
    with pytest.raises(ProtocolError, match="version 3 is revoked"):
        trust.accept_release(rel, digest, "m", 0, NOW)
    rel, digest = release("m", 4, [1])
    assert trust.accept_release(rel, digest, "m", 0, NOW).version == 4

    p2 = policy(2, [1], {"m": {"min_version": 5}})
    trust.accept_desired(desired(3, [2], modules=[("m", 5)], policy=p2), "dev-1", NOW)
    with pytest.raises(ProtocolError, match="older than the trusted 2"):  # the director re-sends an old policy
        trust.accept_desired(desired(4, [2], modules=[("m", 4)], policy=p1), "dev-1", NOW)
    forged = policy(3, [2], {})  # signed by the director's key, not the release role
    with pytest.raises(SignatureError, match="release signature check failed"):
        trust.accept_desired(desired(4, [2], modules=[("m", 4)], policy=forged), "dev-1", NOW)
    other = policy(2, [1], {})
    with pytest.raises(ProtocolError, match="second, different release policy version 2"):
        trust.accept_desired(desired(4, [2], policy=other), "dev-1", NOW)
    assert trust.policy.version == 2


def test_a_policy_signed_by_a_rotated_release_key_is_dropped():
    repo = Repo()
    trust = TrustState(repo.publish_root())
    trust.accept_desired(desired(1, [2], policy=policy(2**40, [1], {"m": {"min_version": 2**40}})), "dev-1", NOW)
    repo.set_role("release", [4])
    update = trust.update_root(repo.publish_root())
    assert update.policy_reset and trust.policy is None
    assert trust.accept_desired(desired(2, [2], modules=[("m", 2)], policy=policy(1, [4], {})), "dev-1", NOW)


def test_one_public_key_under_two_ids_counts_once_even_in_a_hand_built_root():
    """Belt and braces under the key id rule (go-tuf #733, python-tuf #1091): counting is by public key."""
    from protocol.signing import Root

    pub = public_hex(POOL[2])
    root = Root(1, NOW + 60, {"a" * 64: pub, "b" * 64: pub}, {"director": (["a" * 64, "b" * 64], 2)}, {})
    env = desired(1, [2])
    sig = env["signatures"][0]["sig"]
    env["signatures"] = [{"keyid": "a" * 64, "sig": sig}, {"keyid": "b" * 64, "sig": sig}]
    with pytest.raises(SignatureError, match="1 of 2 required"):
        root.check_signatures(env, "director")
