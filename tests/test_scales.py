"""x16 end to end on small images: evaluate, enhance (with its output-size limit), adapt."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch
from PIL import Image

from clipsr.cli import main
from clipsr.factory import create_model, save_checkpoint


@pytest.fixture(scope="module")
def x16(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "lite-x16.safetensors"
    save_checkpoint(str(path), create_model("cdasr-lite", 16), "cdasr-lite")
    return str(path)


def _image(seed: int, h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(h // 16, 2), max(w // 16, 2), 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC))


def test_evaluate_at_x16_scores_the_model_and_bicubic(tmp_path, x16):
    data = tmp_path / "hr"
    data.mkdir()
    for i in range(2):
        Image.fromarray(_image(i, 160, 128)).save(data / f"{i}.png")
    for model in ("bicubic", x16):
        report = tmp_path / "r.json"
        assert main(["evaluate", "--model", model, "--scale", "16", "--data", f"d={data}",
                     "--report", str(report)]) == 0
        result = json.loads(report.read_text())
        assert result["scale"] == 16 and result["datasets"]["d"]["images"] == 2
        assert result["images"][0]["psnr_y"] > 10


@pytest.mark.slow
def test_enhance_at_x16_writes_16x_outputs_and_refuses_oversized_ones(ray_local, tmp_path, x16, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    Image.fromarray(_image(1, 12, 10)).save(src / "small.png")
    Image.fromarray(_image(2, 40, 30)).save(src / "large.png")
    # 40x30 at x16 is 307,200 output pixels: over a limit of 200,000, refused from its header
    code = main(["enhance", "--input", str(src), "--output", str(out), "--model", x16,
                 "--max-output-pixels", "200000", "--max-failed-fraction", "1"])
    assert code == 0, capsys.readouterr()
    with Image.open(out / "small.png") as im:
        assert im.size == (160, 192)
    assert not (out / "large.png").exists()
    rows = {r["input_key"]: r for r in pads.dataset(str(out / "_manifests"), format="parquet").to_table().to_pylist()}
    assert rows["small.png"]["status"] == "ok" and rows["small.png"]["scale"] == 16
    assert rows["large.png"]["status"] == "failed" and "max-output-pixels" in rows["large.png"]["error"]
