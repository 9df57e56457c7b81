"""`clipsr enhance` end to end: a local S3 server (moto), a local Ray, the manifest as other tools read it."""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
import tifffile
import torch
from PIL import Image, ImageCms

from clipsr import imaging, storage
from clipsr.cli import main
from clipsr.config import validate
from clipsr.enhance import index as idx
from clipsr.enhance import manifest
from clipsr.factory import create_model, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SECRET = "s3cr3t-value-that-must-never-be-printed"
ORIENTATION = 0x0112


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny-x2.safetensors"
    save_checkpoint(str(path), create_model("cdasr-tiny", 2), "cdasr-tiny")
    return str(path)


def _save(array, fmt, mode=None, **kw) -> bytes:
    buf = io.BytesIO()
    im = Image.fromarray(array)
    (im.convert(mode) if mode else im).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "clipsr-test-camera"
    exif[ORIENTATION] = orientation
    return exif.tobytes()


def _tiff16(h, w) -> bytes:
    buf = io.BytesIO()
    values = np.random.default_rng(3).integers(0, 65535, (h, w, 3), dtype=np.uint16)
    tifffile.imwrite(buf, values, photometric="rgb", compression="zlib")
    return buf.getvalue()


def _archive() -> tuple[dict[str, bytes], dict[str, tuple[int, int, int]]]:
    """Objects to upload, and for the good ones the expected (height, width, bit depth) after x2."""
    rng = np.random.default_rng(0)
    rgb = lambda h, w: rng.integers(0, 255, (h, w, 3), dtype=np.uint8)  # noqa: E731
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    good = {
        "photos/small.png": (_save(rgb(10, 12), "PNG"), (20, 24, 8)),
        "photos/large.png": (_save(rgb(36, 40), "PNG"), (72, 80, 8)),
        "photos/icc.jpg": (_save(rgb(16, 16), "JPEG", icc_profile=icc), (32, 32, 8)),
        "grey.png": (_save(rng.integers(0, 255, (9, 11), dtype=np.uint8), "PNG"), (18, 22, 8)),
        "rgba.png": (_save(rng.integers(0, 255, (8, 10, 4), dtype=np.uint8), "PNG"), (16, 20, 8)),
        "grey16.png": (_save(rng.integers(0, 65535, (7, 9), dtype=np.uint16), "PNG"), (14, 18, 16)),
        "colour16.tif": (_tiff16(8, 6), (16, 12, 16)),
        "rotated.jpg": (_save(rgb(16, 24), "JPEG", exif=_exif(6)), (48, 32, 8)),  # stored 16x24, upright 24x16
        "palette.png": (_save(rgb(12, 12), "PNG", mode="P"), (24, 24, 8)),
    }
    bad = {
        "corrupt.png": _save(rgb(10, 12), "PNG")[:50],
        "zero.png": b"",
        "fake.jpg": b"this is not a JPEG",
        "huge.png": _save(np.zeros((800, 800, 3), np.uint8), "PNG"),  # x2 -> 2.56 MP > the 1 MP limit
        "notes.txt": b"sidecar, not an input",
    }
    objects = {k: v[0] for k, v in good.items()} | bad
    return objects, {k: v[1] for k, v in good.items()}


FAILED = {"corrupt.png", "zero.png", "fake.jpg", "huge.png", "a/../b.png"}


def _upload(client, bucket: str, objects: dict[str, bytes]) -> None:
    for key, data in objects.items():
        client.put_object(Bucket=bucket, Key=f"in/{key}", Body=data)
    client.put_object(Bucket=bucket, Key="in/a/../b.png", Body=b"unsafe")  # legal in S3, never read


def _outputs(client, bucket: str) -> dict[str, str]:
    """Output images (not the job's state) -> ETag."""
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="out/"):
        for obj in page.get("Contents", ()):
            key = obj["Key"][len("out/"):]
            if key.split("/", 1)[0] not in ("_manifests", "_index", "_runs", "_lock", "_owner.json"):
                found[key] = obj["ETag"]
    return found


def _manifest(bucket: str, run_id: str) -> list[dict]:
    run_uri = f"{bucket}/out/_manifests/run={run_id}"
    rows = []
    for part in manifest.iter_parts(run_uri):
        table = manifest.read_part(part)
        assert table.schema.equals(manifest.arrow_schema(), check_metadata=True)
        rows += table.to_pylist()
    return rows


def _enhance(capsys, *argv) -> tuple[int, str, str]:
    code = main(["enhance", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _run_id(summary: str) -> str:
    return summary.split("run ", 1)[1].split(" ", 1)[0]


@pytest.mark.slow
def test_enhance_an_s3_archive_then_rerun_incrementally(ray_local, s3_bucket, tiny, capsys, monkeypatch):
    boto3 = pytest.importorskip("boto3")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    client = boto3.client("s3")
    bucket = s3_bucket.removeprefix("s3://")
    objects, expected = _archive()
    _upload(client, bucket, objects)
    listed = set(objects) | {"a/../b.png"}
    args = ["--input", f"{s3_bucket}/in", "--output", f"{s3_bucket}/out/", "--model", tiny,
            "--max-output-pixels", "1e6"]

    # 1. first run: every listed key once, failures with reasons, outputs in kind
    code, out, err = _enhance(capsys, *args)
    summary = out.strip().splitlines()[-1]
    assert code == 2, summary  # 5 of 14 attempted failed: above the default 1%
    assert "15 listed, 9 ok, 5 failed, 1 skipped" in summary and "(exit 2)" in summary
    assert re.search(r"clipsr enhance: (\d+)/\1 images \(100%\), ok 9, failed 4", err), err  # its progress line
    run1 = _run_id(summary)
    rows = _manifest(s3_bucket, run1)
    assert sorted(r["input_key"] for r in rows) == sorted(listed)
    by_key = {r["input_key"]: r for r in rows}
    for row in rows:
        validate(manifest.json_row(row), "manifest")
        assert row["run_id"] == run1 and row["input_uri"] == f"{s3_bucket}/in/{row['input_key']}"
    assert {k for k, r in by_key.items() if r["status"] == "failed"} == FAILED
    assert by_key["a/../b.png"]["error"].startswith("unsafe key, not read")
    assert by_key["a/../b.png"]["input_sha256"] is None  # never read
    assert by_key["zero.png"]["error"] == "empty file (0 bytes)"
    assert by_key["huge.png"]["error"].startswith("output too large: x2 would exceed --max-output-pixels=1,000,000")
    assert by_key["notes.txt"]["status"] == "skipped"
    outputs = _outputs(client, bucket)
    assert set(outputs) == set(expected)
    for key, (h, w, depth) in expected.items():
        row = by_key[key]
        assert row["status"] == "ok" and row["output_uri"] == f"{s3_bucket}/out/{key}"
        assert (row["output_height"], row["output_width"], row["output_bit_depth"]) == (h, w, depth)
        assert row["model_id"].startswith("cdasr-tiny-x2-") and row["domain"] == "default" and row["scale"] == 2
        assert row["input_etag"] and row["input_sha256"].startswith("sha256:") and row["infer_s"] > 0
        decoded = imaging.decode(storage.read_bytes(row["output_uri"]))
        assert (decoded.height, decoded.width, decoded.bit_depth) == (h, w, depth)
        assert decoded.format == imaging.format_for_path(key)
    assert imaging.decode(storage.read_bytes(f"{s3_bucket}/out/grey.png")).pixels.shape[2] == 1
    assert imaging.decode(storage.read_bytes(f"{s3_bucket}/out/rgba.png")).alpha is not None
    assert imaging.decode(storage.read_bytes(f"{s3_bucket}/out/photos/icc.jpg")).icc_profile
    rotated = imaging.decode(storage.read_bytes(f"{s3_bucket}/out/rotated.jpg"))
    exif = Image.Exif()
    exif.load(rotated.exif)
    assert rotated.orientation == 1 and ORIENTATION not in exif and exif[0x010F] == "clipsr-test-camera"
    # Secrets stay out of what the job prints and writes.
    state = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="out/_")["Contents"]]
    assert not any(SECRET.encode() in client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in state)
    assert SECRET not in out + err
    session_logs = Path(ray_local._private.worker._global_node.get_session_dir_path()) / "logs"
    assert not [p for p in session_logs.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert json.loads(storage.read_bytes(f"{s3_bucket}/out/_index/index.json"))["rows"] == 9 + len(FAILED)
    assert not storage.exists(f"{s3_bucket}/out/_lock")

    # 2. rerun: nothing new is processed or written; the failures, all permanent, are carried
    # forward unread and not counted again; each key once
    code, out, _ = _enhance(capsys, *args)
    summary = out.strip().splitlines()[-1]
    assert "15 listed, 0 ok, 5 failed (5 carried forward), 10 skipped" in summary and code == 0
    rows2 = _manifest(s3_bucket, _run_id(summary))
    assert sorted(r["input_key"] for r in rows2) == sorted(listed)
    assert all(r["previous_run_id"] == run1 for r in rows2 if r["input_key"] in set(expected) | FAILED)
    assert {r["input_key"] for r in rows2 if r["carried_forward"]} == FAILED
    assert _outputs(client, bucket) == outputs

    # 3. outputs deleted: exactly those are redone; the others stay as they were
    for key in ("photos/large.png", "grey16.png"):
        client.delete_object(Bucket=bucket, Key=f"out/{key}")
    code, out, _ = _enhance(capsys, *args, "--max-failed-fraction", "1")
    summary = out.strip().splitlines()[-1]
    assert code == 0 and "15 listed, 2 ok, 5 failed (5 carried forward), 8 skipped" in summary
    rows3 = {r["input_key"]: r for r in _manifest(s3_bucket, _run_id(summary))}
    assert {k for k, r in rows3.items() if r["status"] == "ok"} == {"photos/large.png", "grey16.png"}
    after = _outputs(client, bucket)
    assert set(after) == set(outputs)
    assert {k for k in outputs if after[k] != outputs[k]} <= {"photos/large.png", "grey16.png"}

    # The manifests of all runs read as one partitioned dataset, one row per key per run.
    fs, path = storage.pyarrow_filesystem(f"{s3_bucket}/out/_manifests")
    table = pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive").to_table()
    assert table.num_rows == 3 * len(listed) and len(set(table.column("run").to_pylist())) == 3


def test_an_unreachable_input_prefix_is_exit_1(s3_bucket, tiny, capsys):
    code, out, _ = _enhance(capsys, "--input", "s3://no-such-bucket-clipsr/in", "--output", f"{s3_bucket}/out",
                            "--model", tiny)
    assert code == 1 and "could not complete" in out and "(exit 1)" in out


@pytest.mark.slow
def test_a_run_killed_before_its_index_update_is_finished_by_the_rerun(ray_local, tmp_path, tiny, capsys, monkeypatch):
    src = tmp_path / "in"
    (src / "nested").mkdir(parents=True)
    rng = np.random.default_rng(5)
    for name in ("x.png", "y.jpg", "nested/z.jpeg"):
        Image.fromarray(rng.integers(0, 255, (8, 10, 3), dtype=np.uint8)).save(src / name)
    out_dir = tmp_path / "out"
    args = ["--input", str(src), "--output", str(out_dir), "--model", tiny, "--format", "webp"]

    code, out, _ = _enhance(capsys, *args, "--dry-run")
    assert code == 0 and "3 listed: would process 3" in out and not out_dir.exists()

    def killed(self, *a, **k):
        raise RuntimeError("simulated kill before the index update")

    monkeypatch.setattr(idx.IndexStore, "commit", killed)
    code, out, _ = _enhance(capsys, *args)
    assert code == 1 and "simulated kill" in out and "partial manifest" in out
    assert sorted(p.name for p in out_dir.rglob("*.webp")) == ["x.webp", "y.webp", "z.webp"]
    monkeypatch.undo()

    # the rerun folds the unfinished run's ok rows into the index and redoes nothing
    code, out, _ = _enhance(capsys, *args)
    assert code == 0 and "3 listed, 0 ok, 0 failed, 3 skipped" in out
    meta = json.loads((out_dir / "_index" / "index.json").read_text())
    assert meta["rows"] == 3 and meta["in_progress"] == []
    assert not (out_dir / "_runs").exists()  # plans removed, and their empty folders
    decoded = imaging.decode((out_dir / "nested" / "z.webp").read_bytes())
    assert (decoded.format, decoded.height, decoded.width) == ("WEBP", 16, 20)


def test_a_held_lock_is_exit_1_and_names_the_holder(tmp_path, tiny, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    from clipsr.enhance.lock import RunLock

    with RunLock(str(tmp_path / "out" / "_lock"), "20261126T000000Z-nightly"):
        code, out, _ = _enhance(capsys, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                                "--model", tiny)
    assert code == 1 and "locked by run 20261126T000000Z-nightly" in out


def test_an_output_store_that_ignores_conditional_writes_is_refused_unless_allowed(s3_bucket, s3_proxy, tmp_path,
                                                                                    capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    s3_proxy.ignore_conditions = True
    args = ["--input", str(tmp_path / "in"), "--output", f"{s3_bucket}/out", "--model", "bicubic", "--scale", "2"]
    code, out, _ = _enhance(capsys, *args)
    assert code == 1 and "does not honour conditional writes" in out and "--allow-unconditional-writes" in out
    assert list(storage.iter_objects(s3_bucket)) == []  # refused before the lock: nothing written
    code, out, _ = _enhance(capsys, *args, "--allow-unconditional-writes")
    assert code == 0 and "1 listed, 0 ok, 0 failed, 1 skipped" in out
    assert storage.exists(f"{s3_bucket}/out/_index/index.json") and not storage.exists(f"{s3_bucket}/out/_lock")


def test_job_entrypoint_takes_the_same_arguments(tmp_path, tiny):
    (tmp_path / "in").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "in" / "a.png")
    run = [sys.executable, str(ROOT / "jobs" / "enhance.py")]
    done = subprocess.run(run + ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                                 "--model", tiny, "--dry-run"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "1 listed: would process 1" in done.stdout.strip().splitlines()[-1]
    usage = subprocess.run(run + ["--output", "x"], capture_output=True, text=True, timeout=120)
    assert usage.returncode == 1 and "--input" in usage.stderr  # not 2: that means "too many failed"
