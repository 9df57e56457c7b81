"""`clipsr enhance` with output settings and toned-down adapted models, end to end on a local Ray:
--outscale and --max-long-edge (sizes as Real-ESRGAN makes them), --quality and lossless WebP on a
local folder; --strength of a registry domain on S3 (moto), where the delta's source is found by
hash in the registry; a spandrel model of another scale than asked for, on S3."""
from __future__ import annotations

import base64
import hashlib
import io
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch
from PIL import Image

from clipsr import imaging, storage
from clipsr.cli import main
from clipsr.config import validate
from clipsr.enhance import manifest
from clipsr.enhance.resize import output_size, resize
from clipsr.factory import create_model, encode_checkpoint, load_checkpoint, load_upscaler, save_checkpoint

pytestmark = pytest.mark.slow

SAMPLES = Path(__file__).resolve().parents[1] / "clipsr" / "samples"
RUN = ["--threads", "1", "--device", "cpu", "--precision", "fp32"]


def _crop(name: str, box: tuple[int, int, int, int], fmt: str, **options) -> bytes:
    """A crop of a sample photo, saved as ``fmt``."""
    buf = io.BytesIO()
    Image.open(SAMPLES / name).convert("RGB").crop(box).save(buf, format=fmt, **options)
    return buf.getvalue()


INPUTS = {  # odd sides, so that int(side * 3.5) truncates; one portrait, one landscape
    "photos/astronaut.png": _crop("astronaut.png", (60, 40, 89, 77), "PNG"),  # 29 x 37
    "photos/coffee.jpg": _crop("coffee.jpg", (10, 10, 51, 33), "JPEG", quality=90),  # 41 x 23
}
WEBPS = {  # the same pixels as the PNG, stored losslessly; the JPEG's, stored lossy
    "photos/astronaut-lossless.webp": _crop("astronaut.png", (60, 40, 89, 77), "WEBP", lossless=True),
    "photos/coffee-lossy.webp": _crop("coffee.jpg", (10, 10, 51, 33), "WEBP", quality=90),
}


def _enhance(capsys, *argv: str) -> tuple[int, str]:
    code = main(["enhance", *argv, *RUN])
    return code, capsys.readouterr().out.strip().splitlines()[-1]


def _rows(output: str, summary: str) -> dict[str, dict]:
    """This run's manifest rows by input key, each checked against the published schema."""
    run_id = summary.split(" run ", 1)[1].split()[0]
    fs, path = storage.pyarrow_filesystem(f"{output}/_manifests/run={run_id}")
    rows = {r["input_key"]: r for r in pads.dataset(path, filesystem=fs, format="parquet").to_table().to_pylist()}
    for row in rows.values():
        validate(manifest.json_row(row), "manifest")
    return rows


def _pixels(data: bytes) -> np.ndarray:
    return imaging.to_uint8(imaging.decode(data).pixels)


@pytest.fixture(scope="module")
def x4(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("x4") / "tiny-x4.safetensors"
    save_checkpoint(str(path), create_model("cdasr-tiny", 4), "cdasr-tiny")
    return str(path)


def test_outscale_max_long_edge_quality_and_lossless_webp_on_a_folder(ray_local, x4, tmp_path, capsys):
    inputs = {**INPUTS, **WEBPS}
    folder = tmp_path / "in"
    for key, data in inputs.items():
        (folder / key).parent.mkdir(parents=True, exist_ok=True)
        (folder / key).write_bytes(data)
    out = str(tmp_path / "out")
    argv = ["--input", str(folder), "--output", out, "--model", x4, "--outscale", "3.5", "--max-long-edge", "120"]
    code, summary = _enhance(capsys, *argv, "--quality", "80")
    assert code == 0 and "4 ok" in summary, summary
    rows = _rows(out, summary)
    for key, data in inputs.items():
        h, w = imaging.decode(data).pixels.shape[:2]
        want = output_size(h, w, 4, 3.5, 120)
        output = storage.read_bytes(f"{out}/{key}")
        row = rows[key]
        assert imaging.decode(output).pixels.shape[:2] == want == (row["output_height"], row["output_width"])
        assert (row["scale"], row["outscale"], row["max_long_edge"], row["strength"]) == (4, 3.5, 120, None)
    # 29 x 37 at 3.5: int() truncates to 101 x 129, then the long edge is capped at 120
    assert (rows["photos/astronaut.png"]["output_height"], rows["photos/astronaut.png"]["output_width"]) == (120, 94)
    # --quality for the JPEG and the WebP of a lossy input; a WebP of a lossless input is lossless
    assert {k: r["quality"] for k, r in rows.items()} == {
        "photos/astronaut.png": None, "photos/coffee.jpg": 80,
        "photos/astronaut-lossless.webp": None, "photos/coffee-lossy.webp": 80}
    lossless = storage.read_bytes(f"{out}/photos/astronaut-lossless.webp")
    png = storage.read_bytes(f"{out}/photos/astronaut.png")
    assert lossless[12:16] == b"VP8L" and storage.read_bytes(f"{out}/photos/coffee-lossy.webp")[12:16] == b"VP8 "
    np.testing.assert_array_equal(_pixels(lossless), _pixels(png))  # every sample the PNG holds
    jpeg = storage.read_bytes(f"{out}/photos/coffee.jpg")

    code, summary = _enhance(capsys, *argv, "--quality", "60")
    assert code == 0 and "2 ok" in summary and "2 skipped" in summary, summary  # lossless outputs: unchanged
    rows = _rows(out, summary)
    assert {k for k, r in rows.items() if r["status"] == "ok"} == {"photos/coffee.jpg", "photos/coffee-lossy.webp"}
    assert rows["photos/coffee.jpg"]["quality"] == 60
    again = storage.read_bytes(f"{out}/photos/coffee.jpg")
    assert again != jpeg and len(again) < len(jpeg)
    assert storage.read_bytes(f"{out}/photos/astronaut.png") == png

    # the run report crops the same region of resized outputs and of their bicubic reference
    from clipsr.report import build_report

    samples = build_report(f"{out}/_manifests", samples=4, crop=32)["samples"]
    assert len(samples) == 2 and not any("error" in s for s in samples)  # the first run's two rewritten outputs
    for s in samples:
        bicubic, enhanced = (Image.open(io.BytesIO(base64.b64decode(s[name])))
                             for name in ("bicubic_png", "enhanced_png"))
        assert bicubic.size == enhanced.size == tuple(s["size"]) and min(s["size"]) >= 8


def _publish_delta(registry: str, source: str) -> tuple[str, str]:
    """A delta adapted from ``source`` (its adaptive module nudged), published as domain ``photos``
    of a registry that keeps a copy of the source: (its id, its reference)."""
    from clipsr.registry import Registry

    model, meta = load_checkpoint(source)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.adaptation_parameters("adaptive"):
            p.add_(torch.randn_like(p) * 0.05)
    source_bytes = storage.read_bytes(source)
    parent = {"id": meta["id"], "weights_sha256": meta["weights_sha256"],
              "file_sha256": hashlib.sha256(source_bytes).hexdigest()}
    data, dmeta = encode_checkpoint(model, "cdasr-tiny", parent=parent, parent_spec=source,
                                    delta_keys=model.adaptation_names("adaptive"))
    entry = Registry(registry).publish("photos", data, {
        "model": {"id": dmeta["id"], "kind": "delta", "weights_sha256": dmeta["weights_sha256"]},
        "source_model": {"id": meta["id"], "weights_sha256": meta["weights_sha256"], "spec": source},
        "clip_encoder": None, "exemplars": [{"uri": "photos/00.png", "sha256": "b" * 64}], "settings": {},
        "scores": {}, "seconds": 1.0, "code_revision": "0123abc", "reason": "test"},
        promote=True, sources=[source_bytes])
    return dmeta["id"], entry.ref


def test_strength_of_a_registry_domain_on_s3_and_reruns_after_a_change(ray_local, s3_bucket, x4, capsys):
    for key, data in INPUTS.items():
        storage.write_bytes_atomic(f"{s3_bucket}/in/{key}", data)
    source = f"{s3_bucket}/models/source-x4.safetensors"
    storage.write_bytes_atomic(source, Path(x4).read_bytes())
    registry = f"{s3_bucket}/registry"
    adapted_id, ref = _publish_delta(registry, source)
    storage.delete(source)  # the registry's own copy of the source is what the delta is applied onto
    out = f"{s3_bucket}/out"
    # an x4 model with --scale 2: what the user wants is said by --outscale. PNG outputs, to compare
    # them with the model's own output sample for sample
    argv = ["--input", f"{s3_bucket}/in", "--output", out, "--models", registry, "--domain", "photos",
            "--scale", "2", "--outscale", "2", "--format", "png"]
    outputs = {key: f"{out}/{key.rsplit('.', 1)[0]}.png" for key in INPUTS}
    code, summary = _enhance(capsys, *argv)
    assert code == 0 and "2 ok" in summary, summary
    rows = _rows(out, summary)
    assert {(r["model_id"], r["strength"], r["outscale"]) for r in rows.values()} == {(adapted_id, 1.0, 2.0)}
    full = {key: _pixels(storage.read_bytes(outputs[key])) for key in INPUTS}

    code, summary = _enhance(capsys, *argv, "--strength", "0.5")
    assert code == 0 and "2 ok" in summary and "0 skipped" in summary, summary  # a new strength: redone
    rows = _rows(out, summary)
    assert {(r["model_id"], r["strength"]) for r in rows.values()} == {(f"{adapted_id}@s0.5", 0.5)}
    half_up = load_upscaler(ref, strength=0.5, precision="fp32")
    source_up = load_upscaler(x4, precision="fp32")
    for key, data in INPUTS.items():
        half = _pixels(storage.read_bytes(outputs[key]))
        lr = imaging.decode(data).pixels
        h, w = lr.shape[:2]
        assert half.shape[:2] == (2 * h, 2 * w)
        want = resize(imaging.to_uint8(half_up.upscale(lr)), (2 * h, 2 * w))
        assert np.abs(half.astype(int) - want).max() <= 1
        src = resize(imaging.to_uint8(source_up.upscale(lr)), (2 * h, 2 * w)).astype(float)
        span = np.abs(full[key] - src).mean()
        assert np.abs(half - src).mean() < 0.75 * span and np.abs(half - full[key].astype(float)).mean() < 0.75 * span

    code = main(["enhance", "--input", f"{s3_bucket}/in", "--output", f"{s3_bucket}/plain", "--model", x4,
                 "--strength", "0.5", *RUN])
    err = capsys.readouterr()
    assert code == 1 and "no source model to interpolate from" in err.out + err.err


def test_a_spandrel_x2_model_enhances_to_x4_with_outscale_on_s3(ray_local, s3_bucket, capsys):
    pytest.importorskip("spandrel")
    from safetensors.torch import save as st_save
    from spandrel.architectures.Compact import Compact

    torch.manual_seed(0)
    net = Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=2)
    spec = f"{s3_bucket}/models/compact-x2.safetensors"
    storage.write_bytes_atomic(spec, st_save({k: v.contiguous() for k, v in net.state_dict().items()}))
    for key, data in INPUTS.items():
        storage.write_bytes_atomic(f"{s3_bucket}/in/{key}", data)
    out = f"{s3_bucket}/out"
    code, summary = _enhance(capsys, "--input", f"{s3_bucket}/in", "--output", out, "--model", spec,
                             "--scale", "4", "--outscale", "4")
    assert code == 0 and "2 ok" in summary, summary
    rows = _rows(out, summary)
    assert {r["model_id"].split("-x")[0] for r in rows.values()} == {"spandrel-Compact"}
    for key, data in INPUTS.items():
        h, w = imaging.decode(data).pixels.shape[:2]
        assert imaging.decode(storage.read_bytes(f"{out}/{key}")).pixels.shape[:2] == (4 * h, 4 * w)
        assert (rows[key]["scale"], rows[key]["outscale"]) == (2, 4.0)
