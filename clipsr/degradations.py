"""What an archive did to its low-resolution images after the protocol's bicubic: JPEG, noise.

One spec serves training (pretraining synthesises such LR, adaptation degrades a domain's
exemplars the way its archive is degraded) and evaluation (``clipsr evaluate --jpeg Q``). Noise is
added before the JPEG, in the order a camera or scanner pipeline does it.
"""
from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from PIL import Image

__all__ = ["Degradation", "jpeg_roundtrip"]


def jpeg_roundtrip(image: np.ndarray, quality: int) -> np.ndarray:
    """``image`` (uint8 HxWx3 or HxW) encoded as a baseline JPEG at ``quality`` and decoded again."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=int(quality))
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        return np.asarray(im.convert("RGB" if image.ndim == 3 else "L"))


@dataclass(frozen=True)
class Degradation:
    """JPEG at a quality drawn from ``jpeg`` (inclusive range) with probability ``jpeg_prob``;
    Gaussian noise of a sigma (8-bit levels) drawn from ``noise`` with probability ``noise_prob``."""

    jpeg: tuple[int, int] | None = None
    jpeg_prob: float = 1.0
    noise: tuple[float, float] | None = None
    noise_prob: float = 0.0

    def __post_init__(self) -> None:
        if self.jpeg is not None and not (1 <= self.jpeg[0] <= self.jpeg[1] <= 100):
            raise ValueError(f"JPEG quality range must lie in 1..100, low to high, got {self.jpeg}")
        if self.noise is not None and not (0 <= self.noise[0] <= self.noise[1]):
            raise ValueError(f"noise sigma range must be >= 0, low to high, got {self.noise}")
        for p in (self.jpeg_prob, self.noise_prob):
            if not 0 <= p <= 1:
                raise ValueError(f"probabilities lie in [0, 1], got {p}")

    @classmethod
    def parse(cls, text: str) -> "Degradation":
        """``clean``, ``jpeg:75`` or ``jpeg:40-95`` (the command-line form)."""
        text = text.strip().lower()
        if text == "clean":
            return cls()
        m = re.fullmatch(r"jpeg:(\d{1,3})(?:-(\d{1,3}))?", text)
        if not m:
            raise ValueError(f"expected 'clean', 'jpeg:Q' or 'jpeg:Q1-Q2' (Q in 1..100), got {text!r}")
        low = int(m.group(1))
        return cls(jpeg=(low, int(m.group(2) or low)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "Degradation":
        data = dict(data or {})
        to_pair = lambda v: None if v is None else (tuple(v) if isinstance(v, (list, tuple)) else (v, v))  # noqa: E731
        return cls(jpeg=to_pair(data.get("jpeg")), jpeg_prob=float(data.get("jpeg_prob", 1.0)),
                   noise=to_pair(data.get("noise")), noise_prob=float(data.get("noise_prob", 0.0)))

    def to_dict(self) -> dict[str, Any]:
        return {"jpeg": None if self.jpeg is None else list(self.jpeg), "jpeg_prob": self.jpeg_prob,
                "noise": None if self.noise is None else list(self.noise), "noise_prob": self.noise_prob}

    @property
    def is_clean(self) -> bool:
        return (self.jpeg is None or self.jpeg_prob == 0) and (self.noise is None or self.noise_prob == 0)

    @property
    def label(self) -> str:
        """Short text for reports and lineage: ``clean``, ``jpeg:75``, ``jpeg:30-95 p0.9+noise:0-3``."""
        if self.is_clean:
            return "clean"
        parts = []
        if self.jpeg is not None and self.jpeg_prob > 0:
            q = f"{self.jpeg[0]}" if self.jpeg[0] == self.jpeg[1] else f"{self.jpeg[0]}-{self.jpeg[1]}"
            parts.append(f"jpeg:{q}" + ("" if self.jpeg_prob == 1 else f" p{self.jpeg_prob:g}"))
        if self.noise is not None and self.noise_prob > 0:
            parts.append(f"noise:{self.noise[0]:g}-{self.noise[1]:g} p{self.noise_prob:g}")
        return "+".join(parts)

    def apply(self, lr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The degraded copy of a uint8 LR image (the input itself when nothing is drawn)."""
        if self.noise is not None and self.noise_prob > 0 and rng.random() < self.noise_prob:
            sigma = rng.uniform(*self.noise)
            lr = np.clip(np.round(lr + rng.normal(0.0, sigma, lr.shape)), 0, 255).astype(np.uint8)
        if self.jpeg is not None and self.jpeg_prob > 0 and rng.random() < self.jpeg_prob:
            lr = jpeg_roundtrip(lr, int(rng.integers(self.jpeg[0], self.jpeg[1] + 1)))
        return lr
