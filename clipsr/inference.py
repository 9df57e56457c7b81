"""Upscalers: one interface over plain bicubic and CDASR networks, used by evaluation and enhancement.

An upscaler takes an LR image as float HxWxC in [0, 1] (C = 1 or 3) and returns the SR image in the
same layout, clipped to [0, 1]; callers quantise (8 or 16 bit). Greyscale goes through a colour
network as three equal channels and comes back as their mean.
"""
from __future__ import annotations

import logging
from typing import Any, Protocol

import numpy as np
import torch

from clipsr import imaging
from clipsr.degrade import imresize
from clipsr.models.cdasr import CDASR, count_parameters
from clipsr.tiling import tiled_apply

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        if precision != "fp32" and not device.startswith("cuda"):
            raise ValueError(f"{precision} inference is only supported on GPU; use fp32 on {device}")
        self.meta = meta
        self.scale = int(meta["scale"])
        self.encoder = encoder
        self.device = torch.device(device)
        self.precision = precision
        self.tile, self.overlap, self.tile_batch = tile, overlap, tile_batch
        self.fp32_fallbacks = 0
        model = model.eval()
        self.model = (model if encoder is not None else model.folded()).to(self.device)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor | None) -> torch.Tensor:
        def run(t: torch.Tensor) -> torch.Tensor:
            e = None if emb is None else emb.expand(t.shape[0], -1)
            return self.model(t, e)

        with torch.inference_mode():
            if self.precision == "fp32":
                return tiled_apply(run, x, self.scale, self.tile, self.overlap, self.tile_batch)
            with torch.autocast(self.device.type, dtype=PRECISIONS[self.precision]):
                y = tiled_apply(run, x, self.scale, self.tile, self.overlap, self.tile_batch)
            if torch.isfinite(y).all():
                return y
            # fp16 overflows on some inputs (black or NaN outputs): redo in fp32 rather than ship it.
            self.fp32_fallbacks += 1
            log.warning("non-finite %s output; recomputing this image in fp32", self.precision)
            return tiled_apply(run, x, self.scale, self.tile, self.overlap, self.tile_batch)

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

    def describe(self) -> dict[str, Any]:
        enc = self.meta.get("clip_encoder")
        return {
            "id": self.meta["id"],
            "params": count_parameters(self.model),
            "scale": self.scale,
            "clip_encoder": enc if enc is not None else "none (learned null embedding)",
        }
