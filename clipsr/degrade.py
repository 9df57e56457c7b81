"""MATLAB-compatible bicubic resizing and the evaluation protocol's degradation.

Published SR tables make their LR inputs with MATLAB's ``imresize(hr, 1/scale, 'bicubic')``.
PIL, OpenCV and torch resize differently (no antialiasing, other borders) and cost 0.5 dB or more,
so this module re-implements MATLAB's algorithm (``contributions`` + ``resizeAlongDim`` of
imresize.m) in float64 numpy: cubic kernel with a = -0.5, kernel widened by 1/scale when shrinking
(antialiasing), half-sample symmetric borders, one dimension at a time, smallest scale first.
"""
from __future__ import annotations

import functools
import math

import numpy as np

__all__ = [
    "cubic",
    "contributions",
    "imresize",
    "modcrop",
    "make_lr",
    "make_lr_float",
    "upscale_bicubic",
]

_KERNEL_WIDTH = 4.0  # support of the cubic kernel, in input pixels, before antialiasing


def cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's ``cubic``)."""
    absx = np.abs(np.asarray(x, dtype=np.float64))
    absx2 = absx**2
    absx3 = absx**3
    near = (1.5 * absx3 - 2.5 * absx2 + 1.0) * (absx <= 1)
    far = (-0.5 * absx3 + 2.5 * absx2 - 4.0 * absx + 2.0) * ((absx > 1) & (absx <= 2))
    return near + far


@functools.lru_cache(maxsize=256)
def contributions(in_length: int, out_length: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Weights and 0-based input indices for resizing one dimension, as MATLAB computes them.

    Returns ``(weights, indices)``, both ``(out_length, taps)``: output pixel ``i`` is
    ``sum_k weights[i, k] * input[indices[i, k]]``. Indices are already mirrored (half-sample
    symmetric: ``... 1 0 | 0 1 2 ... n-1 | n-1 n-2 ...``) and tap columns whose weights are all
    zero are dropped, like MATLAB does. Cached per (in_length, out_length, scale) because
    training calls this for every patch; the arrays are read-only for that reason.
    """
    if in_length < 1 or out_length < 1:
        raise ValueError(f"lengths must be >= 1, got in={in_length}, out={out_length}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    antialias = scale < 1
    kernel_width = _KERNEL_WIDTH / scale if antialias else _KERNEL_WIDTH
    x = np.arange(1, out_length + 1, dtype=np.float64)  # MATLAB's 1-based output coordinates
    u = x / scale + 0.5 * (1.0 - 1.0 / scale)  # their centres in input coordinates
    left = np.floor(u - kernel_width / 2.0)
    taps = int(math.ceil(kernel_width)) + 2
    indices = left[:, None] + np.arange(taps, dtype=np.float64)[None, :]
    distance = u[:, None] - indices
    weights = scale * cubic(scale * distance) if antialias else cubic(distance)
    weights = weights / weights.sum(axis=1, keepdims=True)
    # Mirror out-of-range 1-based indices: aux = [1..n, n..1], indices = aux(mod(i-1, 2n) + 1).
    aux = np.concatenate([np.arange(in_length), np.arange(in_length - 1, -1, -1)])
    indices = aux[np.mod(indices.astype(np.int64) - 1, 2 * in_length)]
    keep = np.any(weights != 0, axis=0)
    weights = np.ascontiguousarray(weights[:, keep])
    indices = np.ascontiguousarray(indices[:, keep])
    weights.flags.writeable = False
    indices.flags.writeable = False
    return weights, indices


def _resize_along(img: np.ndarray, axis: int, out_length: int, scale: float) -> np.ndarray:
    """Resize float64 ``img`` along ``axis`` (summing taps in order, as MATLAB's mex does)."""
    weights, indices = contributions(img.shape[axis], out_length, scale)
    shape = [1] * img.ndim
    shape[axis] = out_length
    out = np.zeros(img.shape[:axis] + (out_length,) + img.shape[axis + 1 :], dtype=np.float64)
    for k in range(weights.shape[1]):
        out += weights[:, k].reshape(shape) * np.take(img, indices[:, k], axis=axis)
    return out


def imresize(
    img: np.ndarray,
    scale: float | None = None,
    output_shape: tuple[int, int] | None = None,
) -> np.ndarray:
    """Bicubic resize like MATLAB's ``imresize(img, scale)`` / ``imresize(img, [h w])``.

    Give exactly one of ``scale`` (output size ``ceil(scale * size)``, kernel built with ``scale``
    itself) or ``output_shape`` (per-dimension scale ``out / in``), as MATLAB does. ``img`` is
    HxW or HxWxC of any real dtype; the result is float64, neither rounded nor clipped (MATLAB
    rounds uint8 results itself; here the caller decides, see ``make_lr``).
    """
    img = np.asarray(img)
    if img.ndim not in (2, 3):
        raise ValueError(f"imresize expects an HxW or HxWxC array, got shape {img.shape}")
    if img.size == 0:
        raise ValueError(f"imresize got an empty image of shape {img.shape}")
    if not (np.issubdtype(img.dtype, np.integer) or np.issubdtype(img.dtype, np.floating)
            or img.dtype == np.bool_):
        raise ValueError(f"imresize expects a real numeric image, got dtype {img.dtype}")
    if (scale is None) == (output_shape is None):
        raise ValueError("imresize needs exactly one of scale or output_shape")
    in_shape = img.shape[:2]
    if scale is not None:
        if isinstance(scale, bool) or not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive finite number, got {scale!r}")
        scales = (float(scale), float(scale))
        out_shape = tuple(int(math.ceil(scale * n)) for n in in_shape)
    else:
        if (len(output_shape) != 2
                or any(isinstance(n, bool) or int(n) != n or n < 1 for n in output_shape)):
            raise ValueError(f"output_shape must be two positive integers, got {output_shape!r}")
        out_shape = (int(output_shape[0]), int(output_shape[1]))
        scales = (out_shape[0] / in_shape[0], out_shape[1] / in_shape[1])

    out = img.astype(np.float64)
    # MATLAB resizes the dimension with the smallest scale first (stable sort: H on ties).
    for axis in sorted((0, 1), key=lambda a: scales[a]):
        if scales[axis] == 1.0 and out_shape[axis] == in_shape[axis]:
            continue  # the cubic kernel at integer offsets is the identity
        out = _resize_along(out, axis, out_shape[axis], scales[axis])
    return out


def modcrop(img: np.ndarray, scale: int) -> np.ndarray:
    """Crop H and W down to multiples of ``scale``, keeping the top-left corner."""
    img = np.asarray(img)
    _check_scale(scale)
    if img.ndim not in (2, 3):
        raise ValueError(f"modcrop expects an HxW or HxWxC array, got shape {img.shape}")
    h, w = img.shape[:2]
    if h < scale or w < scale:
        raise ValueError(f"image of size {h}x{w} is smaller than the scale {scale}")
    return img[: h - h % scale, : w - w % scale]


def make_lr(hr: np.ndarray, scale: int) -> np.ndarray:
    """The protocol's LR input: MATLAB bicubic 1/scale of a modcropped uint8 HR, rounded to 8 bit.

    The LR is rounded because in a real archive it is an 8-bit image file.
    """
    hr = _check_uint8_hwc(hr, "make_lr")
    _check_multiple(hr, scale)
    h, w = hr.shape[:2]
    return _to_uint8(imresize(hr, output_shape=(h // scale, w // scale)))


def make_lr_float(hr: np.ndarray, scale: int) -> np.ndarray:
    """``make_lr`` for float HxWxC images in [0, 1] (training patches made on the fly).

    Returns float32 in [0, 1] on 8-bit levels (k / 255), so training sees the same quantised
    inputs as evaluation. Weights are cached per (size, scale), so a 256 px patch costs ~1 ms.
    """
    hr = np.asarray(hr)
    if hr.ndim != 3 or not np.issubdtype(hr.dtype, np.floating):
        raise ValueError(
            f"make_lr_float expects a float HxWxC array in [0, 1], got {hr.dtype} {hr.shape}"
        )
    _check_multiple(hr, scale)
    h, w = hr.shape[:2]
    lr = imresize(hr, output_shape=(h // scale, w // scale)) * 255.0
    return (np.clip(np.round(lr), 0, 255) / 255.0).astype(np.float32)


def upscale_bicubic(lr: np.ndarray, scale: int) -> np.ndarray:
    """The "bicubic" baseline: MATLAB bicubic x``scale`` of a uint8 LR, rounded to uint8."""
    lr = _check_uint8_hwc(lr, "upscale_bicubic")
    _check_scale(scale)
    h, w = lr.shape[:2]
    return _to_uint8(imresize(lr, output_shape=(h * scale, w * scale)))


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _check_scale(scale: int) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")


def _check_uint8_hwc(img: np.ndarray, who: str) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.size == 0:
        raise ValueError(
            f"{who} expects a non-empty uint8 HxWxC array, got {img.dtype} {img.shape}"
        )
    return img


def _check_multiple(img: np.ndarray, scale: int) -> None:
    _check_scale(scale)
    h, w = img.shape[:2]
    if h % scale or w % scale or h < scale or w < scale:
        raise ValueError(
            f"HR size {h}x{w} is not a positive multiple of scale {scale}: modcrop it first"
        )
