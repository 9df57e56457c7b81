"""The size of an output, when it is not simply the model's scale: ``--outscale`` and ``--max-long-edge``.

The convention is Real-ESRGAN's (``RealESRGANer.enhance`` in its ``realesrgan/utils.py``): the
model runs at its own scale, and the result is then resized to ``int(width * outscale)`` by
``int(height * outscale)`` (truncated, as there), unless that is already the model's size.
``--max-long-edge N`` then caps the longer side at N pixels, the other side following in proportion
(rounded), never below 1. Without either option the output is the model's, ``scale`` times the
input, as it always was.

The resize filter: Lanczos when enlarging; area averaging (Pillow's box filter, which averages
exactly the source pixels each output pixel covers) when shrinking, where Lanczos rings and plain
interpolation aliases. Real-ESRGAN uses OpenCV's Lanczos both ways. 8-bit samples go through
Pillow's 8-bit path, which rounds after each direction (at most 1 level from exact); 16-bit
samples are resized in single precision, so they keep their 16 bits.

The pixel limit (``--max-output-pixels``) and the decoder's memory must hold the larger of the
model's own output and the resized one: :func:`limit_factor`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image


def check_options(outscale: float | None, max_long_edge: int | None) -> None:
    if outscale is not None and not 0.0 < outscale <= 64.0:
        raise ValueError(f"--outscale must be above 0 and at most 64, got {outscale}")
    if max_long_edge is not None and max_long_edge < 1:
        raise ValueError(f"--max-long-edge must be at least 1, got {max_long_edge}")


def output_size(height: int, width: int, scale: int, outscale: float | None = None,
                max_long_edge: int | None = None) -> tuple[int, int]:
    """(height, width) of the output of a ``height`` x ``width`` input through a x``scale`` model."""
    if outscale is None:
        h, w = height * scale, width * scale
    else:
        h, w = max(1, int(height * outscale)), max(1, int(width * outscale))
    if max_long_edge is not None and max(h, w) > max_long_edge:
        if h >= w:
            h, w = max_long_edge, max(1, round(w * max_long_edge / h))
        else:
            h, w = max(1, round(h * max_long_edge / w)), max_long_edge
    return h, w


def row_output_size(row: Mapping[str, Any], height: int, width: int) -> tuple[int, int]:
    """:func:`output_size` with the settings a plan row carries."""
    return output_size(height, width, int(row["scale"]), row.get("outscale"), row.get("max_long_edge"))


def limit_factor(scale: int, outscale: float | None) -> float:
    """The factor the pixel limit applies to: the model's output is made before any resize, so the
    larger of the two (``--max-long-edge`` only ever shrinks)."""
    return float(scale) if outscale is None else max(float(scale), outscale)


def resize(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Integer HxWxC samples (uint8 or uint16) resized to ``size`` (height, width), same dtype."""
    h, w = size
    if values.shape[:2] == (h, w):
        return values
    shrinking = h * w < values.shape[0] * values.shape[1]
    resample = Image.Resampling.BOX if shrinking else Image.Resampling.LANCZOS
    if values.dtype == np.uint8:  # Pillow's 8-bit path: RGB or grey at once, several times the float path's speed
        image = Image.fromarray(values if values.shape[2] == 3 else np.ascontiguousarray(values[..., 0]))
        out8 = np.asarray(image.resize((w, h), resample))
        return out8 if out8.ndim == 3 else out8[..., None]
    top = float(np.iinfo(values.dtype).max)
    out = []
    for c in range(values.shape[2]):
        plane = Image.fromarray(np.ascontiguousarray(values[..., c], dtype=np.float32))  # mode F
        out.append(np.asarray(plane.resize((w, h), resample)))
    return np.clip(np.rint(np.stack(out, axis=2)), 0, top).astype(values.dtype)
