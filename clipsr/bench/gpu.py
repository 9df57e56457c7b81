"""A short check of the CUDA path: inference at fp32/bf16/fp16 and adaptation training steps.

Needs a GPU. What it measures, each on the model given (the bundled x4 model by default):

- *agreement*: every bundled sample image through :class:`~clipsr.inference.NetworkUpscaler` on the
  GPU (tiles, blended seams: the path enhancement uses) at each precision, against the fp32 CPU
  output: RGB PSNR between the two 8-bit outputs (``null``: identical) and how many images fell
  back to fp32 because the reduced-precision output was not finite;
- *forward speed*: the folded network on batches of one fixed-size LR input per precision, output
  megapixels per second, CUDA-synchronised, median of timed runs after warm-ups;
- *whole-image speed*: one large LR image through the upscaler (tiling, blending and the copies
  to and from the GPU included);
- *adaptation steps*: :class:`~clipsr.adapt.fast.Trajectory` steps per second (the training step
  adaptation runs, every weight, Adam) in fp32 and bf16 autocast.
"""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipsr import imaging, storage
from clipsr.adapt.fast import Trajectory
from clipsr.adapt.settings import AdaptSettings
from clipsr.adapt.shots import degrade_shots
from clipsr.bench.inference import environment
from clipsr.factory import load_checkpoint
from clipsr.inference import PRECISIONS, NetworkUpscaler
from clipsr.metrics import psnr
from clipsr.models.cdasr import CDASR

SAMPLES = Path(__file__).resolve().parents[1] / "samples"


def _timed(fn: Callable[[], Any], runs: int, warmup: int = 2) -> list[float]:
    """Wall-clock seconds of ``runs`` calls after ``warmup`` ones, the GPU drained around each."""
    out = []
    for i in range(warmup + runs):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        if i >= warmup:
            out.append(time.perf_counter() - t0)
    return out


def _finite(db: float) -> float | None:
    """JSON has no infinity: identical outputs (infinite PSNR) are written as null."""
    return None if math.isinf(db) else round(db, 2)


def agreement(model: CDASR, meta: dict[str, Any], images: dict[str, np.ndarray]) -> dict[str, Any]:
    """Per precision: PSNR of each GPU output against the fp32 CPU output, and fp32 fallbacks."""
    reference = NetworkUpscaler(model, meta)
    expected = {n: imaging.to_uint8(reference.upscale(img)) for n, img in images.items()}
    out: dict[str, Any] = {}
    for precision in PRECISIONS:
        up = NetworkUpscaler(model, meta, device="cuda", precision=precision)
        scores = {n: psnr(imaging.to_uint8(up.upscale(img)), expected[n], crop_border=0, test_y_channel=False)
                  for n, img in images.items()}
        lowest = min(scores.values())
        out[precision] = {"psnr_vs_cpu_fp32": {n: _finite(v) for n, v in scores.items()},
                          "min_psnr": _finite(lowest), "fp32_fallbacks": up.fp32_fallbacks}
    return out


def forward_speed(model: CDASR, lr_size: int, batch: int, runs: int) -> dict[str, Any]:
    """Output MP/s of the folded network per precision on one batch of random LR inputs."""
    folded = model.folded().cuda().eval()
    x = torch.rand(batch, 3, lr_size, lr_size, device="cuda")
    out: dict[str, Any] = {}
    for precision, dtype in PRECISIONS.items():
        def run(dtype: torch.dtype = dtype, enabled: bool = precision != "fp32") -> None:
            with torch.inference_mode(), torch.autocast("cuda", dtype=dtype, enabled=enabled):
                folded(x)
        median = statistics.median(_timed(run, runs))
        mp = batch * (lr_size * model.scale) ** 2 / 1e6
        out[precision] = {"ms_per_batch": round(median * 1000, 3), "output_mp_per_s": round(mp / median, 1)}
    return {"lr_size": lr_size, "batch": batch, "runs": runs, "by_precision": out}


def whole_image_speed(model: CDASR, meta: dict[str, Any], lr_size: int, tile: int, runs: int) -> dict[str, Any]:
    """Seconds per image of one ``lr_size`` square LR image through the tiled GPU upscaler."""
    rng = np.random.default_rng(0)
    lr = rng.random((lr_size, lr_size, 3), dtype=np.float32)
    out: dict[str, Any] = {}
    for precision in PRECISIONS:
        up = NetworkUpscaler(model, meta, device="cuda", precision=precision, tile=tile)
        median = statistics.median(_timed(lambda up=up: up.upscale(lr), runs, warmup=1))
        mp = (lr_size * model.scale) ** 2 / 1e6
        out[precision] = {"s_per_image": round(median, 4), "output_mp_per_s": round(mp / median, 1)}
    return {"lr_size": lr_size, "tile": tile, "runs": runs, "by_precision": out}


def adaptation_steps(model: CDASR, shots: list[np.ndarray], steps: int) -> dict[str, Any]:
    """Steps per second of adaptation's training step on the GPU, fp32 and bf16 autocast."""
    out: dict[str, Any] = {}
    for precision in ("fp32", "bf16"):
        s = AdaptSettings(device="cuda", precision=precision, lr_patch=32)
        trajectory = Trajectory(model, "all", 3e-4, degrade_shots(shots, model.scale, s.patch_side(model.scale)), s)
        seconds = _timed(lambda t=trajectory: t.step(t.lr), steps)
        out[precision] = {"ms_per_step": round(statistics.median(seconds) * 1000, 2),
                          "batch": s.batch, "lr_patch": s.lr_patch}
    return out


def run(model_spec: str = "default", runs: int = 10) -> dict[str, Any]:
    if not torch.cuda.is_available():
        raise LookupError("clipsr bench gpu needs a CUDA device; torch sees none")
    model, meta = load_checkpoint(model_spec)
    model = model.float()
    pixels = {uri.rsplit("/", 1)[-1]: imaging.load_rgb_or_grey_uint8(storage.read_bytes(uri))
              for uri in storage.list_images(str(SAMPLES))}
    images = {n: p.astype(np.float32) / 255.0 for n, p in pixels.items()}
    shots = [imaging.to_rgb(p) for p in pixels.values()]
    env = environment()
    env.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    return {
        "benchmark": "gpu",
        "model": meta["id"],
        "environment": env,
        "agreement": agreement(model, meta, images),
        "forward_speed": [forward_speed(model, size, batch, runs) for size, batch in ((128, 16), (256, 8))],
        "whole_image_speed": whole_image_speed(model, meta, 1024, 512, max(3, runs // 2)),
        "adaptation_steps": adaptation_steps(model, shots, runs * 5),
    }
