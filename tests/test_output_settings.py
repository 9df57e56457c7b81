"""Output size (--outscale, --max-long-edge), encoder settings (--quality, lossless WebP) and the
strength of adapted models, without Ray: the functions the stages call, on real images."""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipsr import imaging
from clipsr.enhance.encoder import encoder_settings, lossless_input
from clipsr.enhance.output import OutputSettings
from clipsr.enhance.resize import limit_factor, output_size, resize
from clipsr.enhance.routing import ModelRef, at_strength, resolve_model
from clipsr.factory import create_model, encode_checkpoint, load_checkpoint, load_upscaler, save_checkpoint
from clipsr.models.checkpoint import CheckpointError

SAMPLES = Path(__file__).resolve().parents[1] / "clipsr" / "samples"


def _photo(name: str = "astronaut.png", box: tuple[int, int, int, int] = (60, 40, 97, 69)) -> np.ndarray:
    """A crop of a sample photo as uint8 HxWx3 (odd sides by default: 37 x 29)."""
    return np.asarray(Image.open(SAMPLES / name).convert("RGB").crop(box))


def _save(values: np.ndarray, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, format=fmt, **options)
    return buf.getvalue()


def test_outscale_truncates_as_real_esrgan_and_the_long_edge_is_capped():
    # RealESRGANer.enhance: cv2.resize(output, (int(w_input * outscale), int(h_input * outscale)))
    assert output_size(29, 37, 4, 3.5) == (int(29 * 3.5), int(37 * 3.5)) == (101, 129)
    assert output_size(29, 37, 4, 2.0) == (58, 74)
    assert output_size(29, 37, 2, 4.0) == (116, 148)
    assert output_size(29, 37, 4) == (116, 148)  # no option: the model's own size, as before
    assert output_size(3, 5, 4, 0.1) == (1, 1)  # never an empty image
    # the longer side capped, the other in proportion; a side already within the cap is left alone
    assert output_size(29, 37, 4, None, 100) == (round(116 * 100 / 148), 100) == (78, 100)
    assert output_size(37, 29, 4, 3.5, 100) == (100, round(101 * 100 / 129))
    assert output_size(29, 37, 4, 2.0, 500) == (58, 74)
    # the pixel limit holds the model's own output when that is the larger
    assert limit_factor(4, 2.0) == 4.0 and limit_factor(2, 4.0) == 4.0 and limit_factor(4, None) == 4.0


def test_shrinking_averages_areas_and_enlarging_keeps_sixteen_bits():
    photo = _photo()[:28, :36]
    half = resize(photo, (14, 18))
    blocks = photo.astype(np.float64).reshape(14, 2, 18, 2, 3).mean(axis=(1, 3))
    # each 2x2 block's mean, within Pillow's rounding after each direction
    assert half.dtype == np.uint8 and np.abs(half.astype(np.float64) - blocks).max() <= 1.0
    assert np.abs(half.astype(np.float64) - blocks).mean() < 0.5

    grey = photo[..., :1]
    assert resize(grey, (56, 72)).shape == (56, 72, 1)
    deep = photo.astype(np.uint16) * 257 + 100  # values an 8-bit path could not hold
    big = resize(deep, (101, 129))
    assert big.dtype == np.uint16 and big.shape == (101, 129, 3)
    assert np.count_nonzero(big % 257) > big.size // 2
    assert resize(photo, photo.shape[:2]) is photo


@pytest.mark.parametrize("fmt, options, lossless", [
    ("PNG", {}, True), ("BMP", {}, True), ("GIF", {}, True), ("JPEG", {"quality": 90}, False),
    ("WEBP", {"quality": 80}, False), ("WEBP", {"lossless": True}, True),
    ("TIFF", {"compression": "tiff_adobe_deflate"}, True), ("TIFF", {"compression": "jpeg"}, False),
])
def test_lossless_inputs_are_told_from_their_bytes(fmt, options, lossless):
    data = _save(_photo(), fmt, **options)
    decoded = imaging.decode(data)
    assert lossless_input(data, decoded.format) is lossless


def test_an_extended_webp_is_walked_to_its_image_chunk():
    rgba = np.dstack([_photo(), np.full(_photo().shape[:2], 200, np.uint8)])
    exif = Image.Exif()
    exif[0x010F] = "clipsr-test-camera"  # metadata: an extended (VP8X) file
    for options, lossless in (({"lossless": True}, True), ({"quality": 70}, False)):
        data = _save(rgba, "WEBP", exif=exif.tobytes(), **options)
        assert data[12:16] == b"VP8X" and lossless_input(data, "WEBP") is lossless


def test_quality_applies_to_lossy_outputs_and_lossless_webp_round_trips_exactly():
    assert encoder_settings("JPEG", 80, True) == (80, False)
    assert encoder_settings("WEBP", 80, False) == (80, False)
    assert encoder_settings("WEBP", 80, True) == (None, True)
    assert encoder_settings("PNG", 80, False) == (None, False)
    pixels = _photo().astype(np.float32) / 255
    high, low = (imaging.encode(pixels, None, "JPEG", quality=q) for q in (95, 60))
    assert high != low and len(low) < len(high)
    webp = imaging.encode(pixels, None, "WEBP", lossless=True)
    assert webp[12:16] == b"VP8L"
    np.testing.assert_array_equal(imaging.decode(webp).pixels, imaging.decode(_save(_photo(), "PNG")).pixels)


def test_the_planner_compares_output_settings_as_recorded():
    default = OutputSettings()
    assert default.unchanged(None, None, None, "JPEG")  # rows written before quality was recorded: 95
    assert default.unchanged(None, None, 95, "JPEG") and not default.unchanged(None, None, 60, "JPEG")
    assert default.unchanged(None, None, None, "WEBP")  # lossless
    assert OutputSettings(quality=60).unchanged(None, None, None, "PNG")
    assert not OutputSettings(quality=60).unchanged(None, None, None, "JPEG")
    assert not OutputSettings(outscale=2.0).unchanged(None, None, None, "PNG")
    assert OutputSettings(outscale=2.0, max_long_edge=64).unchanged(2.0, 64, None, "PNG")
    for bad in ({"outscale": 0.0}, {"max_long_edge": 0}, {"quality": 101}):
        with pytest.raises(ValueError, match="--"):
            OutputSettings(**bad)


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    """A cdasr-tiny x4 source and a delta adapted from it (its adaptive module nudged), as files."""
    root = tmp_path_factory.mktemp("strength")
    torch.manual_seed(0)
    source = str(root / "source.safetensors")
    save_checkpoint(source, create_model("cdasr-tiny", 4), "cdasr-tiny")
    model, meta = load_checkpoint(source)
    with torch.no_grad():
        for p in model.adaptation_parameters("adaptive"):
            p.add_(torch.randn_like(p) * 0.05)
    parent = {"id": meta["id"], "weights_sha256": meta["weights_sha256"],
              "file_sha256": hashlib.sha256(Path(source).read_bytes()).hexdigest()}
    data, dmeta = encode_checkpoint(model, "cdasr-tiny", parent=parent, parent_spec=source,
                                    delta_keys=model.adaptation_names("adaptive"))
    delta = root / "delta.safetensors"
    delta.write_bytes(data)
    return source, str(delta), dmeta


def test_strength_moves_the_weights_from_the_source_to_the_adapted_ones(adapted):
    source, delta, dmeta = adapted
    src, _ = load_checkpoint(source)
    full, _ = load_checkpoint(delta)
    half, meta = load_checkpoint(delta, strength=0.5)
    assert meta["id"] == f"{dmeta['id']}@s0.5" and meta["strength"] == 0.5
    for name, tensor in half.state_dict().items():
        torch.testing.assert_close(tensor, (src.state_dict()[name] + full.state_dict()[name]) / 2)
    assert load_checkpoint(delta, strength=1.0)[1]["id"] == dmeta["id"]

    lr = imaging.decode(_save(_photo(), "PNG")).pixels
    outs = {s: load_upscaler(delta, strength=s).upscale(lr) for s in (0.0, 0.5, 1.0)}
    np.testing.assert_array_equal(outs[0.0], load_upscaler(source).upscale(lr))
    span = np.abs(outs[1.0] - outs[0.0]).mean()
    assert span > 1e-4
    # halfway in weights, about halfway in output: nearer to each end than the ends are to each other
    assert np.abs(outs[0.5] - outs[0.0]).mean() < 0.75 * span and np.abs(outs[0.5] - outs[1.0]).mean() < 0.75 * span


def test_a_model_without_a_source_refuses_a_strength_below_one(adapted):
    source, delta, dmeta = adapted
    with pytest.raises(CheckpointError, match="no source model to interpolate from"):
        load_checkpoint(source, strength=0.5)
    # the bundled default was trained from another model (its parent), not adapted from one
    with pytest.raises(CheckpointError, match="no source model to interpolate from"):
        load_checkpoint("default", strength=0.5)
    with pytest.raises(ValueError, match="no source model to interpolate from"):
        at_strength(resolve_model("default", None), 0.5)
    assert load_checkpoint(source, strength=1.0)[1]["id"] == resolve_model(source, None).id
    with pytest.raises(ValueError, match="no source model"):
        load_upscaler("bicubic", 2, strength=0.5)
    with pytest.raises(ValueError, match="no source model to interpolate from"):
        at_strength(resolve_model(source, None), 0.3)
    ref = at_strength(resolve_model(delta, 4), 0.25)
    assert ref.adapted and ref.strength == 0.25 and ref.id == f"{dmeta['id']}@s0.25"
    assert at_strength(ModelRef("x", "x-id", 4), 1.0).strength is None  # a plain model at 1: as it is
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        load_checkpoint(delta, strength=1.5)


def test_a_spandrel_model_adapted_whole_is_toned_down_towards_its_source(tmp_path):
    pytest.importorskip("spandrel")
    from safetensors.torch import save as st_save
    from spandrel.architectures.SPAN import SPAN

    torch.manual_seed(0)
    path = tmp_path / "span-x2.safetensors"
    path.write_bytes(st_save({k: v.contiguous() for k, v in SPAN(num_in_ch=3, num_out_ch=3, feature_channels=8,
                                                                  upscale=2).state_dict().items()}))
    source, smeta = load_checkpoint(str(path))
    adapted, _ = load_checkpoint(str(path))
    with torch.no_grad():
        for p in adapted.adaptation_parameters("all"):
            p.add_(torch.randn_like(p) * 0.05)
    parent = {"id": smeta["id"], "weights_sha256": smeta["weights_sha256"],
              "file_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    data, meta = encode_checkpoint(adapted, smeta["arch"]["name"], parent=parent, parent_spec=str(path))
    stored = tmp_path / "adapted.safetensors"
    stored.write_bytes(data)
    assert meta["kind"] == "full"  # as clipsr adapt stores a spandrel model: whole, with its lineage
    zero, zmeta = load_checkpoint(str(stored), strength=0.0)
    assert zmeta["id"] == f"{meta['id']}@s0.0" and zmeta["weights_sha256"] == smeta["weights_sha256"]
    half, _ = load_checkpoint(str(stored), strength=0.5)
    for name, tensor in half.weights().items():
        torch.testing.assert_close(tensor, (source.weights()[name] + adapted.weights()[name]) / 2)


def test_evaluate_scores_an_adapted_model_at_a_strength(adapted, tmp_path, capsys):
    import json

    from clipsr.cli import main

    source, delta, dmeta = adapted
    folder = tmp_path / "hr"
    folder.mkdir()
    for i, box in enumerate(((0, 0, 48, 48), (100, 60, 148, 108))):
        (folder / f"{i}.png").write_bytes(_save(_photo(box=box), "PNG"))
    psnr = {}
    for strength in ("0", "1"):
        report = tmp_path / f"s{strength}.json"
        assert main(["evaluate", "--model", delta, "--scale", "4", "--strength", strength, "--data", f"hr={folder}",
                     "--report", str(report)]) == 0
        doc = json.loads(report.read_text())
        psnr[strength] = doc["datasets"]["hr"]["psnr_y"]
        assert doc["model"]["id"] == (f"{dmeta['id']}@s0.0" if strength == "0" else dmeta["id"])
    report = tmp_path / "source.json"
    assert main(["evaluate", "--model", source, "--scale", "4", "--data", f"hr={folder}", "--report", str(report)]) == 0
    assert json.loads(report.read_text())["datasets"]["hr"]["psnr_y"] == psnr["0"] != psnr["1"]
    capsys.readouterr()


class _Sink:
    def __init__(self) -> None:
        self.processed: list[dict] = []
        self.recorded: list[dict] = []

    def process(self, row: dict) -> None:
        self.processed.append(row)

    def record(self, row: dict) -> None:
        self.recorded.append(row)


def test_the_planner_redoes_the_outputs_whose_settings_or_strength_changed():
    import sqlite3

    from clipsr import storage
    from clipsr.enhance import index as idx
    from clipsr.enhance import plan
    from clipsr.enhance.layout import RunLayout
    from clipsr.enhance.routing import SingleModelRouter

    adapted = ModelRef(spec="/models/delta.safetensors", id="cdasr-tiny-x4-aaaaaaaaaaaa", scale=4, adapted=True)
    before = "20261101T000000Z-000000"
    # (key, recorded outscale, max long edge, quality): what an earlier run wrote at the defaults and 2x
    recorded = [("a.png", 2.0, None, None), ("b.jpg", 2.0, None, 95), ("c.webp", 2.0, None, None),
                ("d.jpg", 2.0, None, 95)]

    def decide(settings: OutputSettings, model: ModelRef) -> dict[str, str]:
        db = sqlite3.connect(":memory:")
        plan.create_tables(db)
        idx.create_table(db)
        idx.upsert(db, [(key, 10, "e1", 0, adapted.id, None, "default", 4, f"s3://out/{key}", 99, before, None,
                         outscale, edge, quality, "ok", None, None) for key, outscale, edge, quality in recorded])
        keys = [key for key, *_ in recorded]
        plan.load_outputs(db, [storage.ObjectInfo(f"s3://out/{k}", k, 99, "o", None) for k in keys])
        plan.load_listing(db, [storage.ObjectInfo(f"s3://in/{k}", k, 10, "e1", None) for k in keys], None)
        sink = _Sink()
        plan.decide(db, RunLayout.create("s3://in", "s3://out", None, "20261126T221500Z-abc123"),
                    SingleModelRouter(model), 4, None, sink, settings=settings)
        assert all(row["outscale"] == settings.outscale for row in sink.processed + sink.recorded)
        return {**{r["input_key"]: "skipped" for r in sink.recorded}, **{r["input_key"]: "planned" for r in sink.processed}}

    assert set(decide(OutputSettings(outscale=2.0), adapted).values()) == {"skipped"}
    assert set(decide(OutputSettings(outscale=3.0), adapted).values()) == {"planned"}
    assert set(decide(OutputSettings(outscale=2.0, max_long_edge=64), adapted).values()) == {"planned"}
    # a new quality redoes the lossy outputs only; a lossless WebP (null quality) stays
    assert decide(OutputSettings(outscale=2.0, quality=80), adapted) == {
        "a.png": "skipped", "b.jpg": "planned", "c.webp": "skipped", "d.jpg": "planned"}
    # a strength below 1 is another model
    assert set(decide(OutputSettings(outscale=2.0), at_strength(adapted, 0.5)).values()) == {"planned"}
    assert set(decide(OutputSettings(outscale=2.0), at_strength(adapted, 1.0)).values()) == {"skipped"}
