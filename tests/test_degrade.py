import numpy as np
import pytest

from clipsr.degrade import (
    contributions,
    cubic,
    imresize,
    make_lr,
    make_lr_float,
    modcrop,
    upscale_bicubic,
)


# cubic(x) with a = -0.5 at |x| = 0.25, 0.75, 1.25, 1.75 (worked out by hand from Keys' formula)
C025, C075, C125, C175 = 0.8671875, 0.2265625, -0.0703125, -0.0234375


def test_cubic_kernel_values():
    x = np.array([0, 0.25, 0.75, 1, 1.25, 1.75, 2, 2.5, -0.25, -1.75])
    expected = [1, C025, C075, 0, C125, C175, 0, 0, C025, C175]
    np.testing.assert_allclose(cubic(x), expected, rtol=0, atol=1e-15)


def test_x2_upscale_weights_match_matlab():
    weights, indices = contributions(4, 8, 2.0)
    # MATLAB: first output pixel (centre 0.75, 1-based) uses inputs -1, 0, 1, 2 (mirrored).
    np.testing.assert_array_equal(weights[0], [C175, C075, C025, C125])
    np.testing.assert_array_equal(indices[0], [1, 0, 0, 1])
    np.testing.assert_array_equal(weights[1], [C125, C025, C075, C175])
    np.testing.assert_array_equal(indices[1], [0, 0, 1, 2])
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-15)


def test_half_downscale_weights_are_antialiased_cubic():
    weights, indices = contributions(8, 4, 0.5)
    # 8 taps, cubic(x / 2) / 2 at distances +-0.5, 1.5, 2.5, 3.5: the raw taps already sum to 1.
    taps = np.array([C175, C125, C075, C025, C025, C075, C125, C175]) / 2
    assert taps.sum() == 1.0
    np.testing.assert_allclose(weights, np.tile(taps, (4, 1)), atol=1e-15)
    np.testing.assert_array_equal(indices[0], [2, 1, 0, 0, 1, 2, 3, 4])
    np.testing.assert_array_equal(indices[3], [3, 4, 5, 6, 7, 7, 6, 5])  # inputs 3..10


def test_half_downscale_matches_hand_derivation():
    rng = np.random.default_rng(0)
    img = rng.uniform(0, 255, size=(8, 6))
    taps = np.array([C175, C125, C075, C025, C025, C075, C125, C175]) / 2
    # Output i is centred on input 2i + 0.5 (0-based) and reads inputs 2i-3 .. 2i+4, mirrored.
    padded = np.pad(img, ((3, 4), (3, 4)), mode="symmetric")
    rows = np.array([padded[2 * i : 2 * i + 8].T @ taps for i in range(4)])  # 4 x 13
    expected = np.array([[rows[i, 2 * j : 2 * j + 8] @ taps for j in range(3)] for i in range(4)])
    np.testing.assert_allclose(imresize(img, 0.5), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("scale", [0.25, 0.37, 0.5, 1.0, 1.7, 2, 3, 4])
def test_constant_image_stays_constant(scale):
    img = np.full((13, 9, 3), 77, dtype=np.uint8)
    np.testing.assert_allclose(imresize(img, scale), 77.0, rtol=0, atol=1e-10)


def test_linear_ramp_is_reproduced_away_from_borders():
    # Cubic convolution reproduces linear functions; mirrored borders only bend the edges.
    ramp = np.tile(np.arange(32, dtype=np.float64)[:, None], (1, 4))
    down = imresize(ramp, output_shape=(16, 4))
    np.testing.assert_allclose(down[2:-2, 0], 2 * np.arange(2, 14) + 0.5, atol=1e-12)
    up = imresize(ramp, output_shape=(64, 4))
    np.testing.assert_allclose(up[4:-4, 0], (np.arange(4, 60) + 0.5) / 2 - 0.5, atol=1e-12)


def test_symmetric_border():
    col = np.array([10.0, 50.0, 20.0, 90.0])[:, None]
    up = imresize(col, output_shape=(8, 1))
    # Input -1 mirrors to input 1, input 0 to input 0 (half-sample symmetric, edge repeated).
    assert up[0, 0] == pytest.approx(C175 * 50 + C075 * 10 + C025 * 10 + C125 * 50, abs=1e-12)
    assert up[7, 0] == pytest.approx(C125 * 20 + C025 * 90 + C075 * 90 + C175 * 20, abs=1e-12)
    # Mirroring the input mirrors the output.
    img = np.random.default_rng(1).uniform(size=(12, 10))
    np.testing.assert_allclose(imresize(img[::-1, ::-1], 0.5), imresize(img, 0.5)[::-1, ::-1],
                               atol=1e-12)


@pytest.mark.parametrize(
    "shape, scale, expected",
    [((10, 7), 0.3, (3, 3)), ((5, 3), 1.5, (8, 5)), ((16, 12), 0.25, (4, 3)), ((3, 2), 4, (12, 8))],
)
def test_output_shape_is_ceil(shape, scale, expected):
    assert imresize(np.zeros(shape), scale).shape == expected
    assert imresize(np.zeros(shape + (3,)), scale).shape == expected + (3,)
    assert imresize(np.zeros(shape + (1,)), scale).shape == expected + (1,)


def test_output_shape_argument():
    assert imresize(np.zeros((10, 7, 3)), output_shape=(4, 21)).shape == (4, 21, 3)


def test_float64_without_rounding_or_clipping():
    step = np.zeros((8, 8), dtype=np.uint8)
    step[:, 4:] = 255
    up = imresize(step, 2)
    assert up.dtype == np.float64
    assert up.min() < 0 and up.max() > 255  # bicubic overshoot is kept
    assert not np.allclose(up, np.round(up))
    # Same result whatever the input dtype: the computation is float64 throughout.
    np.testing.assert_array_equal(imresize(step.astype(np.float32), 2), up)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"img": np.zeros((4,)), "scale": 2}, "HxW"),
        ({"img": np.zeros((2, 2, 2, 2)), "scale": 2}, "HxW"),
        ({"img": np.zeros((0, 4)), "scale": 2}, "empty"),
        ({"img": np.zeros((4, 4)), "scale": 0}, "positive"),
        ({"img": np.zeros((4, 4)), "scale": -1.5}, "positive"),
        ({"img": np.zeros((4, 4)), "scale": float("nan")}, "positive"),
        ({"img": np.zeros((4, 4))}, "exactly one"),
        ({"img": np.zeros((4, 4)), "scale": 2, "output_shape": (8, 8)}, "exactly one"),
        ({"img": np.zeros((4, 4)), "output_shape": (0, 8)}, "output_shape"),
        ({"img": np.zeros((4, 4)), "output_shape": (8,)}, "output_shape"),
        ({"img": np.array([["a"]]), "scale": 2}, "dtype"),
    ],
)
def test_imresize_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        imresize(**kwargs)


def test_modcrop():
    img = np.arange(10 * 7 * 3).reshape(10, 7, 3)
    out = modcrop(img, 4)
    assert out.shape == (8, 4, 3)
    np.testing.assert_array_equal(out, img[:8, :4])  # top-left kept
    assert modcrop(img, 1).shape == img.shape
    assert modcrop(np.zeros((9, 6)), 3).shape == (9, 6)
    with pytest.raises(ValueError, match="smaller than the scale"):
        modcrop(np.zeros((3, 10, 3)), 4)
    with pytest.raises(ValueError, match="positive integer"):
        modcrop(img, 0)
    with pytest.raises(ValueError, match="positive integer"):
        modcrop(img, 2.0)


def test_make_lr_rounds_matlab_downscale_to_uint8():
    hr = np.random.default_rng(2).integers(0, 256, size=(12, 8, 3), dtype=np.uint8)
    lr = make_lr(hr, 4)
    assert lr.dtype == np.uint8 and lr.shape == (3, 2, 3)
    expected = np.clip(np.round(imresize(hr, 0.25)), 0, 255)
    np.testing.assert_array_equal(lr, expected)
    assert make_lr(hr[..., :1], 2).shape == (6, 4, 1)


def test_make_lr_rejects_unprepared_input():
    with pytest.raises(ValueError, match="modcrop"):
        make_lr(np.zeros((10, 8, 3), dtype=np.uint8), 4)
    with pytest.raises(ValueError, match="uint8"):
        make_lr(np.zeros((8, 8, 3)), 4)
    with pytest.raises(ValueError, match="uint8 HxWxC"):
        make_lr(np.zeros((8, 8), dtype=np.uint8), 4)


def test_make_lr_float_matches_make_lr():
    hr = np.random.default_rng(3).integers(0, 256, size=(64, 48, 3), dtype=np.uint8)
    lr = make_lr_float(hr.astype(np.float32) / 255, 4)
    assert lr.dtype == np.float32 and lr.shape == (16, 12, 3)
    np.testing.assert_array_equal(np.round(lr * 255).astype(np.uint8), make_lr(hr, 4))
    with pytest.raises(ValueError, match="float"):
        make_lr_float(hr, 4)
    with pytest.raises(ValueError, match="modcrop"):
        make_lr_float(np.zeros((63, 48, 3)), 4)


def test_upscale_bicubic():
    lr = np.random.default_rng(4).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    sr = upscale_bicubic(lr, 3)
    assert sr.dtype == np.uint8 and sr.shape == (15, 21, 3)
    np.testing.assert_array_equal(sr, np.clip(np.round(imresize(lr, 3)), 0, 255))
    flat = np.full((4, 4, 1), 200, dtype=np.uint8)
    np.testing.assert_array_equal(upscale_bicubic(flat, 2), 200)


@pytest.mark.parametrize(
    "folder, scale, published",
    [("set5", 4, 28.42), ("set14", 4, 26.00), ("set5", 2, 33.66), ("set14", 2, 30.24)],
)
def test_reproduces_published_bicubic_baselines(folder, scale, published, bench_data):
    from PIL import Image

    from clipsr.metrics import psnr

    scores = []
    for path in sorted(bench_data("val", folder).glob("*.png")):
        with Image.open(path) as im:
            arr = np.asarray(im)  # RGB stays RGB; bridge.png (mode L) stays one channel
        hr = modcrop(arr if arr.ndim == 3 else arr[..., None], scale)
        sr = upscale_bicubic(make_lr(hr, scale), scale)
        scores.append(psnr(sr, hr, crop_border=scale, test_y_channel=True))
    assert np.mean(scores) == pytest.approx(published, abs=0.05)
