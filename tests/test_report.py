"""`clipsr report`: the report dict from a manifest, its HTML page, and a real run on S3 (moto)."""
from __future__ import annotations

import base64
import io
import json
import re
from html import escape
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from clipsr import storage
from clipsr.cli import main
from clipsr.degrade import imresize, upscale_bicubic
from clipsr.enhance import manifest
from clipsr.report import bicubic_crop, build_report, busiest_window, resolve_run, write_report
from clipsr.report_html import render, ticks

RUN = "20261127T014840Z-187e74"
BAD_KEY = 'scans/bad <&> "1".png'


class _Page(HTMLParser):
    """Image sources and visible text of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_data(self, data):
        self.text.append(data)


def _parse(page: str) -> _Page:
    parsed = _Page()
    parsed.feed(page)
    return parsed


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _local_run(tmp_path, rng) -> str:
    """A run folder with ok rows in two domains (real input and output files), failed and skipped rows."""
    rows = []
    for i, domain in enumerate(["photos", "maps", "photos", "maps", "photos"]):
        lr = rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8)
        key = f"{domain}/img{i}.png"
        data = _png(lr)
        (tmp_path / "in" / domain).mkdir(parents=True, exist_ok=True)
        (tmp_path / "out" / domain).mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / key).write_bytes(data)
        (tmp_path / "out" / key).write_bytes(_png(upscale_bicubic(lr, 2)))
        rows.append({"input_key": key, "input_uri": str(tmp_path / "in" / key), "status": "ok",
                     "output_uri": str(tmp_path / "out" / key), "input_sha256": storage.content_hash(data),
                     "domain": domain, "model_id": "cdasr-tiny-x2-0123456789ab", "model_version": "v2",
                     "sharpness_gain": 1.0 + i / 10, "clipping_ratio": i / 100, "infer_s": 0.5})
    for key in (BAD_KEY, "scans/zz.png", "scans/aa.png"):
        rows.append({"input_key": key, "input_uri": f"{tmp_path}/in/{key}", "status": "failed",
                     "error": "unreadable image header: cannot identify image file", "domain": "photos"})
    rows.append({"input_key": "scans/empty.png", "input_uri": f"{tmp_path}/in/scans/empty.png",
                 "status": "failed", "error": "empty file (0 bytes)", "domain": "photos"})
    rows.append({"input_key": "notes.txt", "input_uri": f"{tmp_path}/in/notes.txt", "status": "skipped",
                 "error": "not an image file name"})
    for row in rows:
        row |= {"run_id": RUN, "input_size": 1, "scale": 2}
    run_uri = str(tmp_path / "_manifests" / f"run={RUN}")
    manifest.write_part(rows[:6], run_uri)
    manifest.write_part(rows[6:], run_uri)
    return run_uri


def test_a_report_counts_groups_plots_and_crops_a_run(tmp_path):
    run_uri = _local_run(tmp_path, np.random.default_rng(0))
    report = build_report(str(tmp_path / "_manifests"), samples=2, crop=16)

    assert report["run_id"] == RUN and report["manifest"] == run_uri
    assert report["rows"] == 10 and report["statuses"] == {"ok": 5, "failed": 4, "skipped": 1, "unsupported": 0}
    groups = {(g["domain"], g["model_version"]): (g["ok"], g["failed"], g["skipped"]) for g in report["groups"]}
    assert groups == {(None, None): (0, 0, 1), ("maps", "v2"): (2, 0, 0), ("photos", "v2"): (3, 0, 0),
                      ("photos", None): (0, 4, 0)}
    assert report["failures"] == [
        {"reason": "unreadable image header", "count": 3, "examples": ["scans/aa.png", BAD_KEY, "scans/zz.png"]},
        {"reason": "empty file (0 bytes)", "count": 1, "examples": ["scans/empty.png"]},
    ]
    figures = {f["column"]: f for f in report["figures"]}
    assert set(figures) == {"sharpness_gain", "clipping_ratio", "infer_s"}  # no CLIP, no routing: no plot
    photos = figures["sharpness_gain"]["domains"][1]
    assert photos["domain"] == "photos" and photos["n"] == 3
    assert (photos["min"], photos["median"], photos["max"]) == pytest.approx((1.0, 1.2, 1.4))

    samples = report["samples"]
    assert [s["domain"] for s in samples] == ["maps", "maps", "photos", "photos"]
    assert samples == build_report(run_uri, samples=2, crop=16)["samples"]  # the same sample every time
    for s in samples:
        x, y, w, h = s["box"]
        assert (w, h) == (8, 8)
        bicubic, enhanced = (np.asarray(Image.open(io.BytesIO(base64.b64decode(s[name])))).astype(int)
                             for name in ("bicubic_png", "enhanced_png"))
        # The output here is the bicubic upscale itself: both crops show the same pixels, up to rounding.
        assert bicubic.shape == enhanced.shape == (16, 16, 3) and np.abs(bicubic - enhanced).max() <= 1

    page = render(report)
    parsed = _parse(page)
    assert len(parsed.images) == len(report["figures"]) + 2 * len(samples)
    assert all(src.startswith("data:image/png;base64,") for src in parsed.images)
    assert escape(BAD_KEY) in page and BAD_KEY not in page
    assert re.search(r'id="status-failed"><b>4</b>', page)
    assert "http://" not in page and "https://" not in page


def test_a_sample_whose_input_changed_or_output_is_gone_says_so(tmp_path):
    _local_run(tmp_path, np.random.default_rng(1))
    (tmp_path / "in" / "maps" / "img1.png").write_bytes(_png(np.zeros((4, 4, 3), np.uint8)))
    (tmp_path / "out" / "maps" / "img3.png").unlink()
    report = build_report(str(tmp_path / "_manifests"), samples=2, crop=16)
    errors = {s["input_key"]: s.get("error") for s in report["samples"] if s["domain"] == "maps"}
    assert errors["maps/img1.png"] == "the input changed since the run"
    assert "img3.png" in errors["maps/img3.png"]  # FileNotFoundError names the file
    page = render(report)
    assert len(_parse(page).images) == len(report["figures"]) + 4  # photos' two pairs only
    assert "the input changed since the run" in page


def test_write_report_puts_the_json_record_beside_the_page(tmp_path):
    _local_run(tmp_path, np.random.default_rng(2))
    report = build_report(str(tmp_path / "_manifests"), samples=0)
    html_uri, json_uri = write_report(report, str(tmp_path / "r" / "night.html"))
    assert json_uri == str(tmp_path / "r" / "night.json")
    assert json.loads(storage.read_bytes(json_uri)) == report
    assert storage.read_bytes(html_uri).decode() == render(report)


def test_resolve_run_takes_a_run_folder_or_the_latest_run_under_a_root(tmp_path):
    root = tmp_path / "m"
    for run in ("20261126T020000Z-aaaaaa", "20261127T020000Z-bbbbbb"):
        (root / f"run={run}").mkdir(parents=True)
        (root / f"run={run}" / "part-0.parquet").write_bytes(b"")
    (root / "run=20991231T000000Z-cccccc").mkdir()  # no parts: not a run
    (root / "run=latest").mkdir()
    (root / "run=latest" / "part-0.parquet").write_bytes(b"")  # not a run id
    latest = f"{root}/run=20261127T020000Z-bbbbbb"
    assert resolve_run(str(root)) == (latest, "20261127T020000Z-bbbbbb")
    assert resolve_run(f"{latest}/") == (latest, "20261127T020000Z-bbbbbb")
    assert resolve_run(str(root), "20261126T020000Z-aaaaaa")[1] == "20261126T020000Z-aaaaaa"
    with pytest.raises(ValueError, match="contradicts"):
        resolve_run(latest, "20261126T020000Z-aaaaaa")
    with pytest.raises(ValueError, match="not a run id"):
        resolve_run(str(root), "../x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no manifest runs"):
        resolve_run(str(tmp_path / "empty"))


def test_the_command_exits_1_when_there_is_no_run(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    assert main(["report", "--manifest", str(tmp_path / "m"), "--out", str(tmp_path / "r.html")]) == 1
    assert "clipsr report: error: no manifest runs" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


def test_the_bicubic_crop_is_the_crop_of_the_whole_upscale():
    lr = np.random.default_rng(3).random((30, 37, 3))
    whole = imresize(lr, output_shape=(90, 111))
    for y, x, h, w in [(0, 0, 10, 10), (11, 13, 9, 12), (20, 25, 10, 12), (0, 0, 30, 37)]:
        crop = bicubic_crop(lr, y, x, h, w, 3)
        np.testing.assert_allclose(crop, whole[3 * y:3 * (y + h), 3 * x:3 * (x + w)], atol=1e-12)


def test_the_crop_window_is_the_most_detailed_and_fits_small_images():
    image = np.zeros((60, 60, 1))
    image[45:, 45:] = np.random.default_rng(4).random((15, 15, 1))
    assert busiest_window(image, 15) == (45, 45, 15, 15)
    assert busiest_window(np.zeros((5, 7, 3)), 15) == (0, 0, 5, 7)


def test_ticks_are_round_and_cover_the_range():
    assert ticks(0.013, 0.91) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert ticks(1.0, 1.4) == [1.0, 1.1, 1.2, 1.3, 1.4]
    assert ticks(-3, 250) == [-100, 0, 100, 200, 300]


@pytest.mark.slow
def test_a_report_of_a_real_run_on_s3_embeds_everything_it_shows(ray_local, s3_bucket, tiny_checkpoint, capsys):
    rng = np.random.default_rng(5)
    for i in range(3):
        storage.write_bytes_atomic(f"{s3_bucket}/in/photos/p{i}.png",
                                   _png(rng.integers(0, 255, (12 + 2 * i, 14, 3), dtype=np.uint8)))
    storage.write_bytes_atomic(f"{s3_bucket}/in/{BAD_KEY}", _png(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))[:50])
    code = main(["enhance", "--input", f"{s3_bucket}/in", "--output", f"{s3_bucket}/out", "--model", tiny_checkpoint,
                 "--max-failed-fraction", "1"])
    assert code == 0, capsys.readouterr()
    capsys.readouterr()

    code = main(["report", "--manifest", f"{s3_bucket}/out/_manifests", "--out", f"{s3_bucket}/reports/night.html",
                 "--samples", "2"])
    out = capsys.readouterr().out
    assert code == 0 and "4 rows, 3 ok, 1 failed, 0 skipped" in out
    report = json.loads(storage.read_bytes(f"{s3_bucket}/reports/night.json"))
    page = storage.read_bytes(f"{s3_bucket}/reports/night.html").decode()

    assert report["statuses"] == {"ok": 3, "failed": 1, "skipped": 0, "unsupported": 0}
    assert [(g["domain"], g["ok"], g["failed"]) for g in report["groups"]] == [("default", 3, 1)]
    [failure] = report["failures"]
    assert failure["count"] == 1 and failure["examples"] == [BAD_KEY]
    for name, n in (("rows", 4), ("ok", 3), ("failed", 1), ("skipped", 0)):
        assert f'id="status-{name}"><b>{n}</b>' in page
    assert f"<td>{escape(failure['reason'])}</td><td class=\"n\">1</td>" in page
    assert escape(BAD_KEY) in page and BAD_KEY not in page

    shown = [s for s in report["samples"] if "error" not in s]
    assert len(shown) == 2 and {f["column"] for f in report["figures"]} >= {"sharpness_gain", "infer_s"}
    parsed = _parse(page)
    assert len(parsed.images) == len(report["figures"]) + 2 * len(shown)
    assert f"{len(report['figures'])} plots and {2 * len(shown)} crops embedded" in page
    for src in parsed.images:
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        with Image.open(io.BytesIO(base64.b64decode(src[len(prefix):], validate=True))) as im:
            im.load()
            assert im.format == "PNG" and im.width > 0
    for s in shown:
        x, y, w, h = s["box"]
        crop = Image.open(io.BytesIO(base64.b64decode(s["enhanced_png"])))
        assert crop.size == (2 * w, 2 * h)
    for external in ("http://", "https://", 'src="/', "<link", "<script", "url("):
        assert external not in page
