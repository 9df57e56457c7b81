"""Full-reference (PSNR, SSIM) and no-reference image figures, in float64 numpy.

PSNR/SSIM follow BasicSR's ``psnr_ssim`` (the conventions behind published SR tables): uint8
inputs, ``crop_border`` pixels dropped from every side, BT.601 luma Y in [16, 235] when
``test_y_channel``, SSIM with an 11x11 Gaussian window (sigma 1.5) over the valid region only.
One deliberate rule on top: a one-channel (greyscale) image is scored on that channel as is, never
converted to Y, as the MATLAB scripts behind the published tables do.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["Y_WEIGHTS", "rgb_to_y", "psnr", "ssim", "sharpness", "clipping_ratio", "mean_luma"]

Y_WEIGHTS = np.array([65.481, 128.553, 24.966])  # BT.601 studio-range luma, RGB in [0, 1]
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])  # BT.601 full-range luma, for no-reference figures
_SSIM_C1 = (0.01 * 255) ** 2
_SSIM_C2 = (0.03 * 255) ** 2
_SSIM_SIZE = 11
_SSIM_SIGMA = 1.5


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """BT.601 Y = 16 + 65.481 R + 128.553 G + 24.966 B (RGB in [0, 1]), in the [0, 255] range.

    ``img`` is HxWx3: integer dtypes are divided by their maximum (255 for uint8), floats are
    taken as [0, 1]. Returns float64 HxWx1 (Y spans [16, 235]).
    """
    img = _check_hwc(img, "rgb_to_y")
    if img.shape[2] != 3:
        raise ValueError(f"rgb_to_y expects 3 channels (RGB), got {img.shape[2]}")
    return (16.0 + _to_unit(img) @ Y_WEIGHTS)[..., None]


def psnr(img: np.ndarray, ref: np.ndarray, crop_border: int, test_y_channel: bool = True) -> float:
    """PSNR in dB of uint8 ``img`` against ``ref`` (peak 255).

    Y channel if ``test_y_channel`` and RGB; otherwise the MSE over all channels. Identical
    images give ``inf`` (zero MSE), as in BasicSR; averaging code must expect it.
    """
    a, b = _prepare(img, ref, crop_border, test_y_channel, "psnr")
    mse = float(np.mean((a - b) ** 2))
    if mse == 0:
        return math.inf
    return 10.0 * math.log10(255.0**2 / mse)


def ssim(img: np.ndarray, ref: np.ndarray, crop_border: int, test_y_channel: bool = True) -> float:
    """SSIM of uint8 ``img`` against ``ref`` (BasicSR's ``_ssim``), mean over scored channels."""
    a, b = _prepare(img, ref, crop_border, test_y_channel, "ssim")
    if min(a.shape[:2]) < _SSIM_SIZE:
        raise ValueError(
            f"ssim needs at least {_SSIM_SIZE}x{_SSIM_SIZE} pixels after cropping, "
            f"got {a.shape[:2]}"
        )
    return float(np.mean([_ssim_channel(a[..., c], b[..., c]) for c in range(a.shape[2])]))


def sharpness(img: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian of the luma, in squared 8-bit grey levels.

    The usual blur detector (same figure as ``cv2.Laplacian(grey, CV_64F).var()`` on 8-bit
    greys, without border pixels): low values flag blurry or flat images. Luma is full-range
    BT.601 (0.299 R + 0.587 G + 0.114 B) scaled to [0, 255] whatever the dtype, so uint8, uint16
    and float [0, 1] versions of one image score alike. Images under 3x3 score 0.
    """
    luma = _luma(img) * 255.0
    if min(luma.shape) < 3:
        return 0.0
    lap = (luma[:-2, 1:-1] + luma[2:, 1:-1] + luma[1:-1, :-2] + luma[1:-1, 2:]
           - 4.0 * luma[1:-1, 1:-1])
    return float(lap.var())


def clipping_ratio(img: np.ndarray) -> float:
    """Fraction of all sample values (every channel) at the dtype's floor or ceiling.

    Floor/ceiling are 0 and the integer maximum (255 for uint8, 65535 for uint16), or 0 and 1 for
    floats (values beyond count as clipped). High values flag blown highlights or crushed shadows,
    where SR has nothing to restore.
    """
    img = _check_hwc(img, "clipping_ratio")
    if np.issubdtype(img.dtype, np.integer):
        top = np.iinfo(img.dtype).max
        clipped = (img == 0) | (img == top)
    else:
        clipped = (img <= 0) | (img >= 1)
    return float(np.mean(clipped))


def mean_luma(img: np.ndarray) -> float:
    """Mean full-range BT.601 luma in [0, 1] (the brightness of the image, dtype-independent)."""
    return float(np.mean(_luma(img)))


def _prepare(img, ref, crop_border, test_y_channel, who) -> tuple[np.ndarray, np.ndarray]:
    """Validate, crop and (for RGB with test_y_channel) convert to Y; float64 HxWxC out."""
    img = _check_hwc(img, who)
    ref = _check_hwc(ref, who)
    if img.dtype != np.uint8 or ref.dtype != np.uint8:
        raise ValueError(f"{who} expects uint8 images (round outputs to 8 bit first), "
                         f"got {img.dtype} and {ref.dtype}")
    if img.shape != ref.shape:
        raise ValueError(f"{who}: image shapes differ: {img.shape} vs {ref.shape}")
    if isinstance(crop_border, bool) or not isinstance(crop_border, (int, np.integer)) \
            or crop_border < 0:
        raise ValueError(f"crop_border must be a non-negative integer, got {crop_border!r}")
    h, w = img.shape[:2]
    if 2 * crop_border >= min(h, w):
        raise ValueError(f"crop_border {crop_border} leaves nothing of a {h}x{w} image")
    if crop_border:
        img = img[crop_border:-crop_border, crop_border:-crop_border]
        ref = ref[crop_border:-crop_border, crop_border:-crop_border]
    if test_y_channel and img.shape[2] == 3:
        return rgb_to_y(img), rgb_to_y(ref)
    return img.astype(np.float64), ref.astype(np.float64)


def _gaussian_1d() -> np.ndarray:
    """OpenCV's getGaussianKernel(11, 1.5): the 11x11 SSIM window is its outer product."""
    x = np.arange(_SSIM_SIZE, dtype=np.float64) - (_SSIM_SIZE - 1) / 2
    g = np.exp(-(x**2) / (2 * _SSIM_SIGMA**2))
    return g / g.sum()


def _filter_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 2-D correlation with ``outer(g, g)``, valid region only."""
    view = np.lib.stride_tricks.sliding_window_view
    x = view(x, g.size, axis=0) @ g
    return view(x, g.size, axis=1) @ g


def _ssim_channel(a: np.ndarray, b: np.ndarray) -> float:
    g = _gaussian_1d()
    mu_a, mu_b = _filter_valid(a, g), _filter_valid(b, g)
    var_a = _filter_valid(a * a, g) - mu_a**2
    var_b = _filter_valid(b * b, g) - mu_b**2
    cov = _filter_valid(a * b, g) - mu_a * mu_b
    num = (2 * mu_a * mu_b + _SSIM_C1) * (2 * cov + _SSIM_C2)
    den = (mu_a**2 + mu_b**2 + _SSIM_C1) * (var_a + var_b + _SSIM_C2)
    return float(np.mean(num / den))


def _check_hwc(img: np.ndarray, who: str) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] not in (1, 3) or img.size == 0:
        raise ValueError(f"{who} expects a non-empty HxWxC array with C in {{1, 3}}, "
                         f"got shape {img.shape}")
    if not (np.issubdtype(img.dtype, np.integer) or np.issubdtype(img.dtype, np.floating)):
        raise ValueError(f"{who} expects a real numeric image, got dtype {img.dtype}")
    return img


def _to_unit(img: np.ndarray) -> np.ndarray:
    """float64 in [0, 1]: integers divided by their dtype maximum, floats taken as they are."""
    if np.issubdtype(img.dtype, np.integer):
        return img.astype(np.float64) / np.iinfo(img.dtype).max
    return img.astype(np.float64)


def _luma(img: np.ndarray) -> np.ndarray:
    """Full-range luma in [0, 1], HxW; a one-channel image is its own luma."""
    unit = _to_unit(_check_hwc(img, "luma"))
    return unit[..., 0] if unit.shape[2] == 1 else unit @ _LUMA_WEIGHTS
