"""Pure tests of the contract: topics, schemas, encoding, signatures, device-side checks."""

from __future__ import annotations

import os
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol import Channel, ProtocolError, decode, device_topic, parse_topic
from protocol.broker_url import parse_broker_url
from protocol.encoding import canonical_json, digest_of
from protocol.manifest import Manifest, TensorSpec, check_relative_path, describe_file, parse_manifest, release_document
from protocol.messages import BakePolicy, DesiredModule, DesiredState, TelemetryBatch
from protocol.schema import validate
from protocol.signing import SignatureError, load_trusted_root, make_root, sign, update_root
from protocol.topics import BlobTopic, DeviceTopic, blob_topic
from protocol.verify import accept_desired, accept_manifest

NOW = 1_900_000_000


def keys(n=1):
    return [Ed25519PrivateKey.generate() for _ in range(n)]


@pytest.fixture
def trust():
    root_k, rel_k, dir_k = keys(3)
    env = make_root({"root": [root_k], "release": [rel_k], "director": [dir_k]}, [root_k], expires=NOW + 1000)
    return load_trusted_root(env), root_k, rel_k, dir_k


def desired(device="dev-1", revision=2, expires=NOW + 100):
    mod = DesiredModule(name="m", version=1, bundle="a" * 64, size=10)
    return DesiredState(device=device, revision=revision, expires=expires, modules=[mod]).to_dict()


def test_topics_round_trip():
    t = device_topic("dev-1", Channel.TELEMETRY)
    assert t == "edgefleet/v1/devices/dev-1/telemetry"
    assert parse_topic(t) == DeviceTopic("dev-1", Channel.TELEMETRY)
    assert parse_topic(blob_topic("b" * 64, "manifest")) == BlobTopic("b" * 64, "manifest")


@pytest.mark.parametrize("topic", ["other/v1/devices/a/desired", "edgefleet/v1/devices/a/nope",
                                   "edgefleet/v1/devices/../desired", "edgefleet/v1/blobs/xyz/manifest",
                                   "edgefleet/v1/devices/a/b/c"])
def test_bad_topics_are_refused(topic):
    with pytest.raises(ProtocolError):
        parse_topic(topic)


@pytest.mark.parametrize(("payload", "reason"), [
    (b"not json", "not JSON"),
    (b'{"v":2,"device":"d","seq":1,"ts":1,"points":[]}', "unsupported schema version 2"),
    (b'{"v":1,"device":"d"}', "seq: Field required"),
    (os.urandom(1024 * 1024), "payload too large"),
    (b"\xff\xfe", "not UTF-8"),
    (b"[1,2]", "invalid TelemetryBatch"),
    (b'{"v":1,"device":"d","seq":1,"ts":1,"points":[{"ts":1,"module":"m","version":"x","inferences":1,"errors":0}]}',
     "points.0.version: Expected `int`, got `str`"),
    (b'{"v":1,"device":"d","seq":-1,"ts":1,"points":[]}', "seq: Expected `int` >= 0"),
])
def test_decode_refuses_with_precise_reason(payload, reason):
    with pytest.raises(ProtocolError, match=reason):
        decode(Channel.TELEMETRY, payload)


def test_decode_ignores_unknown_fields_and_encodes_canonically():
    msg = decode(Channel.TELEMETRY, b'{"v":1,"device":"d","seq":3,"ts":1.5,"points":[],"future":true}')
    assert isinstance(msg, TelemetryBatch) and msg.seq == 3
    assert msg.encode() == canonical_json(msg.to_dict())


def test_canonical_json_is_order_independent():
    assert canonical_json({"b": 1, "a": [1, {"d": 2, "c": 3}]}) == b'{"a":[1,{"c":3,"d":2}],"b":1}'
    assert digest_of({"x": 1, "y": 2}) == digest_of({"y": 2, "x": 1})


def test_desired_state_accepted(trust):
    root, _, _, dir_k = trust
    state = accept_desired(sign(desired(), [dir_k]), root, "dev-1", last_revision=1, now=NOW)
    assert state.revision == 2 and state.modules[0].name == "m"


def test_desired_state_attacks(trust):
    root, _, rel_k, dir_k = trust
    (stranger,) = keys(1)
    with pytest.raises(SignatureError, match="does not trust"):
        accept_desired(sign(desired(), [stranger]), root, "dev-1", 1, now=NOW)
    with pytest.raises(SignatureError, match="does not trust"):  # right format, wrong role's key
        accept_desired(sign(desired(), [rel_k]), root, "dev-1", 1, now=NOW)
    tampered = sign(desired(), [dir_k])
    tampered["signed"]["revision"] = 99
    with pytest.raises(SignatureError, match="bad signature"):
        accept_desired(tampered, root, "dev-1", 1, now=NOW)
    with pytest.raises(SignatureError, match="expired"):
        accept_desired(sign(desired(expires=NOW - 1), [dir_k]), root, "dev-1", 1, now=NOW)
    with pytest.raises(ProtocolError, match="not 'dev-1'"):
        accept_desired(sign(desired(device="dev-2"), [dir_k]), root, "dev-1", 1, now=NOW)
    with pytest.raises(ProtocolError, match="not newer"):
        accept_desired(sign(desired(revision=2), [dir_k]), root, "dev-1", 2, now=NOW)


def test_root_rotation_and_revocation(trust):
    root, root_k, rel_k, dir_k = trust
    (new_root_k, new_dir_k) = keys(2)
    rotated = make_root({"root": [new_root_k], "release": [rel_k], "director": [new_dir_k]},
                        [root_k, new_root_k], version=2, expires=NOW + 1000)
    new = update_root(root, rotated, now=NOW)
    assert new.version == 2
    with pytest.raises(SignatureError):  # the revoked director key no longer counts
        accept_desired(sign(desired(), [dir_k]), new, "dev-1", 1, now=NOW)
    assert accept_desired(sign(desired(), [new_dir_k]), new, "dev-1", 1, now=NOW).revision == 2
    self_signed = make_root({"root": [new_root_k], "release": [rel_k], "director": [new_dir_k]},
                            [new_root_k], version=3, expires=NOW + 1000)
    with pytest.raises(SignatureError):  # not vouched for by the trusted root keys
        update_root(root, self_signed, now=NOW)
    with pytest.raises(SignatureError, match="not newer"):
        update_root(new, rotated, now=NOW)


def test_threshold_counts_distinct_keys():
    r1, r2 = keys(2)
    env = make_root({"root": [r1, r2], "release": [r1], "director": [r1]}, [r1], thresholds={"root": 2},
                    expires=NOW + 10)
    with pytest.raises(SignatureError, match="1 of 2"):
        load_trusted_root(env)
    env["signatures"].append(dict(env["signatures"][0]))  # the same key twice is still one key
    with pytest.raises(SignatureError, match="1 of 2"):
        load_trusted_root(env)


def manifest(name="m", files=None):
    entry, _ = describe_file("model.onnx", [b"abc"])
    return Manifest(name=name, version=1, runtime="onnx", model="model.onnx", files=files or [entry])


def test_manifest_checks(trust):
    root, _, rel_k, _ = trust
    m = manifest()
    env = sign(release_document(m, NOW + 100), [rel_k])
    assert accept_manifest(env, root, m.digest(), "m", now=NOW).digest() == m.digest()
    other = manifest(name="other")
    with pytest.raises(ProtocolError, match="mix-and-match"):
        accept_manifest(sign(release_document(other, NOW + 100), [rel_k]), root, m.digest(), "m", now=NOW)
    with pytest.raises(ProtocolError, match="mix-and-match"):
        accept_manifest(sign(release_document(other, NOW + 100), [rel_k]), root, other.digest(), "m", now=NOW)
    with pytest.raises(ProtocolError, match="older"):
        accept_manifest(env, root, m.digest(), "m", min_version=2, now=NOW)


def test_canonical_form_and_digest_are_stable():
    """Fixed vectors (taken before the schemas moved from pydantic to msgspec): signatures depend on these bytes."""
    big, _ = describe_file("model.onnx", [b"abc" * 100000])
    sample, _ = describe_file("sub/sample.json", [b'{"inputs":{}}'])
    m = Manifest(name="m", version=3, runtime="onnx", model="model.onnx", sample="sub/sample.json", files=[big, sample],
                 inputs=[TensorSpec(name="x", dtype="float32", shape=[None, 4])],
                 outputs=[TensorSpec(name="y", dtype="int64", shape=[-1])], collect_rate_ppm=10)
    assert m.digest() == "49052b816130051680d8b3cabe314ee0930b6ca5d2d42fdf3e6533320e22c5ab"
    assert parse_manifest(m.to_dict()).digest() == m.digest()
    state = DesiredState(device="dev-1", revision=2, expires=1900000100, modules=[
        DesiredModule(name="m", version=1, bundle="a" * 64, size=10, deployment="dep", collect_rate_ppm=5)])
    assert canonical_json(state.to_dict()) == (
        b'{"device":"dev-1","expires":1900000100,"modules":[{"bundle":"' + b"a" * 64 + b'","collect_rate_ppm":5,'
        b'"deployment":"dep","name":"m","size":10,"version":1}],"revision":2,"type":"desired","v":1}')


def test_schema_constraints_are_checked_on_receipt():
    doc = manifest().to_dict()
    for field, bad, reason in [("name", "", "name: invalid name '': is empty"),
                               ("runtime", "java", "runtime: Invalid enum value 'java'"),
                               ("collect_rate_ppm", 2_000_000, "collect_rate_ppm: Expected `int` <= 1000000")]:
        with pytest.raises(ProtocolError, match=reason):
            parse_manifest({**doc, field: bad})
    with pytest.raises(ProtocolError, match="unsupported schema version 2"):
        parse_manifest({**doc, "v": 2})
    with pytest.raises(ProtocolError, match=r"files.0.sha256"):
        parse_manifest({**doc, "files": [{**doc["files"][0], "sha256": "a" * 64 + "\n"}]})


@pytest.mark.parametrize("path", ["../../etc/x", "/etc/passwd", "a/../b", "a\\b", "", "a//b", "./a"])
def test_path_traversal_refused(path):
    with pytest.raises(ProtocolError, match="unsafe"):
        check_relative_path(path)
    doc = manifest().to_dict()
    doc["files"][0]["path"] = path
    with pytest.raises(ProtocolError, match="unsafe"):  # the same check guards every parsed manifest
        parse_manifest(doc)


def test_chunking_is_deterministic():
    data = os.urandom(600 * 1024)
    a, chunks = describe_file("f", [data[:1000], data[1000:]])
    b, _ = describe_file("f", [data])
    assert a == b and len(chunks) == 3 and b"".join(chunks) == data


@pytest.mark.parametrize(("url", "want"), [
    ("mqtt://localhost", ("localhost", 1883, False, None, None)),
    ("mqtts://u:p%40ss@h:8884", ("h", 8884, True, "u", "p@ss")),
])
def test_broker_url(url, want):
    u = parse_broker_url(url)
    assert (u.host, u.port, u.tls, u.username, u.password) == want
    with pytest.raises(ProtocolError):
        parse_broker_url("http://x")


def test_signatures_are_fast_enough_to_not_matter():
    """Not a timing assertion: a sanity check that sign/verify round-trips over many documents."""
    (k,) = keys(1)
    env = make_root({"root": [k], "release": [k], "director": [k]}, [k], expires=int(time.time()) + 60)
    root = load_trusted_root(env)
    for rev in range(2, 50):
        assert accept_desired(sign(desired(revision=rev, expires=int(time.time()) + 60), [k]), root, "dev-1", rev - 1)


def test_bake_policy_is_optional_and_absent_when_unset():
    plain = DesiredModule(name="m", version=1, bundle="a" * 64, size=10)
    assert "bake" not in plain.to_dict()  # unchanged bytes for states without a bake (older agents, old signatures)
    baked = DesiredModule(name="m", version=1, bundle="a" * 64, size=10, bake=BakePolicy(seconds=60))
    state = DesiredState(device="d", revision=1, expires=1, modules=[plain, baked])
    doc = state.to_dict()
    assert "bake" not in doc["modules"][0]
    assert doc["modules"][1]["bake"] == {"seconds": 60, "max_error_ppm": 50_000, "min_inferences": 20}
    assert validate(DesiredState, doc) == state
    with pytest.raises(ProtocolError, match="bake.seconds"):
        validate(DesiredModule, {**baked.to_dict(), "bake": {"seconds": 0}})
    with pytest.raises(ProtocolError, match="max_error_ppm"):
        validate(DesiredModule, {**baked.to_dict(), "bake": {"seconds": 5, "max_error_ppm": 0.05}})
