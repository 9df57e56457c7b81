"""Archive formats beyond PNG/JPEG, unsupported files, oversized objects and dying decoders: from
the listing's decision through the real stages, and a whole run on S3 (moto) with a local Ray."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from clipsr import imaging, storage
from clipsr.cli import main
from clipsr.config import validate
from clipsr.enhance import manifest
from clipsr.enhance import rows as R
from clipsr.enhance.decode import HEADER_BYTES, decode_batch, read_decode
from clipsr.enhance.infer import InferStage
from clipsr.enhance.isolate import Isolated
from clipsr.enhance.listing import classify_key, output_format
from clipsr.enhance.write import write_batch
from decoder_faults import DiesOn

HEIC = (Path(__file__).parent / "data" / "two-halves-24x16.heic").read_bytes()
RNG = np.random.default_rng(7)


def _save(array: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _frames(fmt: str, n: int, **kw) -> bytes:
    frames = [Image.fromarray(np.full((6, 8, 3), 40 * i, np.uint8)) for i in range(n)]
    buf = io.BytesIO()
    frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:], **kw)
    return buf.getvalue()


def _jxl(array: np.ndarray) -> bytes:
    return pytest.importorskip("imagecodecs").jpegxl_encode(array, lossless=True)


def _archive() -> dict[str, bytes]:
    """One input of every kind an archive holds, made here except the HEIC (see tests/data)."""
    return {
        "still.gif": _save(RNG.integers(0, 255, (6, 8, 3), dtype=np.uint8), "GIF"),
        "anim.gif": _frames("GIF", 3),
        "scans/grey16.jp2": _save(RNG.integers(0, 65535, (6, 8), dtype=np.uint16), "JPEG2000"),
        "phone/IMG_0001.HEIC": HEIC,
        "art.jxl": _jxl(RNG.integers(0, 65535, (6, 8, 3), dtype=np.uint16)),
        "pages.tif": _frames("TIFF", 2),
        "photo.avif": _save(RNG.integers(0, 255, (6, 8, 3), dtype=np.uint8), "AVIF"),
    }


def _plan_rows(tmp_path: Path, files: dict[str, bytes], model: tuple[str, str], listed_size: dict | None = None):
    rows = []
    for key, data in files.items():
        path = tmp_path / "in" / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        decision = classify_key(key)
        assert decision.kind == "candidate", decision
        rows.append({"input_key": key, "input_uri": str(path), "output_uri": str(tmp_path / "out" / decision.output_key),
                     "output_format": output_format(decision.output_key), "input_size": (listed_size or {}).get(key, len(data)),
                     "input_etag": None, "input_mtime_ms": 0, "scale": 2, "domain": "default", "model_spec": model[0],
                     "model_id": model[1], "model_version": None, "route_similarity": None, "clip_encoder": None})
    return pa.Table.from_pylist(rows, schema=R.PLAN)


def _by_key(table: pa.Table) -> dict[str, dict]:
    return {r["input_key"]: r for r in table.to_pylist()}


def test_the_listing_decides_format_output_and_size_before_anything_is_read():
    assert classify_key("scans/page.JP2").output_key == "scans/page.png"  # not written as JPEG 2000: PNG
    assert classify_key("scans/page.jp2", "webp").output_key == "scans/page.webp"
    assert (classify_key("a.gif").output_key, output_format("a.png")) == ("a.png", "PNG")
    assert classify_key("p/IMG.heic").output_key == "p/IMG.png" and classify_key("x.avif").output_key == "x.png"
    assert classify_key("keep.webp").output_key == "keep.webp"
    raw = classify_key("raw/IMG_0001.CR2")
    assert (raw.kind, raw.reason) == ("unsupported", "unsupported format: camera raw (.cr2) is not decoded")
    assert classify_key("notes.txt").kind == "ignored"
    big = classify_key("big.png", size=300_000_001, max_bytes=300_000_000)
    assert big.kind == "too_large"
    assert big.reason == "input too large: 300,000,001 bytes listed, more than --max-input-bytes=300,000,000; not read"
    assert classify_key("fits.png", size=300_000_000, max_bytes=300_000_000).kind == "candidate"


def test_archive_formats_run_through_the_stages_and_are_written_as_png(tmp_path, tiny):
    out = _by_key(write_batch(InferStage(threads=1)(decode_batch(_plan_rows(tmp_path, _archive(), tiny),
                                                                 max_output_pixels=10**8))))
    assert out["anim.gif"]["status"] == "failed"
    assert out["anim.gif"]["error"] == "animated GIF (3 frames): not enhanced (only still images are)"
    ok = {k: r for k, r in out.items() if k != "anim.gif"}
    assert {r["status"] for r in ok.values()} == {"ok"}, {k: r["error"] for k, r in ok.items()}
    formats = {k: r["input_format"] for k, r in ok.items()}
    assert formats == {"still.gif": "GIF", "scans/grey16.jp2": "JPEG2000", "phone/IMG_0001.HEIC": "HEIF",
                       "art.jxl": "JXL", "pages.tif": "TIFF", "photo.avif": "AVIF"}
    for key, row in ok.items():
        written = imaging.decode(storage.read_bytes(row["output_uri"]))
        expected_format = "TIFF" if key == "pages.tif" else "PNG"
        assert (written.format, row["output_format"]) == (expected_format, expected_format)
        assert row["output_uri"].endswith(".tif" if key == "pages.tif" else ".png")
        assert (written.height, written.width) == (2 * row["input_height"], 2 * row["input_width"])
    assert ok["scans/grey16.jp2"]["input_bit_depth"] == ok["scans/grey16.jp2"]["output_bit_depth"] == 16
    assert ok["art.jxl"]["output_bit_depth"] == 16
    assert ok["pages.tif"]["notes"] == "multi-page TIFF: page 1 of 2 enhanced, the other pages are not in the output"
    assert (ok["phone/IMG_0001.HEIC"]["input_width"], ok["phone/IMG_0001.HEIC"]["input_height"]) == (24, 16)


def _big_bomb_png(width: int, height: int, payload: int) -> bytes:
    """A PNG header announcing width x height, then ``payload`` bytes of pixel data: a reader must
    fetch more than the header to get it all."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", RNG.bytes(payload)) + chunk(b"IEND", b""))


def test_pixels_are_refused_from_a_header_read_and_bytes_from_a_bounded_read(tmp_path, tiny):
    bomb = _big_bomb_png(20_000, 20_000, 2 * HEADER_BYTES)
    grown = _save(RNG.integers(0, 255, (200, 200, 3), dtype=np.uint8), "PNG")
    table = _plan_rows(tmp_path, {"bomb.png": bomb, "grown.png": grown}, tiny, listed_size={"grown.png": 1000})
    rows = R.from_table(table)
    read_decode(rows[0], max_output_pixels=10**8)
    assert rows[0]["error"].startswith("output too large: x2 would exceed --max-output-pixels=100,000,000 "
                                       "(too many pixels: header says 20000x20000")
    assert rows[0]["error"].endswith("; PNG header read, the rest not fetched")
    assert rows[0]["input_sha256"] is None  # never read whole
    read_decode(rows[1], max_output_pixels=10**8, max_input_bytes=len(grown) - 1)
    assert rows[1]["error"] == (f"input too large: more than --max-input-bytes={len(grown) - 1:,} when read "
                                f"(1,000 listed); not read further")
    assert rows[1]["input_sha256"] is None and rows[1]["lr"] is None


def test_a_decoder_that_dies_is_a_failed_row_and_the_next_input_decodes(tmp_path, tiny):
    files = {f"{name}.png": _save(RNG.integers(0, 255, (6, 8, 3), dtype=np.uint8), "PNG") for name in "abc"}
    rows = R.from_table(_plan_rows(tmp_path, files, tiny))
    decoder = DiesOn(files["b.png"])
    try:
        for row in rows:
            read_decode(row, max_output_pixels=10**8, decoder=decoder)
    finally:
        decoder.close()
    a, b, c = rows
    assert b["status"] == "failed" and b["lr"] is None
    assert b["error"] == ("decoder crashed: the decoder process was killed by signal 9 (SIGKILL, as the kernel's "
                          f"out-of-memory killer sends) while decoding this input ({len(files['b.png'])} bytes)")
    assert b["input_sha256"].startswith("sha256:")  # it was read: the row says what killed the decoder
    for row in (a, c):  # before and after: a fresh decoder process took over
        assert row["status"] is None and R.unpack(row["lr"]).shape == (6, 8, 3)


def test_an_input_over_the_decoders_memory_cap_is_a_failed_row(tmp_path, tiny):
    files = {"wide.png": _save(np.zeros((4000, 4000, 3), np.uint8), "PNG"),
             "small.png": _save(np.zeros((6, 8, 3), np.uint8), "PNG")}
    rows = R.from_table(_plan_rows(tmp_path, files, tiny))
    decoder = Isolated(memory_bytes=700 << 20)  # room for the libraries, not for 16 megapixels
    try:
        for row in rows:
            read_decode(row, max_output_pixels=10**9, decoder=decoder)
    finally:
        decoder.close()
    assert rows[0]["error"] == ("decoder out of memory: needs more than its 734,003,200 bytes "
                                "(from --max-input-bytes and --max-output-pixels)")
    assert rows[1]["status"] is None and rows[1]["lr"] is not None


# --- end to end ------------------------------------------------------------------------------


def _enhance(capsys, *argv) -> tuple[int, str]:
    code = main(["enhance", *argv])
    out, _ = capsys.readouterr()
    return code, out.strip().splitlines()[-1]


def _manifest(bucket: str, summary: str) -> dict[str, dict]:
    run_id = summary.split("run ", 1)[1].split(" ", 1)[0]
    rows = []
    for part in manifest.iter_parts(f"{bucket}/out/_manifests/run={run_id}"):
        rows += manifest.read_part(part).to_pylist()
    return {r["input_key"]: r for r in rows}


@pytest.mark.slow
def test_an_archive_of_many_formats_on_s3(ray_local, s3_bucket, tiny, capsys):
    boto3 = pytest.importorskip("boto3")
    client = boto3.client("s3")
    objects = _archive() | {
        "raw/IMG_0002.CR2": b"II*\x00 not decoded here",
        "layers.psd": b"8BPS not decoded here",
        "huge.png": _save(RNG.integers(0, 255, (120, 120, 3), dtype=np.uint8), "PNG"),  # over the byte limit
        "notes.txt": b"a sidecar",
    }
    for key, data in objects.items():
        client.put_object(Bucket=s3_bucket.removeprefix("s3://"), Key=f"in/{key}", Body=data)
    args = ["--input", f"{s3_bucket}/in", "--output", f"{s3_bucket}/out", "--model", tiny[0],
            "--max-input-bytes", "20000"]

    code, summary = _enhance(capsys, *args, "--dry-run")
    assert code == 0 and "11 listed: would process 7" in summary
    assert "skip 1, fail 1, unsupported 2" in summary and "1 failed: input too large" in summary

    code, summary = _enhance(capsys, *args)
    assert code == 2, summary  # 4 of 10 images not done: above the default 1%
    assert ("11 listed, 6 ok, 2 failed, 1 skipped, 2 unsupported; failed or unsupported 4 of 10 attempted (40.0%) > 1.0%"
            in summary)
    rows = _manifest(s3_bucket, summary)
    assert set(rows) == set(objects)
    for row in rows.values():
        validate(manifest.json_row(row), "manifest")
    assert {k for k, r in rows.items() if r["status"] == "unsupported"} == {"raw/IMG_0002.CR2", "layers.psd"}
    assert rows["layers.psd"]["error"] == "unsupported format: Photoshop (.psd) is not decoded"
    assert rows["layers.psd"]["input_sha256"] is None and rows["layers.psd"]["output_uri"] is None
    assert rows["huge.png"]["status"] == "failed" and rows["huge.png"]["input_sha256"] is None  # never read
    assert rows["huge.png"]["error"].startswith("input too large: ") and "--max-input-bytes=20,000; not read" in \
        rows["huge.png"]["error"]
    assert rows["anim.gif"]["error"].startswith("animated GIF (3 frames)")
    outputs = {k: r["output_uri"] for k, r in rows.items() if r["status"] == "ok"}
    assert outputs == {"still.gif": f"{s3_bucket}/out/still.png", "scans/grey16.jp2": f"{s3_bucket}/out/scans/grey16.png",
                       "phone/IMG_0001.HEIC": f"{s3_bucket}/out/phone/IMG_0001.png", "art.jxl": f"{s3_bucket}/out/art.png",
                       "pages.tif": f"{s3_bucket}/out/pages.tif", "photo.avif": f"{s3_bucket}/out/photo.png"}
    assert imaging.decode(storage.read_bytes(outputs["phone/IMG_0001.HEIC"])).pixels.shape == (32, 48, 3)

    # The rerun skips what was done, and carries forward, unread and not counted again, what cannot be
    code, summary = _enhance(capsys, *args)
    assert code == 0 and "11 listed, 0 ok, 2 failed (4 carried forward), 7 skipped, 2 unsupported" in summary
