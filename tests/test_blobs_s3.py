"""Blobs in an S3-compatible bucket (hub/store/s3blobs.py) against a real S3 server (tests/s3.py: moto_server):
replicas with caches of their own share one bucket, a tampered object is refused, and a hub keeps its models there."""

from __future__ import annotations

import hashlib
import uuid

import pytest

from hub.store.s3blobs import S3BlobStore, parse_s3_url
from modules.examples import write_logreg_onnx

pytestmark = pytest.mark.hubstore  # run again on PostgreSQL by scripts/test.sh (the hub test below)


@pytest.fixture
def bucket(s3, monkeypatch) -> str:
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    return s3.bucket(f"edgefleet-{uuid.uuid4().hex[:8]}")


def test_two_replicas_with_their_own_caches_share_one_bucket_and_refuse_a_tampered_object(s3, bucket, tmp_path):
    one, two = (S3BlobStore(f"s3://{bucket}/blobs", tmp_path / name) for name in ("one", "two"))
    data = bytes(range(256)) * 40
    digest = one.put(data)
    assert s3.client().head_object(Bucket=bucket, Key=f"blobs/{digest}")["ContentLength"] == len(data)
    assert two.has(digest) and not two.cache.has(digest)
    assert two.read_range(digest, 5, 10) == data[5:15] and not two.cache.has(digest)  # a ranged GET, nothing cached
    assert two.path(digest).read_bytes() == data and two.cache.has(digest)  # read through, then local
    s3.client().put_object(Bucket=bucket, Key=f"blobs/{'0' * 64}", Body=b"not the bytes this name promises")
    with pytest.raises(ValueError, match="does not match"):
        two.path("0" * 64)
    assert not two.cache.has("0" * 64)
    with pytest.raises(FileNotFoundError, match="not in s3://"):
        two.open("f" * 64)
    assert two.delete(digest) == len(data) and not one.has(digest)


def test_s3_urls_name_a_bucket_and_a_prefix():
    assert parse_s3_url("s3://b") == ("b", "")
    assert parse_s3_url("s3://b/hub/blobs/") == ("b", "hub/blobs/")
    with pytest.raises(ValueError, match="s3://bucket"):
        parse_s3_url("/var/blobs")


@pytest.fixture
def hub_options(s3, bucket) -> dict:
    return {"blobs_dir": f"s3://{bucket}/hub"}


def test_a_hub_keeps_its_model_files_in_the_bucket(server, admin, s3, bucket, tmp_path):
    model = write_logreg_onnx(tmp_path / "model.onnx")
    r = admin.post("/api/v1/models", data={"name": "churn"},
                   files=[("files", (model.name, model.read_bytes(), "application/octet-stream"))])
    assert r.status_code == 200, r.text
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    keys = {o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket).get("Contents", [])}
    assert f"hub/{digest}" in keys
    assert not (server.config.data_dir / "blobs").exists()  # nothing in the data directory's blob store
    got = admin.get("/api/v1/models/churn/versions/1/files/model.onnx")
    assert got.status_code == 200 and got.content == model.read_bytes()
    assert admin.delete("/api/v1/models/churn/versions/1").status_code == 200
    keys = {o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket).get("Contents", [])}
    assert f"hub/{digest}" not in keys  # the unreferenced blob collected from the bucket too
