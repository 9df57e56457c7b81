"""`clipsr evaluate` as a user runs it: published baselines, report layout, exit codes, messages."""
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from clipsr.cli import main
from clipsr.clip import TINY_ARCH, ClipEncoder
from clipsr.factory import create_model, save_checkpoint

# Published bicubic Y-PSNR (BasicSR / SAFMN / SwinIR tables).
PUBLISHED = {2: {"set5": 33.66, "set14": 30.24}, 4: {"set5": 28.42, "set14": 26.00}}


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG")
    return buf.getvalue()


def _image(seed: int, h: int = 32, w: int = 28) -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx / w, yy / h, (xx + yy) / (h + w)], axis=2) * 200 + 20
    return _png(np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8))


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _evaluate(capsys, report: Path, *extra: str, model: str = "bicubic", scale: int = 2):
    return _run(capsys, "evaluate", "--model", model, "--scale", str(scale), "--report", str(report), *extra)


@pytest.mark.parametrize("scale", [2, 4])
def test_bicubic_reproduces_published_baselines(tmp_path, capsys, scale, bench_data):
    set5, set14 = bench_data("val", "set5"), bench_data("val", "set14")
    out_json = tmp_path / "report.json"
    code, out, _ = _evaluate(capsys, out_json, "--data", f"set5={set5}", "--data", f"set14={set14}", scale=scale)
    assert code == 0
    report = json.loads(out_json.read_text())
    assert report["model"] == {"id": "bicubic", "params": 0, "scale": scale, "clip_encoder": None}
    for name, published in PUBLISHED[scale].items():
        d = report["datasets"][name]
        assert abs(d["psnr_y"] - published) < 0.05, (name, scale, d["psnr_y"])
        assert d["failed"] == 0 and 0 < d["ssim_y"] < 1 and d["psnr_rgb"] < d["psnr_y"]
        rows = [r for r in report["images"] if r["dataset"] == name]
        assert len(rows) == d["images"] == len(list({"set5": set5, "set14": set14}[name].glob("*.png")))
        assert d["psnr_y"] == pytest.approx(np.mean([r["psnr_y"] for r in rows]))
        assert f"{d['psnr_y']:.3f}" in out  # the printed table carries the same means
    assert any(r["channels"] == 1 for r in report["images"]), "Set14's grey image goes through the grey rule"


def test_skip_first_leaves_out_the_first_files_in_byte_order(tmp_path, capsys):
    folder = tmp_path / "domain"
    folder.mkdir()
    for i, name in enumerate(["img_2.png", "a.png", "img_10.png", "B.png", ".hidden.png"]):
        (folder / name).write_bytes(_image(i))
    (folder / "notes.txt").write_text("shots are the first files")
    out_json = tmp_path / "r.json"
    for k, expected in [(0, ["B.png", "a.png", "img_10.png", "img_2.png"]),
                        (1, ["a.png", "img_10.png", "img_2.png"]),
                        (2, ["img_10.png", "img_2.png"])]:
        code, _, _ = _evaluate(capsys, out_json, "--data", f"d={folder}", "--skip-first", str(k))
        report = json.loads(out_json.read_text())
        assert code == 0
        assert [r["uri"].rsplit("/", 1)[-1] for r in report["images"]] == expected
        assert report["datasets"]["d"]["images"] == len(expected) and report["skip_first"] == k

    code, _, err = _evaluate(capsys, tmp_path / "none.json", "--data", f"d={folder}", "--skip-first", "4")
    assert code == 1 and "leaves none" in err and "Traceback" not in err
    assert not (tmp_path / "none.json").exists()


def test_bad_files_are_reported_and_the_command_still_succeeds(tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i in range(2):
        (folder / f"good{i}.png").write_bytes(_image(i))
    (folder / "zero.png").write_bytes(b"")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    out_json = tmp_path / "r.json"
    code, out, err = _evaluate(capsys, out_json, "--data", f"mixed={folder}")
    assert code == 0
    report = json.loads(out_json.read_text())
    rows = {r["uri"].rsplit("/", 1)[-1]: r for r in report["images"]}
    assert set(rows) == {"corrupt.png", "good0.png", "good1.png", "zero.png"}
    assert rows["zero.png"]["error"] and rows["corrupt.png"]["error"]
    d = report["datasets"]["mixed"]
    assert (d["images"], d["failed"]) == (2, 2)
    assert d["psnr_y"] == pytest.approx((rows["good0.png"]["psnr_y"] + rows["good1.png"]["psnr_y"]) / 2)
    assert "2 image(s) could not be evaluated" in err and "Traceback" not in err


@pytest.mark.parametrize("case", ["empty", "missing"])
def test_empty_or_missing_folder_exits_1_with_a_message(tmp_path, capsys, case):
    folder = tmp_path / "folder"
    if case == "empty":
        folder.mkdir()
        (folder / "readme.txt").write_text("no images here")
    code, _, err = _evaluate(capsys, tmp_path / "r.json", "--data", f"d={folder}")
    assert code == 1
    assert ("no image files" if case == "empty" else "not found") in err
    assert str(folder) in err and "Traceback" not in err


def test_network_checkpoint_evaluates_grey_and_colour(tmp_path, capsys):
    torch.manual_seed(0)
    ckpt = tmp_path / "tiny.safetensors"
    meta = save_checkpoint(str(ckpt), create_model("cdasr-tiny", 2), "cdasr-tiny")
    folder = tmp_path / "imgs"
    folder.mkdir()
    grey = np.random.default_rng(0).integers(0, 256, (30, 26), dtype=np.uint8)
    (folder / "grey16.png").write_bytes(_png(grey.astype(np.uint16) * 257))
    (folder / "rgba.png").write_bytes(_png(np.dstack([np.stack([grey] * 3, 2), grey]), "RGBA"))
    out_json = tmp_path / "r.json"
    code, _, _ = _evaluate(capsys, out_json, "--data", f"d={folder}", model=str(ckpt))
    assert code == 0
    report = json.loads(out_json.read_text())
    assert report["model"]["id"] == meta["id"] and report["model"]["scale"] == 2
    assert 0 < report["model"]["params"] < sum(p.numel() for p in create_model("cdasr-tiny", 2).parameters())
    assert {r["uri"].rsplit("/", 1)[-1]: r["channels"] for r in report["images"]} == {"grey16.png": 1, "rgba.png": 3}

    code, _, err = _evaluate(capsys, out_json, "--data", f"d={folder}", model=str(ckpt), scale=4)
    assert code == 1 and "x2 model, but x4" in err


@pytest.fixture
def clip_ckpt(tmp_path):
    """A tiny checkpoint recorded as trained with the seed-1 tiny tower."""
    identity = ClipEncoder.load(TINY_ARCH, None, seed=1).identity.to_dict()
    torch.manual_seed(0)
    ckpt = tmp_path / "clip.safetensors"
    save_checkpoint(str(ckpt), create_model("cdasr-tiny", 2), "cdasr-tiny", clip_encoder=identity)
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.png").write_bytes(_image(0))
    return ckpt, identity, folder


def test_checkpoint_with_another_clip_encoder_is_refused(tmp_path, capsys, clip_ckpt):
    ckpt, identity, folder = clip_ckpt
    other = tmp_path / "tower-seed2.safetensors"
    save_file({k: v.contiguous() for k, v in ClipEncoder.load(TINY_ARCH, None, seed=2).visual.state_dict().items()},
              str(other))
    out_json = tmp_path / "r.json"
    code, _, err = _evaluate(capsys, out_json, "--data", f"d={folder}", "--clip-weights", str(other),
                             model=str(ckpt))
    assert code == 1 and "CLIP encoder mismatch" in err and identity["sha256"][:12] in err
    assert "Traceback" not in err and not out_json.exists()


def test_checkpoint_with_its_seeded_clip_encoder_evaluates(tmp_path, capsys, clip_ckpt):
    ckpt, identity, folder = clip_ckpt
    out_json = tmp_path / "r.json"
    code, _, _ = _evaluate(capsys, out_json, "--data", f"d={folder}", model=str(ckpt))
    assert code == 0
    report = json.loads(out_json.read_text())
    assert report["model"]["clip_encoder"] == identity
    assert report["datasets"]["d"]["images"] == 1


def test_checkpoint_without_clip_encoder_refuses_clip_weights(tmp_path, capsys):
    ckpt = tmp_path / "null.safetensors"
    save_checkpoint(str(ckpt), create_model("cdasr-tiny", 2), "cdasr-tiny")
    weights = tmp_path / "tower.safetensors"
    save_file({k: v.contiguous() for k, v in ClipEncoder.load(TINY_ARCH, None, seed=1).visual.state_dict().items()},
              str(weights))
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.png").write_bytes(_image(0))
    code, _, err = _evaluate(capsys, tmp_path / "r.json", "--data", f"d={folder}", "--clip-weights", str(weights),
                             model=str(ckpt))
    assert code == 1 and "without a CLIP encoder" in err and "Traceback" not in err


def test_data_without_equals_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--model", "bicubic", "--scale", "2", "--data", str(tmp_path), "--report", "r.json"])
    assert exc.value.code == 2
    assert "expected NAME=DIR_OR_URI" in capsys.readouterr().err


def test_duplicate_data_names_are_refused(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(_image(0))
    code, _, err = _evaluate(capsys, tmp_path / "r.json", "--data", f"d={tmp_path}", "--data", f"d={tmp_path}")
    assert code == 1 and "unique" in err


def test_unknown_model_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(_image(0))
    code, _, err = _evaluate(capsys, tmp_path / "r.json", "--data", f"d={tmp_path}",
                             model=str(tmp_path / "nope.safetensors"))
    assert code == 1 and "not found" in err and "bicubic" in err


@pytest.mark.parametrize("scale", [0, 1, 5, -2])
def test_unsupported_scale_is_refused_before_any_image_is_read(tmp_path, capsys, scale):
    (tmp_path / "a.png").write_bytes(_image(0))
    code, _, err = _evaluate(capsys, tmp_path / "r.json", "--data", f"d={tmp_path}", scale=scale)
    assert code == 1 and "x2, x3, x4, x8" in err and not (tmp_path / "r.json").exists()


def test_checkpoint_trained_with_clip_file_asks_for_its_weights(tmp_path, capsys):
    weights = tmp_path / "tower.safetensors"
    save_file({k: v.contiguous() for k, v in ClipEncoder.load(TINY_ARCH, None, seed=3).visual.state_dict().items()},
              str(weights))
    identity = ClipEncoder.load(TINY_ARCH, str(weights)).identity.to_dict()
    assert identity["weights"] == "file:tower.safetensors"
    ckpt = tmp_path / "m.safetensors"
    save_checkpoint(str(ckpt), create_model("cdasr-tiny", 2), "cdasr-tiny", clip_encoder=identity)
    (tmp_path / "a.png").write_bytes(_image(0))
    code, _, err = _evaluate(capsys, tmp_path / "r.json", "--data", f"d={tmp_path}", model=str(ckpt))
    assert code == 1 and "--clip-weights" in err and identity["sha256"][:12] in err
    code, _, _ = _evaluate(capsys, tmp_path / "r.json", "--data", f"d={tmp_path}", "--clip-weights", str(weights),
                           model=str(ckpt))
    assert code == 0


def test_bench_inference_writes_sizes_speed_and_environment(tmp_path, capsys):
    out_json = tmp_path / "bench" / "inference.json"
    code, out, _ = _run(capsys, "bench", "inference", "--arch", "cdasr-tiny", "--scale", "2", "--scale", "3",
                        "--size", "16", "--runs", "2", "--out", str(out_json))
    assert code == 0
    result = json.loads(out_json.read_text())
    env = result["environment"]
    assert env["torch"] == torch.__version__ and env["torch_threads"] >= 1 and env["cpu"] and env["date"]
    rows = result["results"]
    assert [(r["arch"], r["scale"]) for r in rows] == [("cdasr-tiny", 2), ("cdasr-tiny", 3)]
    for r in rows:
        model = create_model("cdasr-tiny", r["scale"])
        assert r["params_total"] == sum(p.numel() for p in model.parameters())
        assert 0 < r["params_inference"] < r["params_total"]  # the folded adaptive branch is one vector
        assert r["output_size"] == [16 * r["scale"]] * 2 and len(r["seconds"]) == 2
        assert r["output_mp_per_s"] == pytest.approx((16 * r["scale"]) ** 2 / 1e6 / r["seconds_median"], rel=1e-2)
        assert f"{r['params_inference']:,}" in out


def test_bench_inference_refuses_unknown_configs_before_timing(tmp_path, capsys):
    code, out, err = _run(capsys, "bench", "inference", "--arch", "nope", "--out", str(tmp_path / "b.json"))
    assert code == 1 and "unknown architecture 'nope'" in err and out == ""
    code, _, err = _run(capsys, "bench", "inference", "--scale", "5", "--out", str(tmp_path / "b.json"))
    assert code == 1 and "x5" in err and not (tmp_path / "b.json").exists()
    with pytest.raises(SystemExit):
        main(["bench", "inference", "--runs", "0"])
    assert "expected a number >= 1" in capsys.readouterr().err


def test_bench_threads_measures_every_thread_count_and_precision_per_cpu(tmp_path, capsys, tiny_checkpoint):
    import os

    out_json = tmp_path / "threads.json"
    code, out, _ = _run(capsys, "bench", "threads", "--model", tiny_checkpoint, "--scale", "2", "--threads", "1",
                        "--threads", "4", "--precision", "fp32", "--size", "16", "--runs", "1", "--out", str(out_json))
    assert code == 0
    rows = json.loads(out_json.read_text())["results"]
    assert [(r["threads"], r["precision"]) for r in rows] == [(1, "fp32")] * 2 + [(4, "fp32")] * 2
    assert {r["workload"] for r in rows} == {"1 x 16x16", "16 x 48x48 in one pass"}
    for r in rows:  # per CPU: the threads that can run at once, never more than the machine's CPUs
        cpus = min(r["threads"], os.cpu_count())
        assert r["output_mp_per_s_per_cpu"] == pytest.approx(r["output_mp_per_s"] / cpus, rel=1e-2, abs=1e-3)
    assert out.count("fp32") == 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_gpu_bench_without_a_gpu_says_so_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert main(["bench", "gpu", "--out", str(out)]) == 1
    assert "needs a CUDA device" in capsys.readouterr().err
    assert not out.exists()
