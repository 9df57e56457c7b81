import math

import numpy as np
import pytest

from clipsr.metrics import clipping_ratio, mean_luma, psnr, rgb_to_y, sharpness, ssim


def _rand(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def test_rgb_to_y_pure_colours():
    colours = np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255]]],
                       dtype=np.uint8)
    y = rgb_to_y(colours)
    assert y.dtype == np.float64 and y.shape == (1, 5, 1)
    np.testing.assert_allclose(y[0, :, 0], [16, 235, 81.481, 144.553, 40.966], atol=1e-9)
    np.testing.assert_allclose(rgb_to_y(colours / 255.0), y, atol=1e-12)  # floats are [0, 1]
    with pytest.raises(ValueError, match="3 channels"):
        rgb_to_y(colours[..., :1])


def test_psnr_of_known_mse():
    ref = np.full((8, 8, 3), 100, dtype=np.uint8)
    img = ref.copy()
    img[..., 0] += 3  # MSE over all channels = 9 / 3 = 3
    assert psnr(img, ref, 0, test_y_channel=False) == pytest.approx(10 * math.log10(255**2 / 3))
    # On Y the red difference is scaled by 65.481 / 255.
    dy = 3 * 65.481 / 255
    assert psnr(img, ref, 0) == pytest.approx(10 * math.log10(255**2 / dy**2))


def test_identical_images_score_inf_and_one():
    img = _rand((20, 20, 3))
    assert psnr(img, img, 2) == math.inf
    assert ssim(img, img, 2) == pytest.approx(1.0, abs=1e-12)
    assert ssim(img, img, 0, test_y_channel=False) == pytest.approx(1.0, abs=1e-12)


def test_greyscale_is_scored_directly():
    ref = np.full((16, 16, 1), 120, dtype=np.uint8)
    img = ref + np.uint8(10)
    expected = 10 * math.log10(255**2 / 100)  # raw MSE 100, no Y scaling by 219/255
    assert psnr(img, ref, 0, test_y_channel=True) == pytest.approx(expected)
    assert psnr(img, ref, 0, test_y_channel=False) == pytest.approx(expected)
    # Converting the same grey image to Y would shrink the error and raise the score.
    rgb = psnr(np.repeat(img, 3, axis=2), np.repeat(ref, 3, axis=2), 0, test_y_channel=True)
    assert rgb == pytest.approx(10 * math.log10(255**2 / (10 * 219 / 255) ** 2))
    noisy = _rand((16, 16, 1), seed=5)
    assert ssim(noisy, ref, 0, True) == ssim(noisy, ref, 0, False)


def test_crop_border_drops_border_pixels():
    ref = _rand((20, 20, 3))
    img = ref.copy()
    img[:3] = 0
    img[:, -3:] = 255
    assert psnr(img, ref, 3) == math.inf
    assert psnr(img, ref, 2) < 40
    with pytest.raises(ValueError, match="leaves nothing"):
        psnr(img, ref, 10)
    with pytest.raises(ValueError, match="non-negative"):
        psnr(img, ref, -1)


def test_input_errors():
    a = _rand((12, 12, 3))
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(a, _rand((12, 13, 3)), 0)
    with pytest.raises(ValueError, match="shapes differ"):
        ssim(a, a[..., :1], 0)
    with pytest.raises(ValueError, match="uint8"):
        psnr(a / 255.0, a, 0)
    with pytest.raises(ValueError, match="HxWxC"):
        psnr(a[..., 0], a[..., 0], 0)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(a, a, 1)


def test_ssim_of_constant_images():
    a = np.full((15, 15, 1), 50, dtype=np.uint8)
    b = np.full((15, 15, 1), 200, dtype=np.uint8)
    c1 = (0.01 * 255) ** 2
    expected = (2 * 50 * 200 + c1) / (50**2 + 200**2 + c1)  # no variance, no covariance
    assert ssim(a, b, 0) == pytest.approx(expected, rel=1e-12)


def _ssim_brute_force(a, b):
    """BasicSR's _ssim written out window by window (independent of the separable filter)."""
    x = np.arange(11) - 5
    g = np.exp(-(x**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for i in range(a.shape[0] - 10):
        for j in range(a.shape[1] - 10):
            pa, pb = a[i : i + 11, j : j + 11], b[i : i + 11, j : j + 11]
            ma, mb = (w * pa).sum(), (w * pb).sum()
            va, vb = (w * pa * pa).sum() - ma**2, (w * pb * pb).sum() - mb**2
            cov = (w * pa * pb).sum() - ma * mb
            num = (2 * ma * mb + c1) * (2 * cov + c2)
            vals.append(num / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return np.mean(vals)


def test_ssim_matches_window_definition_and_channel_rules():
    ref = _rand((17, 15, 3), seed=1)
    img = np.clip(ref.astype(int) + _rand((17, 15, 3), seed=2) // 8 - 16, 0, 255).astype(np.uint8)
    per_channel = [_ssim_brute_force(img[..., c].astype(float), ref[..., c].astype(float))
                   for c in range(3)]
    assert ssim(img, ref, 1, test_y_channel=False) == pytest.approx(
        np.mean([_ssim_brute_force(img[1:-1, 1:-1, c].astype(float),
                                   ref[1:-1, 1:-1, c].astype(float)) for c in range(3)]),
        rel=1e-10)
    assert ssim(img, ref, 0, test_y_channel=False) == pytest.approx(np.mean(per_channel), rel=1e-10)
    y = _ssim_brute_force(rgb_to_y(img)[..., 0], rgb_to_y(ref)[..., 0])
    assert ssim(img, ref, 0) == pytest.approx(y, rel=1e-10)
    assert ssim(img, ref, 0) < 1


def test_sharpness():
    assert sharpness(np.full((10, 10, 3), 128, dtype=np.uint8)) == 0.0
    board = (np.indices((10, 10)).sum(axis=0) % 2 * 255).astype(np.uint8)[..., None]
    # Each interior Laplacian is +-(4 * 255): variance 1020^2 in squared 8-bit grey levels.
    assert sharpness(board) == pytest.approx(1020.0**2)
    rgb = np.repeat(board, 3, axis=2)
    assert sharpness(rgb) == pytest.approx(1020.0**2)
    assert sharpness(rgb / 255.0) == pytest.approx(1020.0**2)  # same figure for floats in [0, 1]
    assert sharpness((rgb.astype(np.uint16) * 257)) == pytest.approx(1020.0**2)
    blurred = (board[:-1, :-1].astype(float) + board[1:, 1:] + board[:-1, 1:] + board[1:, :-1]) / 4
    assert sharpness(blurred.astype(np.uint8)) < sharpness(board)


def test_clipping_ratio():
    img = np.full((2, 5, 3), 100, dtype=np.uint8)
    img[0, 0] = 0
    img[1, :2, 0] = 255
    assert clipping_ratio(img) == pytest.approx((3 + 2) / 30)
    assert clipping_ratio(img.astype(np.uint16)) == pytest.approx(3 / 30)  # 255 is not 16-bit max
    f = np.array([[[0.0], [1.0], [0.5], [1.2]]])
    assert clipping_ratio(f) == pytest.approx(3 / 4)


def test_mean_luma():
    assert mean_luma(np.zeros((4, 4, 3), dtype=np.uint8)) == 0.0
    assert mean_luma(np.full((4, 4, 3), 255, dtype=np.uint8)) == pytest.approx(1.0)
    green = np.zeros((2, 2, 3))
    green[..., 1] = 1.0
    assert mean_luma(green) == pytest.approx(0.587)
    assert mean_luma(np.full((3, 3, 1), 51, dtype=np.uint8)) == pytest.approx(0.2)
