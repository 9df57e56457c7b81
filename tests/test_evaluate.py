"""clipsr.evaluate: folder selection, per-image rows, failures and image modes under the protocol."""
import io

import numpy as np
import pytest
from PIL import Image

from clipsr.evaluate import evaluate, format_table, select_images
from clipsr.factory import load_upscaler
from clipsr.inference import BicubicUpscaler


def _rgb(seed: int, h: int = 32, w: int = 28) -> np.ndarray:
    """A smooth colour image with some texture, so bicubic scores are finite and image-dependent."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx / w, yy / h, (xx + yy) / (h + w)], axis=2) * 200 + 20
    return np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _names(rows):
    return [r["uri"].rsplit("/", 1)[-1] for r in rows]


def test_sorted_order_is_byte_order_of_image_files_only(tmp_path):
    for i, name in enumerate(["img_2.png", "a.png", ".hidden.png", "B.png", "img_10.png"]):
        (tmp_path / name).write_bytes(_png(Image.fromarray(_rgb(i))))
    (tmp_path / "notes.txt").write_text("not an image")
    assert _names([{"uri": u} for u in select_images(str(tmp_path), 0)]) == [
        "B.png", "a.png", "img_10.png", "img_2.png"]
    assert _names([{"uri": u} for u in select_images(str(tmp_path), 3)]) == ["img_2.png"]
    with pytest.raises(ValueError, match="leaves none"):
        select_images(str(tmp_path), 4)
    with pytest.raises(ValueError, match=">= 0"):
        select_images(str(tmp_path), -1)


def test_rows_keep_their_folder_index_after_skipping(tmp_path):
    for name in ["c.png", "a.png", "b.png"]:
        (tmp_path / name).write_bytes(_png(Image.fromarray(_rgb(len(name)))))
    report = evaluate(BicubicUpscaler(2), {"d": str(tmp_path)}, skip_first=1)
    assert [(n, r["index"]) for n, r in zip(_names(report["images"]), report["images"])] == [
        ("b.png", 1), ("c.png", 2)]
    assert report["skip_first"] == 1 and report["datasets"]["d"]["images"] == 2


def test_unreadable_images_become_error_rows_and_means_cover_the_good_ones(tmp_path):
    good = [_png(Image.fromarray(_rgb(i))) for i in range(3)]
    for i, data in enumerate(good):
        (tmp_path / f"good{i}.png").write_bytes(data)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "garbage.jpg").write_bytes(b"this is not a jpeg at all" * 10)
    (tmp_path / "truncated.png").write_bytes(good[0][: len(good[0]) // 2])
    seen = []
    report = evaluate(BicubicUpscaler(2), {"mixed": str(tmp_path)}, on_image=seen.append)

    rows = {name: row for name, row in zip(_names(report["images"]), report["images"])}
    assert len(seen) == len(rows) == 6
    for bad in ("empty.png", "garbage.jpg", "truncated.png"):
        assert rows[bad]["error"] and "psnr_y" not in rows[bad]
    assert "empty" in rows["empty.png"]["error"]
    ok = [rows[f"good{i}.png"] for i in range(3)]
    assert all("error" not in r for r in ok)
    summary = report["datasets"]["mixed"]
    assert (summary["images"], summary["failed"]) == (3, 3)
    for metric in ("psnr_y", "ssim_y", "psnr_rgb"):
        assert summary[metric] == pytest.approx(np.mean([r[metric] for r in ok]))
    assert "mixed" in format_table(report)


def _mode_images(rgb: np.ndarray) -> dict[str, Image.Image]:
    grey = rgb[..., 1]
    return {
        "rgb.png": Image.fromarray(rgb),
        "l.png": Image.fromarray(grey),
        "la.png": Image.fromarray(np.dstack([grey, np.full_like(grey, 128)]), "LA"),
        "rgba.png": Image.fromarray(np.dstack([rgb, np.full_like(grey, 77)])),
        "p.png": Image.fromarray(rgb).quantize(32),
        "i16.png": Image.fromarray(grey.astype(np.uint16) * 257),  # 16-bit grey, same content as l.png
    }


@pytest.mark.parametrize("model", ["bicubic", "network"])
def test_every_image_mode_is_evaluated_grey_on_its_one_channel(tmp_path, tiny_checkpoint, model):
    rgb = _rgb(7, 36, 30)
    images = _mode_images(rgb)
    assert images["i16.png"].mode == "I;16" and images["p.png"].mode == "P"
    folder = tmp_path / "modes"
    folder.mkdir()
    for name, im in images.items():
        (folder / name).write_bytes(_png(im))
    upscaler = BicubicUpscaler(2) if model == "bicubic" else load_upscaler(tiny_checkpoint, 2)
    report = evaluate(upscaler, {"modes": str(folder)})

    rows = dict(zip(_names(report["images"]), report["images"]))
    assert report["datasets"]["modes"]["failed"] == 0, [r.get("error") for r in rows.values()]
    assert {n: r["channels"] for n, r in rows.items()} == {
        "rgb.png": 3, "l.png": 1, "la.png": 1, "rgba.png": 3, "p.png": 3, "i16.png": 1}
    for name, row in rows.items():
        assert (row["height"], row["width"]) == (36, 30) and np.isfinite(row["psnr_y"]), name
    # grey is scored on its channel (no YCbCr): Y-PSNR and RGB-PSNR are the same number
    assert rows["l.png"]["psnr_y"] == rows["l.png"]["psnr_rgb"]
    assert rows["rgb.png"]["psnr_y"] != rows["rgb.png"]["psnr_rgb"]
    # alpha is dropped, and 16-bit grey scores like its 8-bit version
    for a, b in (("la.png", "l.png"), ("i16.png", "l.png"), ("rgba.png", "rgb.png")):
        assert rows[a]["psnr_y"] == pytest.approx(rows[b]["psnr_y"], abs=1e-9), (a, b)
        assert rows[a]["ssim_y"] == pytest.approx(rows[b]["ssim_y"], abs=1e-9), (a, b)


def test_image_too_small_for_the_scale_is_a_row_error_not_a_crash(tmp_path):
    (tmp_path / "tiny.png").write_bytes(_png(Image.fromarray(_rgb(0, 8, 8))))
    (tmp_path / "ok.png").write_bytes(_png(Image.fromarray(_rgb(1))))
    report = evaluate(BicubicUpscaler(4), {"d": str(tmp_path)})
    rows = dict(zip(_names(report["images"]), report["images"]))
    assert "too small" in rows["tiny.png"]["error"] and "error" not in rows["ok.png"]
    assert report["datasets"]["d"]["failed"] == 1


def test_an_exact_reconstruction_is_reported_without_breaking_json(tmp_path):
    """A flat image survives bicubic unchanged: its PSNR is infinite, which JSON cannot hold."""
    import json as _json

    from PIL import Image as _Image

    from clipsr.cli import main as _main

    folder = tmp_path / "flat"
    folder.mkdir()
    _Image.new("RGB", (64, 64), (120, 80, 40)).save(folder / "flat.png")
    rng = __import__("numpy").random.default_rng(0)
    _Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype="uint8")).save(folder / "noise.png")
    report = tmp_path / "r.json"
    assert _main(["evaluate", "--model", "bicubic", "--scale", "2", "--data", f"d={folder}",
                  "--report", str(report)]) == 0
    doc = _json.loads(report.read_text(), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    flat = next(r for r in doc["images"] if r["uri"].endswith("flat.png"))
    noise = next(r for r in doc["images"] if r["uri"].endswith("noise.png"))
    assert flat["exact"] is True and flat["psnr_y"] is None and flat["ssim_y"] == 1.0
    assert doc["datasets"]["d"]["exact"] == 1 and doc["datasets"]["d"]["images"] == 2
    assert doc["datasets"]["d"]["psnr_y"] == noise["psnr_y"]
