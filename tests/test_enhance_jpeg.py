"""JPEG inputs go to the JPEG model by the quality in their quantisation tables; the manifest says
which network ran and what quality was read; the pair is one model for incremental reruns."""
from __future__ import annotations

import io
import logging

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch
from PIL import Image

from clipsr.cli import main
from clipsr.factory import create_model, save_checkpoint


def _checkpoint(path, seed: int) -> str:
    torch.manual_seed(seed)
    return save_checkpoint(str(path), create_model("cdasr-tiny", 2), "cdasr-tiny")["id"]


def _photo(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 6, 3)).astype(np.uint8)
    base = np.asarray(Image.fromarray(small).resize((48, 40), Image.BICUBIC), dtype=np.float64)
    return np.clip(base + rng.normal(0, 5, base.shape), 0, 255).astype(np.uint8)


def _rows(out) -> dict[str, dict]:
    """The last run's row per key. Run ids order runs by the second they started only (two runs
    of one second differ in a random suffix), so the last run is the newest manifest folder."""
    last = max((out / "_manifests").glob("run=*"), key=lambda d: d.stat().st_mtime_ns)
    return {r["input_key"]: r for r in pads.dataset(str(last), format="parquet").to_table().to_pylist()}


@pytest.mark.slow
def test_jpeg_inputs_run_on_the_jpeg_model_and_reruns_follow_the_pair(ray_local, tmp_path, capsys):
    clean_id = _checkpoint(tmp_path / "clean.safetensors", 0)
    jpeg_id = _checkpoint(tmp_path / "jpeg.safetensors", 1)
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for name, quality in (("q50.jpg", 50), ("q97.jpg", 97)):
        Image.fromarray(_photo(quality)).save(src / name, quality=quality)
    Image.fromarray(_photo(3)).save(src / "clean.png")
    # a PNG that was a JPEG once: a strong 8x8 grid the blind estimate sees
    buf = io.BytesIO()
    Image.fromarray(np.asarray(Image.fromarray(_photo(4)).resize((192, 160)))).save(buf, "JPEG", quality=10)
    Image.open(io.BytesIO(buf.getvalue())).save(src / "was-jpeg.png")
    argv = ["enhance", "--input", str(src), "--output", str(out), "--model", str(tmp_path / "clean.safetensors"),
            "--jpeg-model", str(tmp_path / "jpeg.safetensors"), "--jpeg-below", "90"]

    assert main(argv) == 0, capsys.readouterr()
    rows = _rows(out)
    assert {k: (r["input_jpeg_quality"], r["input_jpeg_quality_source"]) for k, r in rows.items()} == {
        "q50.jpg": (50, "tables"), "q97.jpg": (97, "tables"), "clean.png": (None, None),
        "was-jpeg.png": (rows["was-jpeg.png"]["input_jpeg_quality"], "blind")}
    assert rows["was-jpeg.png"]["input_jpeg_quality"] in (50, 75)
    assert {r["status"] for r in rows.values()} == {"ok"}
    assert len({r["model_id"] for r in rows.values()}) == 1 and rows["q50.jpg"]["model_id"].startswith("jpeg-pair-")
    assert {k: r["model_ran"] for k, r in rows.items()} == {
        "q50.jpg": jpeg_id, "was-jpeg.png": jpeg_id, "q97.jpg": clean_id, "clean.png": clean_id}

    assert main(argv) == 0  # nothing changed: every input skipped
    assert {r["status"] for r in _rows(out).values()} == {"skipped"}
    assert "4 skipped" in capsys.readouterr().out

    assert main(argv[:-1] + ["98"]) == 0  # another threshold is another pair: everything is redone
    rows = _rows(out)
    assert {r["status"] for r in rows.values()} == {"ok"}
    assert rows["q97.jpg"]["model_ran"] == jpeg_id


def test_a_pair_of_different_scales_is_refused(tmp_path, tiny, capsys):
    torch.manual_seed(0)
    save_checkpoint(str(tmp_path / "x4.safetensors"), create_model("cdasr-tiny", 4), "cdasr-tiny")
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(_photo(1)).save(src / "a.jpg", quality=60)
    code = main(["enhance", "--input", str(src), "--output", str(tmp_path / "out"), "--model", tiny[0],
                 "--jpeg-model", str(tmp_path / "x4.safetensors")])
    assert code == 1
    assert "--jpeg-model is a x4 model but --model is x2" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_bundled_model_sends_jpeg_inputs_to_its_jpeg_companion_by_default(ray_local, tmp_path, capsys):
    from clipsr.factory import read_model_metadata

    clean_id, jpeg_id = (read_model_metadata(s)["id"] for s in ("default", "default-x4-jpeg"))
    assert clean_id != jpeg_id
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(_photo(1)).save(src / "scan.jpg", quality=70)
    Image.fromarray(_photo(3)).save(src / "drawing.png")
    out = tmp_path / "out"
    assert main(["enhance", "--input", str(src), "--output", str(out)]) == 0, capsys.readouterr()
    rows = _rows(out)
    assert rows["scan.jpg"]["model_id"].startswith("jpeg-pair-")
    assert {k: r["model_ran"] for k, r in rows.items()} == {"scan.jpg": jpeg_id, "drawing.png": clean_id}
    # --jpeg-model none: every input to --model, as before the companion existed
    out = tmp_path / "plain"
    assert main(["enhance", "--input", str(src), "--output", str(out), "--jpeg-model", "none"]) == 0
    assert {k: (r["model_id"], r["model_ran"]) for k, r in _rows(out).items()} == {
        "scan.jpg": (clean_id, clean_id), "drawing.png": (clean_id, clean_id)}


@pytest.mark.slow
def test_an_archive_made_by_a_replaced_bundled_model_is_redone_with_a_warning_naming_its_pin(
        ray_local, tmp_path, capsys, caplog):
    """After an upgrade that replaced the bundled default, every input is enhanced again; the run
    says so before it starts, and names the versioned model that would keep the earlier outputs."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    Image.fromarray(_photo(1)).save(src / "scan.jpg", quality=70)
    Image.fromarray(_photo(3)).save(src / "drawing.png")
    argv = ["enhance", "--input", str(src), "--output", str(out)]
    assert main(argv + ["--model", "default-x4-v1"]) == 0, capsys.readouterr()
    before = {r["model_id"] for r in _rows(out).values()}
    capsys.readouterr()

    def dry_run(*more: str) -> tuple[str, list[str]]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="clipsr.enhance.run"):
            assert main(argv + [*more, "--dry-run"]) == 0
        return capsys.readouterr().out, [r.getMessage() for r in caplog.records if "enhanced again" in r.getMessage()]

    summary, warned = dry_run()
    assert "would process 2" in summary
    (old,) = before
    assert len(warned) == 1 and warned[0].startswith(f"2 unchanged inputs are enhanced again: their output is from "
                                                     f"model {old}, this run's is jpeg-pair-")
    assert warned[0].endswith("; to keep the earlier model, run with --model default-x4-v1")
    summary, warned = dry_run("--model", "default-x4-v1")
    assert "would process 0" in summary and "skip 2" in summary and warned == []
