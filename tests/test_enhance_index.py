"""The incremental index and the manifest format, without Ray."""
from __future__ import annotations

import io
import sqlite3

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipsr import storage
from clipsr.config import ConfigError, load_schema, validate
from clipsr.enhance import index as idx
from clipsr.enhance import manifest

OLD, MID, NEW = "20261101T000000Z-000000", "20261102T000000Z-000000", "20261103T000000Z-000000"


def _row(key, run, status="ok", **extra):
    row = {"run_id": run, "input_key": key, "input_uri": f"s3://in/{key}", "status": status,
           "output_uri": f"s3://out/{key}" if status == "ok" else None,
           "error": None if status == "ok" else "corrupt", "input_size": 10, "input_etag": "e",
           "input_mtime": 1_700_000_000_000, "scale": 4, "model_id": "m1", "domain": "default",
           "output_size": 99, "input_sha256": "sha256:" + "0" * 64 if status == "ok" else None}
    row.update(extra)
    return row


def _db():
    db = sqlite3.connect(":memory:")
    idx.create_table(db)
    return db


def _keys(db):
    return dict(db.execute("SELECT key, run_id FROM idx ORDER BY key").fetchall())


def test_manifest_arrow_schema_is_the_published_one():
    doc = load_schema("manifest")
    schema = manifest.arrow_schema()
    assert schema.names == doc["required"] == list(doc["properties"])
    for name in ("run_id", "input_uri", "status", "input_key", "input_size", "scale"):
        assert not schema.field(name).nullable
    for name in ("output_uri", "error", "domain", "model_id", "model_version", "clip_encoder", "input_etag"):
        assert schema.field(name).nullable
    assert schema.field("input_mtime").type == pa.timestamp("ms", tz="UTC")
    assert schema.metadata[b"clipsr.manifest.version"] == b"3"


def test_manifest_parts_are_named_by_their_keys_and_overwrite_on_retry(tmp_path):
    rows = [_row("a.png", NEW), _row("b.png", NEW, status="failed")]
    first = manifest.write_part(rows, str(tmp_path))
    again = manifest.write_part(list(reversed(rows)), str(tmp_path))  # a retried task, other order
    assert first == again and len(list(manifest.iter_parts(str(tmp_path)))) == 1
    table = manifest.read_part(first)
    assert table.schema.equals(manifest.arrow_schema(), check_metadata=False)
    for row in table.to_pylist():
        validate(manifest.json_row(row), "manifest")
    assert manifest.count_statuses(str(tmp_path)) == {"ok": 1, "failed": 1}


def test_manifest_refuses_rows_that_break_the_contract(tmp_path):
    with pytest.raises(ValueError, match="breaks the contract"):
        manifest.write_part([_row("a.png", NEW, status="failed", output_uri="s3://out/a.png")], str(tmp_path))
    with pytest.raises(ValueError, match="breaks the contract"):
        manifest.write_part([_row("a.png", NEW, status="ok", error="x")], str(tmp_path))
    complete = manifest.to_table([_row("a.png", "yesterday")]).to_pylist()[0]  # every column, nulls filled
    with pytest.raises(ConfigError, match="run_id"):
        validate(manifest.json_row(complete), "manifest")
    assert list(manifest.iter_parts(str(tmp_path))) == []


def test_an_older_run_never_replaces_a_newer_rows_state():
    db = _db()
    idx.upsert(db, [("a.png", 1, "e", 0, "m", None, "d", 4, "u", 1, MID, None, None, None, None, "ok", None, None)])
    idx.upsert(db, [("a.png", 2, "e", 0, "m", None, "d", 4, "u", 1, OLD, None, None, None, None, "ok", None, None),
                    ("b.png", 2, "e", 0, "m", None, "d", 4, "u", 1, OLD, None, None, None, None, "ok", None, None)])
    idx.upsert(db, [("b.png", 3, "e", 0, "m", None, "d", 4, "u", 1, NEW, None, None, None, None, "ok", None, None)])
    assert db.execute("SELECT key, size, run_id FROM idx ORDER BY key").fetchall() == [
        ("a.png", 1, MID), ("b.png", 3, NEW)]


def test_merge_takes_only_ok_rows_and_permanent_failures_of_a_runs_manifest(tmp_path):
    run_uri = str(tmp_path / f"run={NEW}")
    manifest.write_part([_row("a.png", NEW), _row("bad.png", NEW, status="failed", error="read/decode failed: "
                                                                                         "TimeoutError")], run_uri)
    manifest.write_part([_row("c.png", NEW, status="skipped", output_uri=None, error="unchanged")], run_uri)
    db = _db()
    assert idx.merge_run(db, run_uri) == 1
    assert db.execute("SELECT * FROM idx").fetchall() == [
        ("a.png", 10, "e", 1_700_000_000_000, "m1", None, "default", 4, "s3://out/a.png", 99, NEW, None, None, None,
         None, "ok", None, None)]
    assert idx.merge_run(db, str(tmp_path / "run=missing")) == 0


def test_runs_register_when_they_start_and_commit_a_new_generation(tmp_path):
    store = idx.IndexStore(str(tmp_path / "_index"))
    assert store.read_meta().parts == [] and store.begin(OLD, "m") == []
    assert store.begin(MID, "m") == [{"run_id": OLD, "manifest": "m"}]  # OLD never finished
    db = _db()
    idx.upsert(db, [("b.png", 1, None, 5, "m", None, "d", 4, "u", 1, MID, None, None, None, None, "ok", None, None),
                    ("a.png", 1, "e", 5, "m", None, "d", 4, "u", 1, MID, None, None, None, None, "ok", None, None)])
    meta = store.commit(db, MID, merged=[OLD, MID])
    assert meta.in_progress == [] and meta.rows == 2 and meta.parts == [f"gen={MID}/part-00000.parquet"]
    assert store.read_meta().generation == MID
    table = pq.read_table(io.BytesIO((tmp_path / "_index" / meta.parts[0]).read_bytes()))
    assert table.column("key").to_pylist() == ["a.png", "b.png"]  # sorted by key
    # the next run sees the generation, and its commit removes the old parts
    store.begin(NEW, "m")
    loaded = _db()
    assert store.load(loaded, store.read_meta()) == 2 and _keys(loaded) == {"a.png": MID, "b.png": MID}
    store.commit(loaded, NEW, merged=[NEW])
    files = sorted(p.relative_to(tmp_path / "_index").as_posix() for p in (tmp_path / "_index").rglob("*")
                   if p.is_file() and not p.name.startswith("."))  # .index.json.lock: local compare-and-swap
    assert files == [f"gen={NEW}/part-00000.parquet", "index.json"]


def test_a_commit_keeps_runs_it_did_not_merge_in_progress(tmp_path):
    store = idx.IndexStore(str(tmp_path))
    store.begin(OLD, "m")
    store.begin(NEW, "m")
    meta = store.commit(_db(), NEW, merged=[NEW])
    assert meta.in_progress == [{"run_id": OLD, "manifest": "m"}] and meta.parts == []


@pytest.fixture(params=["local", "s3"])
def index_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "_index")
    return f"{request.getfixturevalue('s3_bucket')}/out/_index"


def _generations(index_uri):
    return {o.key.split("/", 1)[0] for o in storage.iter_objects(index_uri) if o.key.startswith("gen=")}


def test_a_run_that_lost_its_lock_cannot_commit_over_the_run_that_took_it(index_uri):
    first = idx.IndexStore(index_uri)
    first.begin(OLD, "m")
    db = _db()
    idx.upsert(db, [("a.png", 1, "e", 0, "m", None, "d", 4, "u", 1, OLD, None, None, None, None, "ok", None, None)])
    first.commit(db, OLD, merged=[OLD])
    stale, taker = idx.IndexStore(index_uri), idx.IndexStore(index_uri)
    stale.begin(MID, "m")
    taker.begin(NEW, "m")  # NEW took the lock over and registered
    registered = storage.read_bytes(f"{index_uri}/index.json")
    db = _db()
    idx.upsert(db, [("a.png", 2, "e", 0, "m", None, "d", 4, "u", 1, MID, None, None, None, None, "ok", None, None)])
    with pytest.raises(idx.IndexFencedError, match=f"after run {MID} registered"):
        stale.commit(db, MID, merged=[OLD, MID])
    # nothing of NEW's changed, and the generation NEW loaded is still there for it (or its rerun)
    assert storage.read_bytes(f"{index_uri}/index.json") == registered
    assert _generations(index_uri) == {f"gen={OLD}"}
    db = _db()
    idx.upsert(db, [("a.png", 3, "e", 0, "m", None, "d", 4, "u", 1, NEW, None, None, None, None, "ok", None, None)])
    meta = taker.commit(db, NEW, merged=[MID, NEW])
    assert meta.generation == NEW and meta.in_progress == []
    assert _generations(index_uri) == {f"gen={NEW}"}
    loaded = _db()
    assert idx.IndexStore(index_uri).load(loaded, idx.IndexStore(index_uri).read_meta()) == 1
    assert _keys(loaded) == {"a.png": NEW}



def test_permanent_failures_enter_the_index_and_keep_their_keys_earlier_output(tmp_path):
    db = _db()
    idx.upsert(db, [("a.png", 10, "e", 0, "m1", None, "default", 4, "s3://out/a.png", 99, OLD, None, None, None, None,
                     "ok", None, None)])
    run_uri = str(tmp_path / f"run={NEW}")
    corrupt = "truncated or corrupt image: image file is truncated"
    carried = f"carried forward from run {OLD}: {corrupt}"
    manifest.write_part([_row("a.png", NEW, status="failed", error=corrupt, input_size=7),
                         _row("b.png", NEW, status="failed", error="inference stopped: over the time limit"),
                         _row("c.png", NEW, status="failed", error=carried, carried_forward=True,
                              previous_run_id=OLD)], run_uri)
    assert idx.merge_run(db, run_uri) == 1
    # a.png now fails for good; its output from OLD stays its own, so no other input can take it
    assert db.execute("SELECT key, size, status, error, output_uri, output_size, run_id FROM idx").fetchall() == [
        ("a.png", 7, "failed", corrupt, "s3://out/a.png", 99, NEW)]


def test_a_version_1_index_is_read_as_ok_rows(tmp_path):
    store = idx.IndexStore(str(tmp_path))
    v1 = pa.schema([f for f in idx.SCHEMA if f.name not in ("status", "error", "route_descriptor")])
    row = {"key": "a.png", "size": 1, "output_uri": "s3://out/a.png", "run_id": OLD}
    table = pa.Table.from_pylist([row], schema=v1)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    (tmp_path / f"gen={OLD}").mkdir()
    (tmp_path / f"gen={OLD}" / "part-00000.parquet").write_bytes(buf.getvalue())
    (tmp_path / "index.json").write_text(f'{{"version": 1, "generation": "{OLD}", "parts": '
                                         f'["gen={OLD}/part-00000.parquet"], "rows": 1, "in_progress": []}}')
    db = _db()
    assert store.load(db, store.read_meta()) == 1
    assert db.execute("SELECT key, status, error, run_id FROM idx").fetchall() == [("a.png", "ok", None, OLD)]
    store.begin(NEW, "m")
    store.commit(db, NEW, merged=[NEW])
    written = (tmp_path / "index.json").read_bytes()
    assert store.read_meta().rows == 1 and f'"version": {idx.INDEX_VERSION}'.encode() in written
