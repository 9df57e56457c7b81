"""JPEG quality from quantisation tables, the blind grid estimate, archive degradations for training
and evaluation, and `clipsr evaluate --jpeg`."""
import io
import json

import numpy as np
import pytest
from PIL import Image

from clipsr.cli import main
from clipsr.degradations import Degradation, jpeg_roundtrip
from clipsr.jpeg import blind_quality, read_quality
from clipsr.train.data import PatchSampler, TrainImage


def _texture(seed: int, size: int = 192) -> np.ndarray:
    """Natural-looking detail: smooth colour fields plus fine noise, upscaled (not a flat image)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size // 8, size // 8, 3)).astype(np.uint8)
    base = np.asarray(Image.fromarray(small).resize((size, size), Image.BICUBIC), dtype=np.float64)
    return np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)


def _jpeg(image: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", **kw)
    return buf.getvalue()


@pytest.mark.parametrize("quality", [10, 35, 50, 75, 90, 95, 100])
@pytest.mark.parametrize("kind", ["rgb", "grey", "progressive", "444"])
def test_quality_is_read_exactly_from_the_tables(quality, kind):
    img = _texture(quality)
    if kind == "grey":
        data = _jpeg(img[..., 0], quality=quality)
    elif kind == "progressive":
        data = _jpeg(img, quality=quality, progressive=True)
    elif kind == "444":
        data = _jpeg(img, quality=quality, subsampling=0)
    else:
        data = _jpeg(img, quality=quality)
    assert read_quality(data) == quality


def test_the_header_alone_is_enough_and_non_jpeg_inputs_have_no_quality():
    data = _jpeg(_texture(1, 512), quality=62)
    assert read_quality(data[:4096]) == 62  # the tables sit in the first few hundred bytes
    png = io.BytesIO()
    Image.fromarray(_texture(1)).save(png, "PNG")
    assert read_quality(png.getvalue()) is None
    assert read_quality(b"") is None
    assert read_quality(b"\xff\xd8 not really a jpeg") is None


def test_blind_estimate_sees_a_strong_grid_and_not_a_clean_image():
    img = _texture(3, 256)
    assert blind_quality(img) is None
    decoded = np.asarray(Image.open(io.BytesIO(_jpeg(img, quality=15))).convert("RGB"))
    assert blind_quality(decoded) in (50, 75)


def test_degradation_specs_parse_label_and_refuse_nonsense():
    assert Degradation.parse("jpeg:75") == Degradation(jpeg=(75, 75))
    assert Degradation.parse("JPEG:40-95").label == "jpeg:40-95"
    assert Degradation.parse("clean").is_clean and Degradation.parse("clean").label == "clean"
    d = Degradation.from_dict({"jpeg": [30, 95], "jpeg_prob": 0.9, "noise": [0, 3], "noise_prob": 0.5})
    assert Degradation.from_dict(d.to_dict()) == d and d.label == "jpeg:30-95 p0.9+noise:0-3 p0.5"
    for bad in ("jpeg", "jpeg:0", "jpeg:95-40", "jpeg:101", "blur:2"):
        with pytest.raises(ValueError):
            Degradation.parse(bad)


def test_a_jpeg_degradation_is_the_same_as_saving_the_lr_at_that_quality():
    lr = _texture(4, 64)
    out = Degradation(jpeg=(60, 60)).apply(lr, np.random.default_rng(0))
    assert np.array_equal(out, jpeg_roundtrip(lr, 60)) and not np.array_equal(out, lr)
    assert np.array_equal(Degradation().apply(lr, np.random.default_rng(0)), lr)


def test_training_patches_carry_the_configured_degradation_reproducibly():
    images = [TrainImage("mem://a", 0, _texture(5, 192))]
    clean = PatchSampler(images, 4, 32, seed=7).sample(4)[0]
    deg = Degradation(jpeg=(20, 20))
    a = PatchSampler(images, 4, 32, seed=7, degradation=deg).sample(4)
    b = PatchSampler(images, 4, 32, seed=7, degradation=deg).sample(4)
    assert torch_equal(a[0], b[0]) and torch_equal(a[1], b[1])
    assert not torch_equal(a[0], clean)
    # each LR patch is exactly its clean patch saved at q=20 (same positions: the sampler's draws
    # for the JPEG step come after the patch position and flips)
    first = (clean[0].numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8)
    assert np.array_equal((a[0][0].numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8),
                          jpeg_roundtrip(first, 20))


def torch_equal(x, y) -> bool:
    return bool((x == y).all())


def test_evaluate_jpeg_scores_the_degraded_input_and_leaves_the_protocol_alone(tmp_path, capsys):
    data = tmp_path / "hr"
    data.mkdir()
    for i in range(2):
        Image.fromarray(_texture(10 + i, 96)).save(data / f"{i}.png")
    clean_json, jpeg_json = tmp_path / "clean.json", tmp_path / "q30.json"
    assert main(["evaluate", "--model", "bicubic", "--scale", "2", "--data", f"d={data}",
                 "--report", str(clean_json)]) == 0
    assert main(["evaluate", "--model", "bicubic", "--scale", "2", "--data", f"d={data}",
                 "--report", str(jpeg_json), "--jpeg", "30"]) == 0
    clean, q30 = json.loads(clean_json.read_text()), json.loads(jpeg_json.read_text())
    assert "jpeg" not in clean and "JPEG" not in clean["protocol"]["lr"]
    assert q30["jpeg"] == 30 and "JPEG at quality 30" in q30["protocol"]["lr"]
    assert q30["datasets"]["d"]["psnr_y"] < clean["datasets"]["d"]["psnr_y"] - 0.2
    assert "LR as JPEG q=30" in capsys.readouterr().out
    assert main(["evaluate", "--model", "bicubic", "--scale", "2", "--data", f"d={data}",
                 "--report", str(tmp_path / "x.json"), "--jpeg", "0"]) == 1
