"""Adaptation's patches: aligned crops of each exemplar's whole-image LR and of its HR."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from clipsr.adapt.shots import ShotSampler, degrade_shots
from clipsr.degrade import make_lr


def _shot(seed: int, h: int = 64, w: int = 96) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _find(needle: np.ndarray, haystack: list[np.ndarray]) -> bool:
    """Is ``needle`` (HxWx3 uint8) a crop of one of the haystack images under some flip/rotation?"""
    for img in haystack:
        for k in range(4):
            for flip in (False, True):
                t = np.rot90(needle, -k)
                t = t[:, ::-1] if flip else t
                h, w = t.shape[:2]
                for y in range(img.shape[0] - h + 1):
                    for x in range(img.shape[1] - w + 1):
                        if np.array_equal(img[y : y + h, x : x + w], t):
                            return True
    return False


def test_patches_are_aligned_crops_of_the_whole_image_lr_and_hr():
    shot = _shot(0)
    lr_whole = make_lr(shot, 4)
    sampler = ShotSampler(degrade_shots([shot], 4, 6), scale=4, lr_patch=6, seed=0)
    lr, hr, idx = sampler.sample(8)
    assert lr.shape == (8, 3, 6, 6) and hr.shape == (8, 3, 24, 24) and idx == [0] * 8
    assert lr.dtype == hr.dtype == torch.float32 and 0 <= float(lr.min()) and float(hr.max()) <= 1
    for i in range(8):
        lr_u8 = (lr[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        hr_u8 = (hr[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        # the LR patch is the degraded whole image's, not a degraded crop's (no border effects) ...
        assert _find(lr_u8, [lr_whole])
        # ... and the HR patch is the same place under the same flip/rotation: degrading it gives
        # the LR patch away from the borders, where a crop's own degradation sees no padding
        assert np.array_equal(make_lr(hr_u8, 4)[2:-2, 2:-2], lr_u8[2:-2, 2:-2])


def test_every_exemplar_is_sampled_with_its_index():
    pairs = degrade_shots([_shot(1, 96, 128), _shot(2, 40, 64)], 2, 12)
    assert [(p.shot, p.hr.shape[:2], p.lr.shape[:2]) for p in pairs] == [
        (0, (96, 128), (48, 64)), (1, (40, 64), (20, 32))]
    assert set(ShotSampler(pairs, scale=2, lr_patch=12, seed=0).sample(64)[2]) == {0, 1}


def test_no_or_too_small_exemplars_are_refused():
    with pytest.raises(ValueError, match="no exemplars"):
        degrade_shots([], 4, 8)
    with pytest.raises(ValueError, match=r"exemplars \[1\] are smaller than one 64px training patch"):
        degrade_shots([_shot(0), _shot(0, 40, 80)], 4, 16)


def test_same_seed_same_batches():
    pairs = degrade_shots([_shot(0)], 4, 6)
    a = ShotSampler(pairs, scale=4, lr_patch=6, seed=3).sample(4)
    b = ShotSampler(pairs, scale=4, lr_patch=6, seed=3).sample(4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_patch_tries_prefer_textured_regions():
    rng = np.random.default_rng(0)
    img = np.full((64, 128, 3), 128, np.uint8)
    img[:, 64:] = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)  # right half textured, left flat

    def textured_share(tries: int) -> float:
        sampler = ShotSampler(degrade_shots([img], 2, 8), scale=2, lr_patch=8, seed=1, tries=tries)
        _, hr, _ = sampler.sample(200)
        return float((hr.std(dim=(1, 2, 3)) > 0.05).float().mean())  # any textured pixels in it

    plain, picky = textured_share(1), textured_share(4)
    assert 0.4 < plain < 0.8 and picky > 0.95
