"""Upscalers: one interface over plain bicubic and CDASR networks, used by evaluation and enhancement.

An upscaler takes an LR image as float HxWxC in [0, 1] (C = 1 or 3) and returns the SR image in the
same layout, clipped to [0, 1]; callers quantise (8 or 16 bit). Greyscale goes through a colour
network as three equal channels and comes back as their mean.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

from clipsr import imaging
from clipsr.degrade import imresize
from clipsr.models.cdasr import CDASR, count_parameters
from clipsr.tiling import tiled_apply

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: str) -> str:
    """``auto``: bf16 on CPUs with AVX-512 BF16, where the folded x4 model runs 1.7-1.8x faster and
    its 8-bit outputs agree with fp32 at 55 dB PSNR or more (docs/benchmarks.md); fp32 elsewhere,
    GPUs included (on an H200 the whole-image path gained nothing from bf16)."""
    if precision not in ("auto", *PRECISIONS):
        raise ValueError(f"precision must be auto or one of {sorted(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    return "bf16" if device == "cpu" and torch.cpu._is_avx512_bf16_supported() else "fp32"


class Upscaler(Protocol):
    scale: int

    def upscale(self, lr: np.ndarray) -> np.ndarray: ...

    def describe(self) -> dict[str, Any]: ...


def _check_lr(lr: np.ndarray) -> None:
    if lr.ndim != 3 or lr.shape[2] not in (1, 3):
        raise ValueError(f"expected an HxWxC image with C in (1, 3), got shape {lr.shape}")
    if lr.shape[0] == 0 or lr.shape[1] == 0:
        raise ValueError(f"empty image of shape {lr.shape}")


class BicubicUpscaler:
    """MATLAB-compatible bicubic upscaling: the baseline every table carries."""

    def __init__(self, scale: int) -> None:
        self.scale = scale

    def upscale(self, lr: np.ndarray) -> np.ndarray:
        _check_lr(lr)
        return np.clip(imresize(lr.astype(np.float64), scale=self.scale), 0.0, 1.0).astype(np.float32)

    def describe(self) -> dict[str, Any]:
        return {"id": "bicubic", "params": 0, "scale": self.scale, "clip_encoder": None}


class NetworkUpscaler:
    """A CDASR network ready for inference: folded condition, tiles, optional reduced precision.

    Without a CLIP encoder the model runs with its learned null embedding, folded into a constant,
    so ``params`` counts what actually runs per image. With an encoder, each image is embedded
    first (from the LR input: that is all inference has) and the full adaptive module runs.
    """

    def __init__(
        self,
        model: CDASR,
        meta: dict[str, Any],
        encoder: Any | None = None,
        device: str = "cpu",
        precision: str = "fp32",
        tile: int = 256,
        overlap: int = 32,
        tile_batch: int = 4,
    ) -> None:
        precision = resolve_precision(precision, torch.device(device).type)
        if precision == "fp16" and not device.startswith("cuda"):
            raise ValueError(f"fp16 inference is only supported on GPU; use bf16 or fp32 on {device}")
        self.meta = meta
        self.scale = int(meta["scale"])
        self.encoder = encoder
        self.device = torch.device(device)
        self.precision = precision
        self.tile, self.overlap, self.tile_batch = tile, overlap, tile_batch
        self.fp32_fallbacks = 0
        self.last_precision = precision  # what the latest forward pass actually ran in
        model = model.eval()
        self.model = (model if encoder is not None else model.folded()).to(self.device)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor | None) -> torch.Tensor:
        """[N, 3, h, w] -> [N, 3, s*h, s*w]: one image by overlapping tiles, or several images no
        larger than a tile in one batch."""
        def run(t: torch.Tensor) -> torch.Tensor:
            e = None if emb is None else emb.expand(t.shape[0], -1)
            return self.model(t, e)

        def apply() -> torch.Tensor:
            if x.shape[0] == 1:
                return tiled_apply(run, x, self.scale, self.tile, self.overlap, self.tile_batch)
            return run(x).float()

        with torch.inference_mode():
            self.last_precision = self.precision
            if self.precision == "fp32":
                return apply()
            with torch.autocast(self.device.type, dtype=PRECISIONS[self.precision]):
                y = apply()
            if torch.isfinite(y).all():
                return y
            # fp16 overflows on some inputs (black or NaN outputs): redo in fp32 rather than ship it.
            self.fp32_fallbacks += 1
            self.last_precision = "fp32"
            log.warning("non-finite %s output; recomputing in fp32", self.precision)
            return apply()

    def embed(self, lr_rgb: np.ndarray) -> np.ndarray | None:
        """The image's CLIP vector (None when the model runs without an encoder)."""
        if self.encoder is None:
            return None
        return self.encoder.embed_images([lr_rgb])[0]

    def upscale(self, lr: np.ndarray, embedding: np.ndarray | None = None) -> np.ndarray:
        _check_lr(lr)
        grey = lr.shape[2] == 1
        rgb = imaging.to_rgb(lr)
        if self.encoder is not None and embedding is None:
            embedding = self.embed(rgb)
        x = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32))[None]
        emb = None if embedding is None else torch.as_tensor(embedding, dtype=torch.float32)[None]
        y = self._forward(x.to(self.device), None if emb is None else emb.to(self.device))
        out = y[0].clamp(0.0, 1.0).permute(1, 2, 0).cpu().numpy()
        return out.mean(axis=2, keepdims=True) if grey else out

    def batch_limit(self, height: int, width: int) -> int:
        """How many images of this size one forward pass takes (0: too large, tile it alone):
        as many as fill the pixels of one batch of tiles, so memory stays within the tile bound."""
        if self.encoder is not None or height > self.tile or width > self.tile:
            return 0
        return max(1, (self.tile * self.tile * self.tile_batch) // (height * width))

    def upscale_batch(self, lrs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Several images of one height and width in one forward pass (a model without an encoder,
        images within a tile: see :meth:`batch_limit`). Small images are where per-call overhead
        dominates: thumbnails and small scans, most of an archive's count."""
        for lr in lrs:
            _check_lr(lr)
        if len({lr.shape[:2] for lr in lrs}) != 1 or self.batch_limit(*lrs[0].shape[:2]) < len(lrs):
            raise ValueError("upscale_batch takes images of one size, as many as batch_limit allows")
        x = torch.from_numpy(np.stack([imaging.to_rgb(lr).transpose(2, 0, 1) for lr in lrs]).astype(np.float32))
        y = self._forward(x.to(self.device), None).clamp(0.0, 1.0).permute(0, 2, 3, 1).cpu().numpy()
        return [out.mean(axis=2, keepdims=True) if lr.shape[2] == 1 else out for lr, out in zip(lrs, y)]

    def describe(self) -> dict[str, Any]:
        enc = self.meta.get("clip_encoder")
        return {
            "id": self.meta["id"],
            "params": count_parameters(self.model),
            "scale": self.scale,
            "clip_encoder": enc if enc is not None else "none (learned null embedding)",
        }
