"""The hub's store: migrations applied once each, databases from before versioning brought up to date, the SQL helpers."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from hub.store import Database, StoreError
from hub.store.schema import MIGRATIONS, AddColumn


def test_a_new_database_has_every_table_at_the_latest_version(tmp_path):
    db = Database(tmp_path / "hub.db")
    assert db.schema_version == len(MIGRATIONS)
    tables = db.db().tables()
    for table in ("devices", "models", "rollouts", "telemetry_batches", "alert_rules", "endpoints", "ingest_workers"):
        assert table in tables
    assert {"source", "endpoint"} <= db.db().columns("data_records")
    assert db.migrate() == 0
    db.close()


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


def test_an_appended_migration_runs_once_however_often_and_from_however_many_threads_the_file_is_opened(
        tmp_path, monkeypatch):
    Database(tmp_path / "hub.db").close()
    step = ("CREATE TABLE IF NOT EXISTS runs (n INTEGER); INSERT INTO runs VALUES (1);",
            AddColumn("runs", "note", "TEXT NOT NULL DEFAULT 'x'"))
    monkeypatch.setattr("hub.store.db.MIGRATIONS", [*MIGRATIONS, step])
    opened: list[Database] = []
    threads = [threading.Thread(target=lambda: opened.append(Database(tmp_path / "hub.db"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    db = Database(tmp_path / "hub.db")
    assert db.schema_version == len(MIGRATIONS) + 1
    assert db.query("SELECT n, note FROM runs") == [{"n": 1, "note": "x"}]
    for d in [*opened, db]:
        d.close()


def test_a_failing_migration_leaves_the_database_as_it_was(tmp_path, monkeypatch):
    Database(tmp_path / "hub.db").close()
    monkeypatch.setattr("hub.store.db.MIGRATIONS", [*MIGRATIONS, ("CREATE TABLE half (n INTEGER); NOT SQL;",)])
    with pytest.raises(StoreError):
        Database(tmp_path / "hub.db")
    monkeypatch.undo()
    db = Database(tmp_path / "hub.db")
    assert db.schema_version == len(MIGRATIONS)
    assert "half" not in db.db().tables()
    db.close()


def test_insert_ignore_upsert_and_returning(tmp_path):
    db = Database(tmp_path / "hub.db")
    with db.transaction() as tx:
        assert tx.insert_many("chunks", ("digest", "blob", "offset", "length"), [("a", "b", 0, 1), ("c", "b", 1, 1)]) == 2
        assert tx.insert("chunks", {"digest": "a", "blob": "other", "offset": 5, "length": 5}, ignore=True) == 0
        tx.upsert("api_tokens", {"token_hash": "h", "name": "one", "role": "viewer", "created_at": 1.0}, ["token_hash"])
        tx.upsert("api_tokens", {"token_hash": "h", "name": "two", "role": "admin", "created_at": 2.0}, ["token_hash"])
        first = tx.scalar("INSERT INTO audit (ts, actor, action, subject) VALUES (1, 'a', 'x', 's') RETURNING id")
        second = tx.scalar("INSERT INTO audit (ts, actor, action, subject) VALUES (1, 'a', 'x', 's') RETURNING id")
    assert db.one("SELECT blob FROM chunks WHERE digest = 'a'") == {"blob": "b"}
    assert db.query("SELECT name, role, created_at FROM api_tokens") == [{"name": "two", "role": "admin",
                                                                          "created_at": 2.0}]
    assert second == first + 1 and db.scalar("SELECT count(*) FROM audit") == 2
    with pytest.raises(StoreError), db.transaction() as tx:
        tx.insert("chunks", {"digest": "a", "blob": "b", "offset": 0, "length": 1})  # no ignore: a conflict fails
    db.close()


def test_a_reader_is_read_only_and_usable_from_another_thread(tmp_path):
    db = Database(tmp_path / "hub.db")
    with db.transaction() as tx:
        tx.insert("chunks", {"digest": "a", "blob": "b", "offset": 0, "length": 1})
    with db.reader() as conn:
        seen: list = []
        t = threading.Thread(target=lambda: seen.append(conn.query("SELECT digest FROM chunks")))
        t.start()
        t.join()
        assert seen == [[{"digest": "a"}]]
        with pytest.raises(StoreError, match="readonly"):
            conn.execute("DELETE FROM chunks")
    db.close()
