"""`clipsr enhance` across runs on a real S3 API (moto) and a local Ray: prefixes that must not
overlap or be shared, outputs that belong to one input, and failed inputs remembered."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from clipsr import storage
from clipsr.cli import main
from clipsr.config import validate
from clipsr.enhance import manifest

BICUBIC = ["--model", "bicubic", "--scale", "2"]


def _png(seed: int, h: int = 8, w: int = 10) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _put(bucket: str, key: str, data: bytes) -> None:
    storage.write_bytes_atomic(f"{bucket}/{key}", data)


def _objects(bucket: str) -> dict[str, bytes]:
    """Every object in the bucket, with its bytes."""
    return {info.key: storage.read_bytes(info.uri) for info in storage.iter_objects(bucket)}


def _enhance(capsys, *argv) -> tuple[int, str]:
    code = main(["enhance", *argv])
    out = capsys.readouterr().out.strip().splitlines()
    return code, out[-1] if out else ""


def _rows(summary: str, manifest_prefix: str) -> dict[str, dict]:
    """The manifest rows of the run a summary line names, by input key (each checked against the schema)."""
    run_id = summary.split("run ", 1)[1].split(" ", 1)[0]
    rows = {}
    for part in manifest.iter_parts(f"{manifest_prefix}/run={run_id}"):
        for row in manifest.read_part(part).to_pylist():
            validate(manifest.json_row(row), "manifest")
            rows[row["input_key"]] = row
    return rows


@pytest.mark.parametrize("output, extra", [
    ("{b}", []),  # the case: archive/archive/x.png would be written over archive/x.png
    ("{b}/archive/enhanced", []),
    ("{b}/out", ["--manifest", "{b}/archive/manifests"]),
    ("{b}/out", ["--dry-run", "--manifest", "{b}"]),
])
def test_overlapping_input_and_output_or_manifest_prefixes_are_refused_before_anything_is_written(
        s3_bucket, capsys, output, extra):
    _put(s3_bucket, "archive/x.png", _png(0))
    _put(s3_bucket, "archive/archive/x.png", _png(1))
    before = _objects(s3_bucket)
    args = ["--input", f"{s3_bucket}/archive", "--output", output.format(b=s3_bucket), *BICUBIC,
            *[a.format(b=s3_bucket) for a in extra]]
    code, summary = _enhance(capsys, *args)
    assert code == 1 and "overlap" in summary and "choose prefixes that do not contain each other" in summary
    assert _objects(s3_bucket) == before


@pytest.mark.slow
def test_an_output_prefix_belongs_to_the_input_that_first_wrote_to_it(ray_local, s3_bucket, capsys):
    _put(s3_bucket, "scans/x.png", _png(0))
    _put(s3_bucket, "photos/x.png", _png(1))
    code, summary = _enhance(capsys, "--input", f"{s3_bucket}/scans", "--output", f"{s3_bucket}/out", *BICUBIC)
    assert code == 0 and "1 ok" in summary
    before = _objects(s3_bucket)
    assert "out/_owner.json" in before
    for dry in ([], ["--dry-run"]):
        code, summary = _enhance(capsys, "--input", f"{s3_bucket}/photos", "--output", f"{s3_bucket}/out/",
                                 *BICUBIC, *dry)
        assert code == 1 and summary.endswith("(exit 1)")
        assert f"--output {s3_bucket}/out belongs to --input {s3_bucket}/scans" in summary
        assert f"not to --input {s3_bucket}/photos" in summary and "use another --output" in summary
        assert _objects(s3_bucket) == before  # out/x.png is still the one made from scans/x.png
    # the owning input runs on as before
    code, summary = _enhance(capsys, "--input", f"{s3_bucket}/scans/", "--output", f"{s3_bucket}/out", *BICUBIC)
    assert code == 0 and "1 listed, 0 ok, 0 failed, 1 skipped" in summary


@pytest.mark.slow
def test_an_output_made_from_another_input_in_an_earlier_run_is_a_failed_row_never_an_overwrite(
        ray_local, s3_bucket, capsys):
    args = ["--input", f"{s3_bucket}/in", "--output", f"{s3_bucket}/out", "--format", "webp", *BICUBIC]
    _put(s3_bucket, "in/a.png", _png(0))
    code, summary = _enhance(capsys, *args)
    assert code == 0 and "1 ok" in summary
    made = storage.read_bytes(f"{s3_bucket}/out/a.webp")

    _put(s3_bucket, "in/a.jpg", _png(1))  # sorts before a.png, and maps to a.webp too
    code, summary = _enhance(capsys, *args, "--dry-run")
    assert code == 0 and "would process 0" in summary and "skip 1, fail 1" in summary
    code, summary = _enhance(capsys, *args)
    assert code == 2 and "2 listed, 0 ok, 1 failed, 1 skipped" in summary
    rows = _rows(summary, f"{s3_bucket}/out/_manifests")
    assert rows["a.png"]["status"] == "skipped"
    assert rows["a.jpg"]["status"] == "failed" and rows["a.jpg"]["error"].startswith(
        "output key collision: 'a.webp' is already the output of 'a.png', from an earlier run")
    assert rows["a.jpg"]["input_sha256"] is None and not rows["a.jpg"]["carried_forward"]
    assert storage.read_bytes(f"{s3_bucket}/out/a.webp") == made


@pytest.mark.slow
def test_permanent_failures_are_carried_forward_unread_and_transient_ones_retried(ray_local, s3_bucket, capsys):
    manifests = f"{s3_bucket}/out/_manifests"
    args = ["--input", f"{s3_bucket}/in", "--output", f"{s3_bucket}/out", *BICUBIC]
    _put(s3_bucket, "in/good.png", _png(0))
    _put(s3_bucket, "in/corrupt.png", _png(1)[:60])

    # 1. the good image times out (transient), the corrupt one fails for good
    code, summary = _enhance(capsys, *args, "--image-timeout", "1e-9")
    assert code == 2 and "2 listed, 0 ok, 2 failed, 0 skipped" in summary
    first = _rows(summary, manifests)
    run1 = first["corrupt.png"]["run_id"]
    assert first["good.png"]["error"].startswith("inference stopped")
    assert first["corrupt.png"]["input_sha256"] is not None  # read
    reason = first["corrupt.png"]["error"]

    # 2. the timed-out image is retried; the corrupt one is carried forward, unread and not counted
    code, dry = _enhance(capsys, *args, "--dry-run")
    assert "would process 1" in dry and "fail 1 (1 carried forward)" in dry
    code, summary = _enhance(capsys, *args)
    assert code == 0, summary  # 1 failed of 2 would be above the default 1%: exit 2
    assert "2 listed, 1 ok, 1 failed (1 carried forward), 0 skipped, 0 unsupported; failed or unsupported 0 of 1 attempted (0.0%)" in summary
    second = _rows(summary, manifests)
    assert second["good.png"]["status"] == "ok"
    carried = second["corrupt.png"]
    assert carried["status"] == "failed" and carried["carried_forward"] is True
    assert carried["previous_run_id"] == run1 and carried["error"] == f"carried forward from run {run1}: {reason}"
    assert carried["input_sha256"] is None and carried["read_s"] is None  # not read

    # 3. --retry-failed reads it again, and counts it
    code, summary = _enhance(capsys, *args, "--retry-failed")
    assert code == 2 and "2 listed, 0 ok, 1 failed, 1 skipped" in summary
    retried = _rows(summary, manifests)["corrupt.png"]
    assert retried["error"] == reason and retried["input_sha256"] is not None and not retried["carried_forward"]

    # 4. carried forward again from the retry; then re-uploaded whole, it is read without the flag
    code, summary = _enhance(capsys, *args)
    assert code == 0 and "1 failed (1 carried forward)" in summary
    _put(s3_bucket, "in/corrupt.png", _png(1))
    code, summary = _enhance(capsys, *args)
    assert code == 0 and "2 listed, 1 ok, 0 failed, 1 skipped" in summary
    assert _rows(summary, manifests)["corrupt.png"]["status"] == "ok"
