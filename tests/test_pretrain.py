"""Source pretraining on a real local Ray: two workers, S3 checkpoints, recovery, reruns."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from clipsr import storage
from clipsr.config import ConfigError
from clipsr.factory import load_checkpoint
from clipsr.train.settings import load_settings, parse_override

pytestmark = pytest.mark.slow


def _image(seed: int, size: int = 48) -> bytes:
    """A smooth image with some texture: enough structure to learn from."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    f = rng.uniform(1, 4, 3)
    img = np.stack([np.sin(f[c] * np.pi * (xx + c * yy)) for c in range(3)], -1) * 0.4 + 0.5
    img += rng.normal(0, 0.03, img.shape)
    buf = io.BytesIO()
    Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def hr_data(tmp_path):
    """Two folders (pseudo-domains) of three generated HR images each."""
    roots = []
    for d in ("a", "b"):
        for i in range(3):
            storage.write_bytes_atomic(str(tmp_path / "data" / d / f"{i}.png"), _image(10 * len(roots) + i))
        roots.append(str(tmp_path / "data" / d))
    return roots


def _settings(name: str, storage_path: str, train: list[str], *extra: str) -> dict:
    return load_settings(None, [
        f"name={name}", f"storage_path={storage_path}", f"data.train={train}",
        f"data.val={{v: {train[0]}}}",
        "model.arch=cdasr-tiny", "model.scale=2", "batch.size=2", "batch.lr_patch=12",
        "optim.steps=6", "optim.warmup=1", "checkpoint.every=2", "checkpoint.keep=10",
        "validation.log_every=2", "validation.every=6", "episodes.every=2", "episodes.inner_steps=1",
        "scaling.num_workers=2", "scaling.cpus_per_worker=0.5", "scaling.torch_threads=1",
        *extra,
    ])


def _checkpoints(run_uri: str) -> set[str]:
    fs, path = storage.filesystem(run_uri)
    return {p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False) if p.rsplit("/", 1)[-1].startswith("checkpoint_2")}


def test_two_workers_train_from_s3_checkpoint_to_s3_and_export(ray_local, s3_bucket, hr_data):
    from clipsr.train.trainer import pretrain

    train = []
    for root in hr_data:  # the images live in the bucket too: workers read them through S3
        dst = f"{s3_bucket}/data/{root.rsplit('/', 1)[-1]}"
        for uri in storage.list_images(root):
            storage.write_bytes_atomic(f"{dst}/{uri.rsplit('/', 1)[-1]}", storage.read_bytes(uri))
        train.append(dst)
    s = _settings("s3run", f"{s3_bucket}/runs", train)
    meta = pretrain(s)

    run = f"{s3_bucket}/runs/s3run"
    assert len(_checkpoints(run)) == 3, _checkpoints(run)  # steps 2, 4, 6
    assert meta["uri"] == f"{run}/model.safetensors"
    model, loaded = load_checkpoint(meta["uri"])
    assert loaded["id"] == meta["id"] and loaded["scale"] == 2
    assert loaded["training_data"]["images"] == 6 and loaded["training_data"]["steps"] == 6
    assert loaded["parent"] is None and loaded["clip_encoder"] is None and loaded["code_revision"]
    assert "val/v/psnr_y" in loaded["metrics"]


def test_a_failed_worker_resumes_from_the_last_checkpoint(ray_local, tmp_path, hr_data):
    from clipsr.train.trainer import pretrain

    # rank 1 raises at step 5; the last checkpoint is at step 4; one restart is allowed
    s = _settings("crash", str(tmp_path / "runs"), hr_data, "failure.fail_at_step=5", "failure.max_failures=1")
    meta = pretrain(s)
    assert meta["training_data"]["attempt_start_steps"] == [0, 4]
    assert meta["training_data"]["steps"] == 6

    # with no restarts allowed, the failure reaches the caller instead of being hidden
    s = _settings("crash-hard", str(tmp_path / "runs"), hr_data, "failure.fail_at_step=3", "failure.max_failures=0")
    with pytest.raises(Exception, match="injected failure"):
        pretrain(s)


def test_rerunning_a_finished_run_keeps_its_checkpoints(ray_local, tmp_path, hr_data):
    from clipsr.train.trainer import pretrain

    s = _settings("again", str(tmp_path / "runs"), hr_data, "optim.steps=4")
    first = pretrain(s)
    before = _checkpoints(str(tmp_path / "runs" / "again"))
    second = pretrain(s)
    after = _checkpoints(str(tmp_path / "runs" / "again"))
    assert len(before) == 2 and after == before  # resumed at the end: nothing retrained, nothing lost
    assert second["weights_sha256"] == first["weights_sha256"]
    assert second["training_data"]["attempt_start_steps"] == [0]

    # exporting again as float16 (how the bundled model ships): half the bytes, same outputs
    size32 = len(storage.read_bytes(first["uri"]))
    model32, _ = load_checkpoint(first["uri"])
    half = pretrain({**s, "export": {"dtype": "float16", "note": "generated test images"}})
    model16, meta16 = load_checkpoint(half["uri"])
    assert len(storage.read_bytes(half["uri"])) < 0.6 * size32
    assert meta16["training_data"]["note"] == "generated test images"
    assert meta16["training_data"]["storage"].startswith("float16")
    assert "no semantic prior" in meta16["training_data"]["conditioning"]
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert next(model16.parameters()).dtype == torch.float32
        assert torch.allclose(model16(x), model32(x), atol=2e-3)


def test_settings_are_validated_and_overridable(tmp_path):
    assert parse_override("optim.lr=1e-4") == {"optim": {"lr": 1e-4}}
    s = load_settings(None, ["data.train=[x]", "optim.steps=7"])
    assert s["optim"]["steps"] == 7 and s["data"]["train"][0].startswith("/")  # made absolute
    with pytest.raises(ConfigError, match="optim/steps"):
        load_settings(None, ["data.train=[x]", "optim.steps=0"])
    with pytest.raises(ConfigError, match="data"):
        load_settings(None, [])  # no training data given
    with pytest.raises(ConfigError, match="Additional properties"):
        load_settings(None, ["data.train=[x]", "optim.lrr=1"])
