"""Benchmark evaluation under the protocol of METHOD.md, section 3.

HR: modcrop to the scale. LR: MATLAB bicubic downscale, rounded to 8 bit. Scores: Y-PSNR and Y-SSIM
(BT.601) and RGB-PSNR on 8-bit outputs, ``scale`` pixels cropped from each border, in float64; a
greyscale image is scored on its one channel. Folders are read in sorted order (byte order of file
names, image extensions only, hidden files ignored), and ``skip_first`` leaves out the first K, the
few-shot exemplars, so evaluation never sees them.

``jpeg`` (``clipsr evaluate --jpeg Q``) adds one archive degradation after the protocol's LR: the
LR is saved as a JPEG at quality Q and decoded again before it is upscaled. Without it nothing
changes, so published-protocol figures stay comparable.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable

import numpy as np

from clipsr import imaging, storage
from clipsr.degrade import make_lr, modcrop
from clipsr.degradations import jpeg_roundtrip
from clipsr.inference import Upscaler
from clipsr.metrics import psnr, ssim
from clipsr.provenance import code_revision, utc_now

log = logging.getLogger(__name__)

PROTOCOL = {
    "hr": "modcrop to scale",
    "lr": "MATLAB bicubic (a=-0.5, antialiased), float64, rounded to 8 bit",
    "metrics": "PSNR/SSIM on BT.601 Y (grey images: their channel), 8-bit output, crop_border=scale, float64",
    "ssim": "11x11 Gaussian window, sigma 1.5, valid region",
}


def select_images(uri: str, skip_first: int) -> list[str]:
    """The images of a folder in sorted order, less the first ``skip_first``."""
    if skip_first < 0:
        raise ValueError(f"--skip-first must be >= 0, got {skip_first}")
    images = storage.list_images(uri)
    if len(images) <= skip_first:
        raise ValueError(f"{uri} has {len(images)} images; skipping the first {skip_first} leaves none")
    return images[skip_first:]


def degraded_lr(hr: np.ndarray, scale: int, jpeg: int | None = None) -> np.ndarray:
    """The protocol's LR of a modcropped uint8 HR, then saved as a JPEG at quality ``jpeg`` if given."""
    lr = make_lr(hr, scale)
    if jpeg is None:
        return lr
    if lr.shape[2] == 1:
        return jpeg_roundtrip(lr[..., 0], jpeg)[..., None]
    return jpeg_roundtrip(lr, jpeg)


def score_image(upscaler: Upscaler, hr: np.ndarray, scale: int, jpeg: int | None = None) -> dict[str, float]:
    """Degrade one uint8 HR image, upscale it, and score the result against the HR."""
    hr = modcrop(hr, scale)
    if min(hr.shape[:2]) // scale <= 2:
        raise ValueError(f"image of {hr.shape[1]}x{hr.shape[0]} is too small to evaluate at x{scale}")
    lr = degraded_lr(hr, scale, jpeg)
    sr = imaging.to_uint8(upscaler.upscale(lr.astype(np.float32) / 255.0))
    if sr.shape != hr.shape:
        raise RuntimeError(f"upscaler returned {sr.shape}, expected {hr.shape}")
    return {
        "psnr_y": psnr(sr, hr, crop_border=scale, test_y_channel=True),
        "ssim_y": ssim(sr, hr, crop_border=scale, test_y_channel=True),
        "psnr_rgb": psnr(sr, hr, crop_border=scale, test_y_channel=False),
    }


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def evaluate(
    upscaler: Upscaler,
    datasets: dict[str, str],
    skip_first: int = 0,
    on_image: Callable[[dict[str, Any]], None] | None = None,
    jpeg: int | None = None,
) -> dict[str, Any]:
    """Score ``upscaler`` on each named folder; unreadable images become rows with an error."""
    if jpeg is not None and not 1 <= jpeg <= 100:
        raise ValueError(f"--jpeg takes a quality in 1..100, got {jpeg}")
    scale = upscaler.scale
    selected = {name: select_images(uri, skip_first) for name, uri in datasets.items()}
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    for name, uris in selected.items():
        ok: list[dict[str, Any]] = []
        for i, uri in enumerate(uris):
            row: dict[str, Any] = {"dataset": name, "uri": uri, "index": i + skip_first}
            t0 = time.perf_counter()
            try:
                hr = imaging.load_rgb_or_grey_uint8(storage.read_bytes(uri))
                row.update(height=hr.shape[0], width=hr.shape[1], channels=hr.shape[2])
                scores = score_image(upscaler, hr, scale, jpeg)
                # an exact reconstruction has infinite PSNR: JSON has no infinity, so the row says
                # so explicitly and the PSNR means leave it out (counted in ``exact``)
                row.update({k: (v if math.isfinite(v) else None) for k, v in scores.items()})
                row["exact"] = not math.isfinite(scores["psnr_y"])
                ok.append(row)
            except (imaging.ImageDecodeError, ValueError, OSError) as e:
                row["error"] = f"{type(e).__name__}: {e}"
            row["seconds"] = round(time.perf_counter() - t0, 4)
            rows.append(row)
            if on_image is not None:
                on_image(row)
        summary[name] = {
            "images": len(ok),
            "failed": len(uris) - len(ok),
            "exact": sum(r["exact"] for r in ok),
            "psnr_y": _mean([r["psnr_y"] for r in ok if r["psnr_y"] is not None]),
            "ssim_y": _mean([r["ssim_y"] for r in ok]),
            "psnr_rgb": _mean([r["psnr_rgb"] for r in ok if r["psnr_rgb"] is not None]),
            "uri": datasets[name],
        }
    protocol = dict(PROTOCOL)
    if jpeg is not None:
        protocol["lr"] += f", then saved as JPEG at quality {jpeg} (libjpeg via PIL, 4:2:0) and decoded"
    return {
        "model": upscaler.describe(),
        "scale": scale,
        "skip_first": skip_first,
        **({} if jpeg is None else {"jpeg": jpeg}),
        "protocol": protocol,
        "datasets": summary,
        "images": rows,
        "created": utc_now(),
        "code_revision": code_revision(),
    }


def format_table(report: dict[str, Any]) -> str:
    """The report's means as a fixed-width table, one line per dataset."""
    def f(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    lr = "" if report.get("jpeg") is None else f"  LR as JPEG q={report['jpeg']}"
    lines = [f"model {report['model']['id']}  x{report['scale']}  params {report['model']['params']:,}{lr}",
             f"{'dataset':<16}{'images':>7}{'failed':>7}{'Y-PSNR':>9}{'Y-SSIM':>9}{'RGB-PSNR':>10}"]
    for name, d in report["datasets"].items():
        lines.append(
            f"{name:<16}{d['images']:>7}{d['failed']:>7}{f(d['psnr_y'], '.3f'):>9}"
            f"{f(d['ssim_y'], '.4f'):>9}{f(d['psnr_rgb'], '.3f'):>10}"
        )
    return "\n".join(lines)
