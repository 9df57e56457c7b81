"""Models of other architectures through spandrel: real spandrel networks with random weights,
saved as a user would save them, run by `clipsr evaluate`, `clipsr enhance` (S3 on moto, a local
Ray) and `clipsr adapt`."""
from __future__ import annotations

import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import save as st_save

from clipsr import imaging, storage
from clipsr.cli import main
from clipsr.digest import tensors_sha256
from clipsr.factory import load_checkpoint, load_upscaler, read_model_metadata
from clipsr.models.checkpoint import CheckpointError
from clipsr.models.external import SpandrelUpscaler, choose_precision

spandrel = pytest.importorskip("spandrel")
from spandrel.architectures.Compact import Compact  # noqa: E402
from spandrel.architectures.SAFMN import SAFMN  # noqa: E402
from spandrel.architectures.SPAN import SPAN  # noqa: E402


def _networks() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {"Compact": Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=2),
            "SPAN": SPAN(num_in_ch=3, num_out_ch=3, feature_channels=8, upscale=2)}


def _pth(state: dict[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _safetensors(state: dict[str, torch.Tensor]) -> bytes:
    return st_save({k: v.contiguous() for k, v in state.items()})


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Compact saved with torch.save (.pth), SPAN as safetensors: no clipsr metadata in either."""
    root = tmp_path_factory.mktemp("spandrel")
    nets = _networks()
    paths = {"Compact": root / "compact-x2.pth", "SPAN": root / "span-x2.safetensors"}
    paths["Compact"].write_bytes(_pth(nets["Compact"].state_dict()))
    paths["SPAN"].write_bytes(_safetensors(nets["SPAN"].state_dict()))
    return paths


def _reference(path: Path, lr: np.ndarray) -> np.ndarray:
    """What spandrel itself makes of an HxWx3 float image."""
    desc = spandrel.ModelLoader().load_from_file(str(path)).eval()
    x = torch.from_numpy(np.ascontiguousarray(lr.transpose(2, 0, 1)))[None]
    return desc(x)[0].permute(1, 2, 0).numpy()


def _png(seed: int, h: int = 24, w: int = 20, grey: bool = False) -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([np.sin((3 + c + seed % 3) * np.pi * (xx + c * yy)) for c in range(3)], -1) * 0.4 + 0.5
    arr = (np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if grey else arr).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("arch", ["Compact", "SPAN"])
def test_a_weights_file_is_a_model_spec_with_a_content_id(models, arch):
    path = models[arch]
    up = load_upscaler(str(path), 2)
    state = spandrel.ModelLoader().load_from_file(str(path)).model.state_dict()
    want = f"spandrel-{arch}-x2-{tensors_sha256(state)[:12]}"
    assert up.describe()["id"] == want and up.describe()["arch"] == f"spandrel-{arch}"
    assert read_model_metadata(str(path))["id"] == want  # what the enhance planner records
    assert load_upscaler(f"spandrel:{path}").describe()["id"] == want
    lr = np.random.default_rng(0).random((13, 17, 3), dtype=np.float32)
    np.testing.assert_allclose(up.upscale(lr), _reference(path, lr), atol=1e-5)
    grey = up.upscale(lr[..., :1])
    assert grey.shape == (26, 34, 1)
    with pytest.raises(CheckpointError, match="x2 model, but x4"):
        load_upscaler(str(path), 4)


def test_the_same_weights_have_one_id_in_either_format(models, tmp_path):
    state = _networks()["Compact"].state_dict()
    other = tmp_path / "compact.safetensors"
    other.write_bytes(_safetensors(state))
    assert load_upscaler(str(other)).describe()["id"] == load_upscaler(str(models["Compact"])).describe()["id"]
    wrapped = tmp_path / "wrapped.pth"  # as BasicSR trainers save: under params_ema, with module. prefixes
    wrapped.write_bytes(_pth({"params_ema": {f"module.{k}": v for k, v in state.items()}}))
    assert load_upscaler(str(wrapped)).describe()["id"] == load_upscaler(str(other)).describe()["id"]


def test_tiles_agree_with_the_whole_image_and_size_requirements_are_padded(models, tmp_path):
    lr = np.random.default_rng(1).random((70, 90, 3), dtype=np.float32)
    whole = load_upscaler(str(models["Compact"]), tile=512).upscale(lr)
    tiled = load_upscaler(str(models["Compact"]), tile=40)
    assert tiled.describe()["tiling"] == "supported: tiles of up to 40"
    np.testing.assert_allclose(tiled.upscale(lr), whole, atol=1e-5)

    torch.manual_seed(0)  # SAFMN takes sides that are multiples of 8: padded, and cropped back
    path = tmp_path / "safmn.safetensors"
    path.write_bytes(_safetensors(SAFMN(dim=8, n_blocks=1, ffn_scale=2.0, upscaling_factor=2).state_dict()))
    up = load_upscaler(str(path))
    assert up.describe()["size_requirements"]["multiple_of"] == 8
    odd = lr[:13, :19]
    np.testing.assert_allclose(up.upscale(odd), _reference(path, odd), atol=1e-5)


def test_a_grey_network_takes_grey_images_and_each_colour_channel(tmp_path):
    torch.manual_seed(0)
    net = Compact(num_in_ch=1, num_out_ch=1, num_feat=8, num_conv=2, upscale=3)
    path = tmp_path / "grey-x3.safetensors"
    path.write_bytes(_safetensors(net.state_dict()))
    up = load_upscaler(str(path))
    lr = np.random.default_rng(2).random((9, 11, 3), dtype=np.float32)
    rgb = up.upscale(lr)
    assert rgb.shape == (27, 33, 3)
    for c in range(3):
        np.testing.assert_allclose(up.upscale(lr[..., c : c + 1])[..., 0], rgb[..., c], atol=1e-5)


def test_precision_follows_the_descriptor():
    assert choose_precision("bf16", "cpu", supports_half=True, supports_bf16=True) == "bf16"
    assert choose_precision("bf16", "cuda", supports_half=True, supports_bf16=False) == "fp32"
    assert choose_precision("fp16", "cuda", supports_half=False, supports_bf16=True) == "fp32"
    assert choose_precision("auto", "cuda", supports_half=True, supports_bf16=True) == "fp32"
    with pytest.raises(ValueError, match="only supported on GPU"):
        choose_precision("fp16", "cpu", supports_half=True, supports_bf16=True)


def test_bf16_runs_where_the_descriptor_allows_it(models):
    up = load_upscaler(str(models["Compact"]), precision="bf16")
    assert isinstance(up, SpandrelUpscaler) and up.precision == "bf16"
    lr = np.random.default_rng(3).random((12, 12, 3), dtype=np.float32)
    out = up.upscale(lr)
    assert up.last_precision in ("bf16", "fp32")
    np.testing.assert_allclose(out, _reference(models["Compact"], lr), atol=0.05)


def test_a_pth_is_read_only_through_the_restricted_unpickler(tmp_path):
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "evil.pth"
    path.write_bytes(_pth({"body.0.weight": torch.zeros(1), "x": Payload()}))
    with pytest.raises(CheckpointError, match="restricted unpickler"):
        load_upscaler(str(path))
    assert not marker.exists()


def test_files_spandrel_cannot_use_are_refused_with_the_reason(tmp_path):
    unknown = tmp_path / "unknown.safetensors"
    unknown.write_bytes(_safetensors({"encoder.layer.weight": torch.zeros(4, 4)}))
    with pytest.raises(CheckpointError, match="not a clipsr checkpoint and spandrel does not recognise it"):
        load_upscaler(str(unknown))
    png = tmp_path / "x.png"
    png.write_bytes(_png(0))
    with pytest.raises(CheckpointError, match="not a clipsr checkpoint"):
        load_upscaler(str(png))
    torch.manual_seed(0)
    denoiser = tmp_path / "x1.safetensors"
    denoiser.write_bytes(_safetensors(Compact(num_feat=8, num_conv=2, upscale=1).state_dict()))
    with pytest.raises(CheckpointError, match="super-resolution models only"):
        load_upscaler(str(denoiser))


def test_without_spandrel_the_error_names_the_extra(models, tiny_checkpoint, monkeypatch):
    monkeypatch.setitem(sys.modules, "spandrel", None)  # import spandrel now raises ImportError
    with pytest.raises(CheckpointError, match=r"clipsr\[spandrel\]"):
        load_upscaler(str(models["SPAN"]))
    assert load_upscaler(tiny_checkpoint).describe()["id"].startswith("cdasr-tiny-x2-")


@pytest.mark.parametrize("arch", ["Compact", "SPAN"])
def test_evaluate_scores_a_spandrel_model(models, tmp_path, capsys, arch):
    folder = tmp_path / "set"
    folder.mkdir()
    for i in range(2):
        (folder / f"{i}.png").write_bytes(_png(i, 24, 20))
    (folder / "2.png").write_bytes(_png(2, 22, 18, grey=True))
    report = tmp_path / "r.json"
    code = main(["evaluate", "--model", str(models[arch]), "--scale", "2", "--data", f"set={folder}",
                 "--report", str(report), "--tile", "64"])
    out = capsys.readouterr().out
    assert code == 0
    doc = json.loads(report.read_text())
    model_id = load_upscaler(str(models[arch])).describe()["id"]
    assert doc["model"]["id"] == model_id and model_id in out
    assert doc["datasets"]["set"]["images"] == 3 and doc["datasets"]["set"]["failed"] == 0
    assert all(r["psnr_y"] is not None and r["psnr_y"] > 0 for r in doc["images"])

    code = main(["evaluate", "--model", str(models[arch]), "--scale", "4", "--data", f"set={folder}",
                 "--report", str(tmp_path / "r4.json")])
    err = capsys.readouterr().err
    assert code == 1 and "x2 model, but x4" in err and "Traceback" not in err


@pytest.mark.slow
def test_enhance_an_s3_archive_with_spandrel_models(ray_local, s3_bucket, models, tmp_path, capsys, monkeypatch):
    inputs = {"a.png": _png(1, 20, 16), "scans/grey.png": _png(2, 18, 14, grey=True)}
    for key, data in inputs.items():
        storage.write_bytes_atomic(f"{s3_bucket}/in/{key}", data)
    storage.write_bytes_atomic(f"{s3_bucket}/models/compact-x2.pth", models["Compact"].read_bytes())
    monkeypatch.chdir(models["SPAN"].parent)  # a relative path behind the prefix reaches the workers
    for arch, spec in (("Compact", f"{s3_bucket}/models/compact-x2.pth"), ("SPAN", f"spandrel:{models['SPAN'].name}")):
        out = f"{s3_bucket}/out-{arch}"
        code = main(["enhance", "--input", f"{s3_bucket}/in", "--output", out, "--model", spec,
                     "--threads", "1", "--device", "cpu"])
        summary = capsys.readouterr().out.strip().splitlines()[-1]
        assert code == 0 and "2 listed, 2 ok, 0 failed" in summary, summary
        fs, path = storage.pyarrow_filesystem(f"{out}/_manifests")
        rows = {r["input_key"]: r for r in pq.read_table(path, filesystem=fs).to_pylist()}
        model_id = load_upscaler(str(models[arch])).describe()["id"]
        assert {r["model_id"] for r in rows.values()} == {model_id}
        for key, data in inputs.items():
            assert rows[key]["status"] == "ok" and rows[key]["precision"] == "fp32"
            lr = imaging.decode(data).pixels
            sr = imaging.to_uint8(imaging.decode(storage.read_bytes(f"{out}/{key}")).pixels)
            want = _reference(models[arch], imaging.to_rgb(lr))
            want = imaging.to_uint8(want.mean(axis=2, keepdims=True) if lr.shape[2] == 1 else want)
            assert sr.shape == want.shape and np.abs(sr.astype(int) - want).max() <= 1


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["Compact", "SPAN"])
def test_adapt_tunes_every_weight_and_publishes_a_full_model_with_lineage(ray_local, models, tmp_path, capsys,
                                                                          arch):
    from clipsr.registry import Registry

    folder = tmp_path / "shots"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i:02d}.png").write_bytes(_png(10 + i, 112, 112))
    registry = str(tmp_path / "registry")
    code = main(["adapt", "--source-model", str(models[arch]), "--domain", f"maps={folder}", "--shots", "4",
                 "--out", registry, "--steps", "10", "--cpus-per-domain", "1", "--precision", "fp32"])
    assert code == 0, capsys.readouterr()
    source, smeta = load_checkpoint(str(models[arch]))
    entry = Registry(registry).get("maps", 1)
    doc = entry.doc
    assert doc["model"]["kind"] == "full" and doc["model"]["id"].startswith(f"spandrel-{arch}-x2-")
    assert doc["source_model"]["id"] == smeta["id"] == load_upscaler(str(models[arch])).describe()["id"]
    file_sha = hashlib.sha256(models[arch].read_bytes()).hexdigest()
    assert doc["source_model"]["file_sha256"] == file_sha
    assert storage.read_bytes(Registry(registry).source_uri(file_sha)) == models[arch].read_bytes()

    adapted, meta = load_checkpoint(f"{registry}/maps/v1")
    assert meta["id"] == doc["model"]["id"] and meta["parent"]["id"] == smeta["id"]
    assert meta["training_data"]["domain"] == "maps"
    before, after = source.weights(), adapted.weights()
    assert set(before) == set(after)
    assert all(not torch.equal(before[k], after[k]) for k, _ in source.net.named_parameters())
    # the stored file is the network's own state dict: spandrel reads it without clipsr
    stored = tmp_path / "adapted.safetensors"
    stored.write_bytes(storage.read_bytes(entry.model_uri))
    assert spandrel.ModelLoader().load_from_file(str(stored)).architecture.id == arch
    ref_up = load_upscaler(f"{registry}/maps", 2)
    assert ref_up.describe()["id"] == meta["id"]


def test_adapting_part_of_a_spandrel_model_is_refused(models):
    from clipsr.adapt.fast import adapt_domain
    from clipsr.adapt.settings import AdaptSettings

    source, meta = load_checkpoint(str(models["Compact"]))
    shots = [imaging.to_rgb(imaging.load_rgb_or_grey_uint8(_png(i, 112, 112))) for i in range(3)]
    settings = AdaptSettings(candidates=(("adaptive+bias", 1e-3),), steps=4, batch=2, holdout=1)
    with pytest.raises(ValueError, match=r"scope 'all' \(every weight\)"):
        adapt_domain(source, meta, shots, settings)
