"""The hub's store, the same checks on both (SQLite and a real PostgreSQL): migrations applied once each,
databases from before versioning brought up to date, the SQL helpers, readers.

PostgreSQL's own (the dialect, time partitions, writers in two processes) and the leader's lease are in
tests/test_store_pg.py.
"""

from __future__ import annotations

import hashlib
import io
import sqlite3
import threading
import time
import uuid

import pytest

from hub.store import Database, StoreError, open_database
from hub.store.schema import MIGRATIONS, PARTITIONED, AddColumn


def test_both_stores_migrate_once_insert_ignore_upsert_and_return(db):
    assert db.schema_version == len(MIGRATIONS) and db.migrate() == 0
    assert {"devices", "leases", "mqtt_sessions", *PARTITIONED} <= db.db().tables()
    assert {"source", "endpoint"} <= db.db().columns("data_records")
    with db.transaction() as tx:
        assert tx.insert_many("chunks", ("digest", "blob", "offset", "length"), [("a", "b", 0, 1), ("c", "b", 1, 1)]) == 2
        assert tx.insert("chunks", {"digest": "a", "blob": "other", "offset": 5, "length": 5}, ignore=True) == 0
        tx.upsert("api_tokens", {"token_hash": "h", "name": "one", "role": "viewer", "created_at": 1.5}, ["token_hash"])
        tx.upsert("api_tokens", {"token_hash": "h", "name": "two", "role": "admin", "created_at": 2.5}, ["token_hash"])
        first = tx.scalar("INSERT INTO audit (ts, actor, action, subject) VALUES (1, 'a', 'x', 's') RETURNING id")
        second = tx.scalar("INSERT INTO audit (ts, actor, action, subject) VALUES (1, 'a', 'x', 's') RETURNING id")
    assert db.query("SELECT blob, offset, length FROM chunks ORDER BY digest") == [
        {"blob": "b", "offset": 0, "length": 1}, {"blob": "b", "offset": 1, "length": 1}]
    assert db.query("SELECT name, role, created_at FROM api_tokens") == [{"name": "two", "role": "admin",
                                                                          "created_at": 2.5}]
    assert second == first + 1
    assert db.scalar("SELECT sum(length) FROM chunks") == 2 and db.scalar("SELECT avg(length) FROM chunks") == 1
    with pytest.raises(StoreError), db.transaction() as tx:
        tx.insert("chunks", {"digest": "a", "blob": "b", "offset": 0, "length": 1})  # no ignore: a conflict fails
    assert db.scalar("SELECT count(*) FROM chunks") == 2  # and the failed transaction left nothing


def test_insert_new_returns_the_keys_stored_and_skips_the_rest(db):
    cols = ("device", "seq", "ts_min", "ts_max", "points", "keys", "data")
    now = time.time()
    rows = [("d", i, now, now, 1, "[]", bytes([i % 256]) * 50) for i in range(200)]  # many: PostgreSQL COPYs them
    with db.batch() as tx:
        assert tx.insert_new("telemetry_batches", cols, rows, key=("device", "seq")) == {("d", i) for i in range(200)}
    with db.batch() as tx:
        again = tx.insert_new("telemetry_batches", cols, rows[190:] + [("d", 200, now, now, 1, "[]", b"x")],
                              key=("device", "seq"))
    assert again == {("d", 200)}
    assert db.scalar("SELECT data FROM telemetry_batches WHERE seq = 7") == bytes([7]) * 50


def test_a_reader_is_read_only_and_usable_from_another_thread(db):
    with db.transaction() as tx:
        tx.insert("chunks", {"digest": "a", "blob": "b", "offset": 0, "length": 1})
    with db.reader() as conn:
        seen: list = []
        t = threading.Thread(target=lambda: seen.append(conn.query("SELECT digest FROM chunks")))
        t.start()
        t.join()
        assert seen == [[{"digest": "a"}]]
        with pytest.raises(StoreError, match="(?i)read.?only"):
            conn.execute("DELETE FROM chunks")


def test_an_appended_migration_runs_once_and_a_failing_one_changes_nothing(location, monkeypatch):
    open_database(location).close()
    step = ("CREATE TABLE IF NOT EXISTS runs (n INTEGER); INSERT INTO runs VALUES (1);",
            AddColumn("runs", "note", "TEXT NOT NULL DEFAULT 'x'"))
    monkeypatch.setattr("hub.store.schema.MIGRATIONS", [*MIGRATIONS, step])
    opened: list = []
    threads = [threading.Thread(target=lambda: opened.append(open_database(location))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [d.schema_version for d in opened] == [len(MIGRATIONS) + 1] * 3
    assert opened[0].query("SELECT n, note FROM runs") == [{"n": 1, "note": "x"}]
    for d in opened:
        d.close()
    monkeypatch.setattr("hub.store.schema.MIGRATIONS", [*MIGRATIONS, step, ("CREATE TABLE half (n INTEGER); NOT SQL;",)])
    with pytest.raises(StoreError):
        open_database(location)
    monkeypatch.setattr("hub.store.schema.MIGRATIONS", [*MIGRATIONS, step])
    d = open_database(location)
    assert d.schema_version == len(MIGRATIONS) + 1 and "half" not in d.db().tables()
    d.close()


def test_a_database_from_before_versioning_gets_its_missing_columns_and_keeps_its_rows(tmp_path):
    path = tmp_path / "hub.db"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE models (name TEXT NOT NULL, version INTEGER NOT NULL, framework TEXT NOT NULL, files TEXT NOT NULL,"
        " inputs TEXT NOT NULL, outputs TEXT NOT NULL, tags TEXT NOT NULL DEFAULT '{}', description TEXT NOT NULL"
        " DEFAULT '', created_at REAL NOT NULL, created_by TEXT NOT NULL DEFAULT '', PRIMARY KEY (name, version));"
        "INSERT INTO models (name, version, framework, files, inputs, outputs, created_at)"
        " VALUES ('m', 1, 'onnx', '[]', '[]', '[]', 1.0);"
        "CREATE TABLE data_records (device TEXT NOT NULL, seq INTEGER NOT NULL, idx INTEGER NOT NULL, ts REAL NOT NULL,"
        " module TEXT NOT NULL, version INTEGER NOT NULL, input TEXT, output TEXT, PRIMARY KEY (device, seq, idx));")
    old.close()
    db = Database(path)
    assert db.schema_version == len(MIGRATIONS)
    assert db.one("SELECT name, properties, lineage, baseline FROM models") == {
        "name": "m", "properties": "{}", "lineage": "{}", "baseline": None}
    assert {"source", "endpoint"} <= db.db().columns("data_records")
    assert "rollouts" in db.db().tables()
    db.close()


# --- the blob store's interface (hub/store/blobs.py), what every implementation must do -------------------------


@pytest.fixture(params=["directory", "s3"])
def blob_location(request, tmp_path, monkeypatch) -> str:
    """Where a blob store lives, of each kind: a directory, a bucket on a real S3-compatible server."""
    if request.param == "directory":
        return str(tmp_path / "blobs")
    s3 = request.getfixturevalue("s3")
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    return f"s3://{s3.bucket(f'blobs-{uuid.uuid4().hex[:8]}')}/hub-1"


def test_the_blob_store_keeps_content_by_its_digest_and_refuses_other_content(blob_location, tmp_path):
    from hub.store.blobs import BlobStore, blocks, open_blob_store

    store = open_blob_store(blob_location, cache=tmp_path / "cache")
    assert isinstance(store, BlobStore)
    data = bytes(range(256)) * 5000  # 1.28 MB: more than one block
    digest = store.put(data)
    assert digest == hashlib.sha256(data).hexdigest() and store.has(digest) and store.get(digest) == data
    assert store.put_stream(io.BytesIO(data)) == (digest, len(data))  # the same content: the same blob
    assert store.read_range(digest, 1000, 300) == data[1000:1300]
    with store.open(digest) as f:
        f.seek(len(data) - 10)
        assert f.read() == data[-10:]
    assert b"".join(blocks(store, digest, 4096)) == data
    assert store.path(digest).read_bytes() == data  # a local file (a remote store's read-through cache)
    with pytest.raises(ValueError, match="does not match"):
        store.put_blocks([b"other", b" bytes"], expected=digest)
    with pytest.raises(ValueError, match="not a sha256 digest"):
        store.get("../../etc/passwd")
    assert store.delete(digest) == len(data) and not store.has(digest) and store.delete(digest) == 0
    with pytest.raises(FileNotFoundError):
        store.open(digest)
    assert list(tmp_path.rglob(".incoming-*")) == []  # the refused upload left nothing behind
    assert store.read_range(store.put(b"small"), 2, 100) == b"all"  # a range past the end: what there is
