"""Checkpoints: safe to load, self-describing, and refused when they do not fit."""
import json
import shutil

import numpy as np
import pytest
import torch

from clipsr.factory import create_model, load_checkpoint, load_upscaler, save_checkpoint
from clipsr.models.checkpoint import CheckpointError, read_metadata


@pytest.fixture
def tiny_ckpt(tmp_path):
    torch.manual_seed(0)
    model = create_model("cdasr-tiny", 2)
    uri = str(tmp_path / "tiny.safetensors")
    meta = save_checkpoint(uri, model, "cdasr-tiny", training_data={"note": "test"}, metrics={"psnr_y": 1.0})
    return uri, model, meta


def test_round_trip_keeps_weights_and_metadata(tiny_ckpt):
    uri, model, meta = tiny_ckpt
    loaded, meta2 = load_checkpoint(uri)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
    assert meta2["id"] == meta["id"] and meta["id"].startswith("cdasr-tiny-x2-")
    assert meta2["weights_sha256"][:12] in meta2["id"]
    for field in ("arch", "scale", "clip_encoder", "training_data", "parent", "code_revision", "metrics", "created"):
        assert field in meta2
    assert meta2["clip_encoder"] is None and meta2["scale"] == 2


def test_metadata_is_readable_without_loading_weights(tiny_ckpt):
    uri, _, meta = tiny_ckpt
    with open(uri, "rb") as f:
        assert read_metadata(f.read())["weights_sha256"] == meta["weights_sha256"]


def test_same_weights_same_id_different_weights_different_id(tmp_path, tiny_ckpt):
    _, model, meta = tiny_ckpt
    assert save_checkpoint(str(tmp_path / "again.safetensors"), model, "cdasr-tiny")["id"] == meta["id"]
    with torch.no_grad():
        model.head.bias.add_(1.0)
    assert save_checkpoint(str(tmp_path / "other.safetensors"), model, "cdasr-tiny")["id"] != meta["id"]


def test_not_a_checkpoint_and_corrupt_files_are_refused(tmp_path, tiny_ckpt):
    uri, _, _ = tiny_ckpt
    png = tmp_path / "x.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(CheckpointError, match="not a clipsr checkpoint"):
        load_checkpoint(str(png))
    data = bytearray(open(uri, "rb").read())
    data[-5] ^= 0xFF  # flip bits in the last tensor
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(str(bad))
    with pytest.raises(FileNotFoundError, match="not found"):
        load_checkpoint(str(tmp_path / "missing.safetensors"))


def test_scale_mismatch_is_refused(tiny_ckpt):
    uri, _, _ = tiny_ckpt
    with pytest.raises(CheckpointError, match="x2 model, but x4"):
        load_upscaler(uri, scale=4)


def test_checkpoint_metadata_is_validated_against_the_schema(tmp_path):
    model = create_model("cdasr-tiny", 2)
    with pytest.raises(ValueError, match="parent"):
        save_checkpoint(str(tmp_path / "p.safetensors"), model, "cdasr-tiny", parent={"id": "x"})


def test_upscaler_from_checkpoint_runs_rgb_and_grey(tiny_ckpt):
    uri, _, meta = tiny_ckpt
    up = load_upscaler(uri)
    rgb = up.upscale(np.random.rand(10, 12, 3).astype(np.float32))
    grey = up.upscale(np.random.rand(10, 12, 1).astype(np.float32))
    assert rgb.shape == (20, 24, 3) and grey.shape == (20, 24, 1)
    assert rgb.min() >= 0 and rgb.max() <= 1
    desc = up.describe()
    assert desc["id"] == meta["id"] and desc["scale"] == 2 and 0 < desc["params"]
    json.dumps(desc)


def test_bundled_models_are_known_by_id_under_the_name_that_pins_them(tmp_path, monkeypatch):
    """A replaced default keeps its versioned name; a bundled file that cannot be read is left out
    of the lookup, to fail only where it is loaded."""
    from clipsr import factory

    ids = factory.bundled_ids()
    assert ids[factory.read_model_metadata("default")["id"]] == "default-x4-v2"
    assert ids[factory.read_model_metadata("default-x4-v1")["id"]] == "default-x4-v1"
    assert ids[factory.read_model_metadata("default-x4-jpeg")["id"]] == "default-x4-jpeg"
    assert len(ids) == len(set(factory.BUNDLED.values()))

    for file in ("default-x4", "default-x4-v1"):
        shutil.copy(factory.WEIGHTS_DIR / f"{file}.safetensors", tmp_path)
    (tmp_path / "default-x2.safetensors").write_bytes(b"version https://git-lfs.github.com/spec/v1\n")
    monkeypatch.setattr(factory, "WEIGHTS_DIR", tmp_path)
    factory._bundled_file_ids.cache_clear()
    try:
        assert set(factory.bundled_file_ids()) == {"default-x4", "default-x4-v1"}
    finally:
        factory._bundled_file_ids.cache_clear()
