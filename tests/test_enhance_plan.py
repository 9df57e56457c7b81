"""Enhancement planning without Ray: key rules, output keys and collisions, skip decisions, run ids."""
from __future__ import annotations

import datetime as dt
import logging
import sqlite3
from collections import Counter

import pytest

from clipsr import storage
from clipsr.enhance import index as idx
from clipsr.enhance import plan
from clipsr.enhance.layout import RUN_ID_PATTERN, RunLayout, new_run_id
from clipsr.enhance.listing import classify_key, iter_inputs, output_format, output_key
from clipsr.enhance.routing import ModelRef, SingleModelRouter

MODEL = ModelRef(spec="/models/m.safetensors", id="cdasr-tiny-x4-aaaaaaaaaaaa", scale=4)
RUN = "20261126T221500Z-abc123"


@pytest.mark.parametrize("key, why", [
    ("a/../b.png", "'..' path segment"),
    ("/abs.png", "absolute key"),
    ("a//b.png", "empty path segment"),
    ("./a.png", "'.' path segment"),
    ("a\\b.png", "backslash"),
    ("a\x00b.png", "control character"),
])
def test_unsafe_keys_are_failed_without_an_output(key, why):
    decision = classify_key(key)
    assert decision.kind == "unsafe" and decision.output_key is None
    assert decision.reason.startswith("unsafe key, not read") and why in decision.reason


def test_keys_that_are_not_inputs_are_ignored_with_a_reason():
    assert classify_key("notes.txt").kind == "ignored"
    assert "(.txt)" in classify_key("notes.txt").reason
    assert classify_key("README").reason.startswith("not an image file name (no extension)")
    assert "hidden" in classify_key("a/.DS_Store").reason
    assert classify_key(".cache/x.png").kind == "ignored"


def test_outputs_never_land_in_the_jobs_own_state():
    assert classify_key("_index/a.png").kind == "reserved"
    assert classify_key("_manifests/run=1/x.png").kind == "reserved"
    assert classify_key("data/_index/a.png").kind == "candidate"  # only the top level is reserved


def test_output_key_keeps_the_relative_key_or_replaces_the_extension():
    assert output_key("a/b/c.JPG") == "a/b/c.JPG"
    assert output_key("a/b/c.JPG", "png") == "a/b/c.png"
    assert output_key("x.tar.png", "jpeg") == "x.tar.jpg"
    assert output_key("v1.2/scan.tiff", "webp") == "v1.2/scan.webp"
    assert output_format("a/b.JPG") == "JPEG" and output_format("a/b.JPG", "tiff") == "TIFF"
    assert classify_key("a/b.jpeg", "tiff").output_key == "a/b.tif"


def test_run_ids_start_with_the_utc_start_time_and_sort_by_it():
    t = dt.datetime(2026, 11, 26, 22, 15, 0, tzinfo=dt.timezone.utc)
    first = new_run_id(t)
    assert first.startswith("20261126T221500Z-") and RUN_ID_PATTERN.match(first)
    assert new_run_id(t) != first  # random suffix: two runs started in the same second differ
    later = new_run_id(dt.datetime(2026, 11, 26, 23, 15, tzinfo=dt.timezone(dt.timedelta(hours=1))))
    assert later.startswith("20261126T221500Z")  # converted to UTC
    in_time_order = [new_run_id(t + dt.timedelta(seconds=s)) for s in (1, 2, 3)]
    assert sorted(reversed(in_time_order)) == in_time_order
    with pytest.raises(ValueError, match="timezone"):
        new_run_id(dt.datetime(2026, 1, 1))


def test_layout_derives_every_path_from_the_output_prefix(tmp_path):
    layout = RunLayout.create(f"{tmp_path}/in", f"{tmp_path}/enhanced", None, RUN)
    assert layout.manifest == f"{tmp_path}/enhanced/_manifests" and layout.owner == f"{tmp_path}/enhanced/_owner.json"
    assert layout.manifest_run() == f"{tmp_path}/enhanced/_manifests/run={RUN}"
    s3 = RunLayout.create("s3://b/in/", "s3://b/out", "s3://b/reports", RUN)
    assert (s3.input, s3.lock, s3.manifest_run()) == ("s3://b/in", "s3://b/out/_lock", f"s3://b/reports/run={RUN}")
    # prefixes that only share the start of a name do not overlap
    assert RunLayout.create("s3://b/archive", "s3://b/archive2", "s3://b/archive-manifests", RUN)


@pytest.mark.parametrize("inp, out, manifest, flag, why", [
    ("s3://b/in", "s3://b/in/", None, "--output", "same prefix"),
    ("s3://b/archive", "s3://b", None, "--output", "'archive/x.png' would be written over the input 'x.png'"),
    ("s3://b/out/_index", "s3://b/out", None, "--output", "--input lies inside --output"),
    ("s3://b/in", "s3://b/in/enhanced", None, "--output", "--output lies inside --input"),
    ("s3://b/in", "s3://b/out", "s3://b/in/_manifests", "--manifest", "--manifest lies inside --input"),
    ("s3://b/in", "s3://b/out", "s3://b", "--manifest", "--input lies inside --manifest"),
    ("s3://b/in", "s3://b/out", "s3://b/in", "--manifest", "same prefix"),
])
def test_layout_refuses_input_and_output_or_manifest_prefixes_that_overlap(inp, out, manifest, flag, why):
    with pytest.raises(ValueError, match="overlap") as refused:
        RunLayout.create(inp, out, manifest, RUN)
    message = str(refused.value)
    assert message.startswith(f"{flag} ") and why in message and "do not contain each other" in message


def test_listing_leaves_out_outputs_inside_the_input_and_stops_at_the_limit(tmp_path):
    for name in ("a.png", "b.png", "c.png", "enhanced/a.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    keys = sorted(o.key for o in iter_inputs(str(tmp_path), ["enhanced/"]))
    assert keys == ["a.png", "b.png", "c.png"]
    assert len(list(iter_inputs(str(tmp_path), ["enhanced/"], limit=2))) == 2


# --- decisions -------------------------------------------------------------------------------


class ListSink:
    def __init__(self):
        self.processed, self.recorded = [], []

    def process(self, row):
        self.processed.append(row)

    def record(self, row):
        self.recorded.append(row)


def _obj(key, size=10, etag="e1", mtime=1_700_000_000.0):
    return storage.ObjectInfo(uri=f"s3://in/{key}", key=key, size=size, etag=etag, mtime=mtime)


def _decide(objects, fmt=None, index_rows=(), outputs=(), model=MODEL, retry_failed=False):
    db = sqlite3.connect(":memory:")
    plan.create_tables(db)
    idx.create_table(db)
    idx.upsert(db, index_rows)
    plan.load_outputs(db, outputs)
    plan.load_listing(db, objects, fmt)
    layout = RunLayout.create("s3://in", "s3://out", None, RUN)
    sink = ListSink()
    counts = plan.decide(db, layout, SingleModelRouter(model), 4, fmt, sink, retry_failed=retry_failed)
    return counts, sink


def _index_row(key, size=10, etag="e1", mtime_ms=1_700_000_000_000, model=MODEL.id, out_size=99,
               run="20261101T000000Z-000000", out_key=None, scale=4):
    return (key, size, etag, mtime_ms, model, None, "default", scale, f"s3://out/{out_key or key}", out_size, run,
            None, None, None, None, "ok", None, None)


def _failed_row(key, error, size=10, etag="e1", run="20261101T000000Z-000000", scale=4):
    return (key, size, etag, 1_700_000_000_000, None, None, None, scale, None, None, run, None, None, None, None,
            "failed", error, None)


def _out(key, size=99):
    return storage.ObjectInfo(uri=f"s3://out/{key}", key=key, size=size, etag="o", mtime=1.0)


def test_every_listed_key_is_decided_exactly_once():
    keys = ["a.png", "notes.txt", "a/../b.png", "_index/x.png", "sub/c.jpg", ".hidden.png"]
    counts, sink = _decide([_obj(k) for k in keys])
    decided = [r["input_key"] for r in sink.processed] + [r["input_key"] for r in sink.recorded]
    assert sorted(decided) == sorted(keys) and counts.listed == len(keys)
    assert {r["input_key"] for r in sink.processed} == {"a.png", "sub/c.jpg"}
    by_key = {r["input_key"]: r for r in sink.recorded}
    assert by_key["a/../b.png"]["status"] == "failed" and by_key["_index/x.png"]["status"] == "failed"
    assert by_key["notes.txt"]["status"] == "skipped" and by_key[".hidden.png"]["status"] == "skipped"
    assert counts.statuses == {"failed": 2, "skipped": 2} and counts.models == {MODEL.id: 2}
    row = next(r for r in sink.processed if r["input_key"] == "sub/c.jpg")
    assert row["output_uri"] == "s3://out/sub/c.jpg" and row["output_format"] == "JPEG"
    assert row["model_spec"] == MODEL.spec and row["domain"] == "default" and row["input_mtime_ms"] == 1_700_000_000_000


def test_colliding_outputs_fail_every_input_after_the_first_in_sorted_order():
    counts, sink = _decide([_obj(k) for k in ("b.webp", "b.png", "B.png", "b.jpg", "c.png")], fmt="webp")
    assert sorted(r["input_key"] for r in sink.processed) == ["B.png", "b.jpg", "c.png"]
    failed = {r["input_key"]: r["error"] for r in sink.recorded}
    assert set(failed) == {"b.png", "b.webp"}
    assert all("output key collision: 'b.webp'" in e and "'b.jpg'" in e for e in failed.values())
    assert all(r.get("output_uri") is None for r in sink.recorded)


def test_unchanged_inputs_are_skipped_and_any_change_reprocesses():
    keys = ("same.png", "etag.png", "size.png", "model.png", "gone.png", "outsize.png", "new.png", "model-gone.png")
    objects = [_obj(k) for k in keys]
    objects[1] = _obj("etag.png", etag="e2")
    objects[2] = _obj("size.png", size=11)
    rows = [_index_row("same.png"), _index_row("etag.png"), _index_row("size.png"),
            _index_row("model.png", model="other-model"), _index_row("gone.png"), _index_row("outsize.png"),
            _index_row("model-gone.png", model="other-model")]
    outputs = [_out(k) for k in ("same.png", "etag.png", "size.png", "model.png", "outsize.png")]
    outputs[4] = _out("outsize.png", size=5)
    counts, sink = _decide(objects, index_rows=rows, outputs=outputs)
    assert [r["input_key"] for r in sink.recorded] == ["same.png"]
    skipped = sink.recorded[0]
    assert skipped["status"] == "skipped" and skipped["previous_run_id"] == "20261101T000000Z-000000"
    assert skipped["error"].startswith("unchanged since run 20261101T000000Z-000000: same size, ETag")
    assert sorted(r["input_key"] for r in sink.processed) == sorted(
        ["etag.png", "size.png", "model.png", "gone.png", "outsize.png", "new.png", "model-gone.png"])
    # what a run names before it starts: only the input that its model alone sends back (a pin
    # would not save model-gone.png, whose output is missing)
    assert counts.model_changed == {("other-model", MODEL.id): 1}


def test_without_etags_the_mtime_decides():
    local = [storage.ObjectInfo(uri=f"/in/{k}", key=k, size=10, etag=None, mtime=m)
             for k, m in (("same.png", 1_700_000_000.0004), ("touched.png", 1_700_000_100.0))]
    rows = [_index_row("same.png", etag=None), _index_row("touched.png", etag=None)]
    _, sink = _decide(local, index_rows=rows, outputs=[_out("same.png"), _out("touched.png")])
    assert [r["input_key"] for r in sink.recorded] == ["same.png"]
    assert "mtime" in sink.recorded[0]["error"]
    assert [r["input_key"] for r in sink.processed] == ["touched.png"]


def test_a_format_change_reprocesses_because_the_output_differs():
    _, sink = _decide([_obj("a.png")], fmt="webp", index_rows=[_index_row("a.png")],
                      outputs=[_out("a.png"), _out("a.webp")])
    assert [r["output_uri"] for r in sink.processed] == ["s3://out/a.webp"]


def test_an_output_made_from_another_input_in_an_earlier_run_is_never_overwritten():
    # a.png made a.webp in an earlier run; a new a.jpg (first in sorted order) maps to it too
    index = [_index_row("a.png", out_key="a.webp")]
    counts, sink = _decide([_obj("a.jpg"), _obj("a.png")], fmt="webp", index_rows=index, outputs=[_out("a.webp")])
    assert sink.processed == [] and counts.statuses == {"failed": 1, "skipped": 1}
    by_key = {r["input_key"]: r for r in sink.recorded}
    assert by_key["a.png"]["status"] == "skipped"
    assert by_key["a.jpg"]["status"] == "failed" and by_key["a.jpg"]["error"].startswith(
        "output key collision: 'a.webp' is already the output of 'a.png', from an earlier run")
    # a.png gone from the input, its output still there: still not overwritten
    _, sink = _decide([_obj("a.jpg")], fmt="webp", index_rows=index, outputs=[_out("a.webp")])
    assert sink.processed == [] and "already the output of 'a.png' from an earlier run" in sink.recorded[0]["error"]
    # and once that output is deleted too, a.jpg may have the key
    _, sink = _decide([_obj("a.jpg")], fmt="webp", index_rows=index)
    assert [r["output_uri"] for r in sink.processed] == ["s3://out/a.webp"]


def test_the_input_that_made_an_output_takes_it_back_before_the_others():
    index = [_index_row("a.png", out_key="a.webp")]
    _, sink = _decide([_obj("a.jpg"), _obj("a.png")], fmt="webp", index_rows=index)  # a.webp was deleted
    assert [r["input_key"] for r in sink.processed] == ["a.png"]
    assert sink.recorded[0]["input_key"] == "a.jpg" and "collision" in sink.recorded[0]["error"]


CORRUPT = "truncated or corrupt image: image file is truncated"


def test_a_permanent_failure_is_carried_forward_unread_while_the_input_is_unchanged():
    objects = [_obj("bad.png"), _obj("grown.png", size=11), _obj("etag.png", etag="e2"), _obj("a/../b.png")]
    index = [_failed_row("bad.png", CORRUPT), _failed_row("grown.png", CORRUPT), _failed_row("etag.png", CORRUPT),
             _failed_row("a/../b.png", "unsafe key, not read: '..' path segment in key: 'a/../b.png'")]
    counts, sink = _decide(objects, index_rows=index)
    assert sorted(r["input_key"] for r in sink.processed) == ["etag.png", "grown.png"]
    by_key = {r["input_key"]: r for r in sink.recorded}
    assert set(by_key) == {"bad.png", "a/../b.png"} and counts.carried == 2 and counts.statuses == {"failed": 2}
    bad = by_key["bad.png"]
    assert bad["status"] == "failed" and bad["carried_forward"] is True
    assert bad["previous_run_id"] == "20261101T000000Z-000000"
    assert bad["error"] == f"carried forward from run 20261101T000000Z-000000: {CORRUPT}"
    assert by_key["a/../b.png"]["carried_forward"] and counts.reasons == {"failed: carried forward": 2}


def test_retry_failed_and_another_scale_read_permanent_failures_again():
    index = [_failed_row("bad.png", CORRUPT)]
    counts, sink = _decide([_obj("bad.png")], index_rows=index, retry_failed=True)
    assert [r["input_key"] for r in sink.processed] == ["bad.png"] and counts.carried == 0
    _, sink = _decide([_obj("bad.png")], index_rows=[_failed_row("bad.png", CORRUPT, scale=2)])
    assert [r["input_key"] for r in sink.processed] == ["bad.png"]  # the pixel limit depends on the scale


def test_decode_groups_hold_many_thumbnails_but_a_large_input_alone():
    kb = 1 << 10
    assert plan.group_rows([7 * kb] * 40, max_rows=16) == [(0, 16), (16, 32), (32, 40)]
    mixed = [300 * kb, 300 * kb, 300 * kb, 300 * kb, 5 << 20, 10 * kb, None]
    assert plan.group_rows(mixed, max_rows=16) == [(0, 3), (3, 4), (4, 5), (5, 7)]
    assert plan.group_rows([], max_rows=16) == []


def test_plan_parts_are_read_back_in_groups_that_keep_every_row_once(tmp_path):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipsr.enhance import rows as R

    parts = []
    for p in range(2):
        rows = [dict.fromkeys(R.PLAN.names) | {"input_key": f"{p}/{i:02d}.png", "input_size": 200 << 10, "scale": 4}
                for i in range(25)]
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=R.PLAN), buf)
        parts.append(str(tmp_path / f"part-{p}.parquet"))
        storage.write_bytes_atomic(parts[-1], buf.getvalue())
    groups = plan.read_plan_parts(pa.table({"part": parts}), max_rows=8)
    table, lengths = R.ungroup(groups, R.PLAN)
    assert lengths == [5] * 10  # five inputs of 200 KiB fill the 1 MiB of a group before eight rows do
    assert table.column("input_key").to_pylist() == [f"{p}/{i:02d}.png" for p in range(2) for i in range(25)]
    regrouped = R.group(table, lengths)
    assert R.ungroup(regrouped.slice(3, 2), R.PLAN)[1] == lengths[3:5]


def test_a_run_names_its_largest_changes_of_model_and_counts_the_rest(caplog):
    """After many domains changed version, the console gets a few lines before the run, not one per domain."""
    from clipsr.enhance.run import _warn_model_changed  # imports Ray

    changed = Counter({(f"old-{i}", f"new-{i}"): 10 - i for i in range(7)})
    with caplog.at_level(logging.WARNING, logger="clipsr.enhance.run"):
        _warn_model_changed(changed)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:5] == [f"{10 - i} unchanged inputs are enhanced again: their output is from model old-{i}, "
                         f"this run's is new-{i}" for i in range(5)]
    assert lines[5:] == ["9 more unchanged inputs are enhanced again, under 2 other changes of model"]
