"""Training data: HR images listed from URIs, sharded across workers, sampled as LR/HR patch pairs.

LR patches are made on the fly with the evaluation protocol's degradation (MATLAB bicubic,
rounded to 8 bit), so the model trains on exactly the input distribution it is scored on; a
configured archive degradation (``data.degradation``: JPEG, noise) can follow it.
Each worker keeps its shard of decoded HR images in memory: pretraining sets are thousands of
images, not the archive's millions.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from clipsr import imaging, storage
from clipsr.degrade import make_lr_float
from clipsr.degradations import Degradation

log = logging.getLogger(__name__)


@dataclass
class TrainImage:
    uri: str
    domain: int
    pixels: np.ndarray  # uint8 HxWx3


def list_training_images(roots: list[str]) -> list[tuple[str, int]]:
    """(uri, folder index) for every image under the given roots, in sorted order per root."""
    out: list[tuple[str, int]] = []
    for i, root in enumerate(roots):
        out.extend((uri, i) for uri in storage.list_images(root))
    return out


def load_shard(
    items: list[tuple[str, int]], rank: int, world: int, min_side: int, max_pixels: int
) -> list[TrainImage]:
    """Decode this worker's shard (every world-th image); unreadable or too small images are skipped."""
    images = []
    for uri, domain in items[rank::world]:
        try:
            hr = imaging.load_rgb_or_grey_uint8(storage.read_bytes(uri), max_pixels=max_pixels)
        except (imaging.ImageDecodeError, OSError) as e:
            log.warning("skipping training image %s: %s", uri, e)
            continue
        if min(hr.shape[:2]) < min_side:
            log.warning("skipping training image %s: smaller than a patch (%s)", uri, hr.shape[:2])
            continue
        images.append(TrainImage(uri, domain, imaging.to_rgb(hr)))
    if not images:
        raise ValueError(f"worker {rank}/{world} has no usable training images")
    return images


def augment(patches: tuple[np.ndarray, ...], rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """One random flip/90-degree rotation (of the 8 dihedral transforms), the same for every patch
    given (an LR patch and its HR patch stay aligned)."""
    flip_x, flip_y, turns = rng.random() < 0.5, rng.random() < 0.5, int(rng.integers(4))

    def one(patch: np.ndarray) -> np.ndarray:
        if flip_x:
            patch = patch[:, ::-1]
        if flip_y:
            patch = patch[::-1]
        return np.rot90(patch, k=turns)

    return tuple(one(p) for p in patches)


class PatchSampler:
    """Batches of (LR, HR, image index) patches from a list of HR images."""

    def __init__(self, images: list[TrainImage], scale: int, lr_patch: int, seed: int,
                 degradation: Degradation | None = None) -> None:
        self.images = images
        self.scale = scale
        self.lr_patch = lr_patch
        self.rng = np.random.default_rng(seed)
        self.degradation = None if degradation is None or degradation.is_clean else degradation

    def _patch(self, img: TrainImage) -> tuple[np.ndarray, np.ndarray]:
        hp = self.lr_patch * self.scale
        h, w = img.pixels.shape[:2]
        y, x = int(self.rng.integers(h - hp + 1)), int(self.rng.integers(w - hp + 1))
        (hr,) = augment((img.pixels[y : y + hp, x : x + hp],), self.rng)
        hr = hr.astype(np.float32) / 255.0
        lr = make_lr_float(hr, self.scale)
        if self.degradation is not None:
            lr8 = self.degradation.apply(np.round(lr * 255.0).astype(np.uint8), self.rng)
            lr = lr8.astype(np.float32) / 255.0
        return lr, hr

    def sample(self, batch: int, pool: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """A batch from all images, or only from the image indices in ``pool`` (one pseudo-domain)."""
        choices = pool if pool is not None else range(len(self.images))
        idx = [int(i) for i in self.rng.choice(list(choices), size=batch)]
        lrs, hrs = zip(*(self._patch(self.images[i]) for i in idx))
        to_t = lambda a: torch.from_numpy(np.ascontiguousarray(np.stack(a).transpose(0, 3, 1, 2)))  # noqa: E731
        return to_t(lrs), to_t(hrs), idx
