"""No-reference figures for the manifest: how much sharper than bicubic, how much clipping.

Archive images have no ground truth, so the manifest reports figures a reviewer can sort and
threshold on: the Laplacian-variance sharpness of the output against that of a plain bicubic
upscale of the same input (a gain near 1 means the model added nothing; far above 1 on a noisy
input may mean amplified noise), and the fraction of clipped samples. The bicubic reference is
Pillow's (fast, single precision) on the luma only: bicubic and luma are both linear, so this is
the luma of the bicubic upscale up to clipping, at a third of the cost.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from clipsr.metrics import clipping_ratio, sharpness

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def bicubic_sharpness(lr: np.ndarray, size: tuple[int, int]) -> float:
    """Sharpness of a bicubic resize of ``lr`` (float HxWxC in [0, 1]) to the output's ``size``
    (height, width): the figure depends on the size, so the reference has the output's."""
    luma = lr[..., 0] if lr.shape[2] == 1 else lr @ _LUMA
    up = Image.fromarray(np.ascontiguousarray(luma, dtype=np.float32))  # mode F
    up = np.asarray(up.resize((size[1], size[0]), Image.BICUBIC))
    return sharpness(np.clip(up, 0.0, 1.0)[..., None])


def output_figures(sr: np.ndarray, bicubic: float | None) -> dict[str, float | None]:
    """Sharpness, gain over bicubic and clipping of an output (integer HxWxC at its bit depth)."""
    out = sharpness(sr)
    return {
        "sharpness_output": out,
        "sharpness_gain": out / bicubic if bicubic else None,
        "clipping_ratio": clipping_ratio(sr),
    }
