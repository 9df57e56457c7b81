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


@pytest.mark.slow
def test_adaptation_and_routing_at_x16(ray_local, tmp_path, x16):
    """Shots, held-out scoring, the registry and --route auto work unchanged at x16: exemplars of a
    few hundred pixels hold the x16 training patches, and each input goes to its own domain's x16 model."""
    import pyarrow.parquet as pq

    from clipsr.adapt.run import adapt_one
    from clipsr.adapt.settings import AdaptSettings
    from clipsr.adapt.spec import DomainSpec
    from clipsr.enhance.options import EnhanceOptions
    from clipsr.enhance.run import run_enhance
    from clipsr.registry import Registry

    settings = AdaptSettings(candidates=(("all", 1e-3),), steps=4, batch=2, holdout=1)
    assert settings.patch_side(16) == 16  # 256 px of HR: exemplars need not be 768 px (48 px of LR)
    registry = str(tmp_path / "registry")
    for name, grey in (("photos", False), ("pages", True)):
        folder = tmp_path / name
        folder.mkdir()
        for i in range(3):
            img = _image(10 * grey + i, 288, 272)
            Image.fromarray(np.repeat(img.mean(2, keepdims=True).astype(np.uint8), 3, 2) if grey else img).save(
                folder / f"{i}.png")
        row = adapt_one(DomainSpec.shorthand(f"{name}={folder}", 3, 16), x16, settings, registry,
                        {"arch": "color-stats"}, threads=1)
        assert row["status"] == "ok", row
        assert row["steps"] == 4 and row["stop_reason"] == "steps"
        Registry(registry).set_current(name, row["version"])
        entry = Registry(registry).get(name, row["version"])
        assert entry.doc["settings"]["selection"]["lr_patch"] == 16
        assert [e["role"] for e in entry.doc["exemplars"]] == ["train", "train", "heldout"]

    report = tmp_path / "r.json"
    hr = tmp_path / "hr"
    hr.mkdir()
    Image.fromarray(_image(7, 160, 128)).save(hr / "0.png")
    assert main(["evaluate", "--model", f"{registry}/pages", "--scale", "16", "--data", f"d={hr}",
                 "--report", str(report)]) == 0
    assert json.loads(report.read_text())["datasets"]["d"]["images"] == 1

    inputs, out = tmp_path / "in", str(tmp_path / "out")
    inputs.mkdir()
    Image.fromarray(np.full((12, 10, 3), 128, np.uint8)).save(inputs / "grey.png")
    Image.fromarray(_image(21, 12, 10)).save(inputs / "colour.png")
    result = run_enhance(EnhanceOptions(input=str(inputs), output=out, model=x16, models=registry,
                                        route="auto", route_threshold=0.0, threads=1, device="cpu"))
    assert result.exit_code == 0, result.summary
    rows = {r["input_key"]: r for r in pq.read_table(result.manifest_uri).to_pylist()}
    assert rows["grey.png"]["domain"] == "pages" and rows["colour.png"]["domain"] == "photos"
    for key, r in rows.items():
        assert r["status"] == "ok" and r["scale"] == 16 and r["model_version"] == "v1"
        with Image.open(f"{out}/{key}") as im:
            assert im.size == (160, 192)


@pytest.mark.parametrize("name,scale", [("default-x8", 8), ("default-x16", 16)])
def test_the_bundled_large_scale_models_are_small_and_named_by_the_scale_message(name, scale, capsys):
    from clipsr.factory import load_checkpoint, scale_mismatch
    from clipsr.models.cdasr import count_parameters

    model, meta = load_checkpoint(name)
    assert (meta["scale"], model.scale) == (scale, scale)
    assert count_parameters(model.folded()) < 500_000  # every bundled model under 0.5M at inference
    assert f"for x{scale} use --model {name} (bundled)" in scale_mismatch(load_checkpoint("default")[1], scale)
