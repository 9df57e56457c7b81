"""Tiled inference: bounded memory without visible seams."""
import pytest
import torch

from clipsr.factory import create_model
from clipsr.tiling import tile_starts, tiled_apply


def test_tile_starts_cover_everything_with_the_overlap():
    for length, tile, overlap in [(100, 32, 8), (33, 32, 8), (32, 32, 8), (10, 32, 8), (257, 64, 16)]:
        starts = tile_starts(length, tile, overlap)
        covered = set()
        for s in starts:
            covered |= set(range(s, min(s + tile, length)))
        assert covered == set(range(length))
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))
    with pytest.raises(ValueError, match="larger than overlap"):
        tile_starts(100, 8, 8)
    assert tile_starts(8, 8, 16) == [0]  # one tile needs no overlap


def test_tiled_result_matches_untiled_for_a_real_network():
    torch.manual_seed(0)
    model = create_model("cdasr-tiny", 2).eval()
    # a smooth but non-trivial image, as natural images are
    yy, xx = torch.meshgrid(torch.linspace(0, 6, 70), torch.linspace(0, 9, 90), indexing="ij")
    img = torch.stack([torch.sin(yy) * 0.4 + 0.5, torch.cos(xx) * 0.4 + 0.5, (yy + xx) / 15]).unsqueeze(0)
    with torch.no_grad():
        whole = model(img)
        tiled = tiled_apply(model, img, scale=2, tile=32, overlap=16, batch=3)
        seamless = tiled_apply(model, img, scale=2, tile=32, overlap=0, batch=3)
    assert tiled.shape == whole.shape
    # channel attention pools over each tile, so equality is approximate: far below one 8-bit level
    assert (tiled - whole).abs().max() < 0.1 / 255
    # without overlap the seams are visible: the test can tell the difference
    assert (seamless - whole).abs().max() > 1 / 255


def test_identity_upscaler_reassembles_exactly():
    img = torch.rand(1, 3, 45, 61)

    def nearest(t):
        return torch.nn.functional.interpolate(t, scale_factor=3, mode="nearest")

    out = tiled_apply(nearest, img, scale=3, tile=16, overlap=4)
    torch.testing.assert_close(out, nearest(img))


def test_tiled_apply_takes_one_image():
    with pytest.raises(ValueError, match="one image"):
        tiled_apply(lambda t: t, torch.rand(2, 3, 8, 8), scale=1, tile=4, overlap=1)
