"""How compressed an input is: a JPEG's quality from its quantisation tables, or a blind estimate.

An archive usually knows its own degradation exactly: a JPEG file carries the quantisation tables
its encoder used, and for the IJG/libjpeg family (most cameras, scanners, PIL, ImageMagick,
browsers) those tables are the standard ones scaled by the quality setting. Matching the file's
tables against the ones this machine's libjpeg writes at each quality 1..100 gives the quality
with no pixel work; a non-IJG encoder gets the nearest IJG quality, which is what "how lossy" needs.

Inputs that are not JPEG files but went through JPEG once (re-encoded to PNG, screenshots of old
scans) show the 8x8 grid as steps at block boundaries; :func:`blind_quality` turns the strength of
that grid into a coarse quality bucket.
"""
from __future__ import annotations

import functools
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = ["JpegQuality", "quality_from_tables", "read_quality", "blind_quality", "blockiness"]


@dataclass(frozen=True)
class JpegQuality:
    """An input's JPEG quality and where it came from: ``tables`` (exact, from the file) or
    ``blind`` (estimated from the 8x8 grid of a decoded image)."""

    quality: int
    source: str


@functools.lru_cache(maxsize=1)
def _reference_tables() -> np.ndarray:
    """[100, 2, 64] luminance and chrominance tables this libjpeg writes at quality 1..100."""
    out = np.zeros((100, 2, 64), dtype=np.float64)
    img = Image.new("RGB", (16, 16), (128, 96, 64))
    for q in range(1, 101):
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=q)
        tables = Image.open(buf).quantization
        out[q - 1, 0] = tables[0]
        out[q - 1, 1] = tables.get(1, tables[0])
    return out


def quality_from_tables(tables: dict[int, list[int]]) -> int:
    """The IJG quality (1..100) whose tables are nearest to ``tables`` (PIL's ``quantization``).

    Greyscale files have only the luminance table; it alone decides then.
    """
    if 0 not in tables or len(tables[0]) != 64:
        raise ValueError("a JPEG luminance quantisation table has 64 entries")
    ref = _reference_tables()
    lum = np.asarray(tables[0], dtype=np.float64)
    cost = np.abs(np.log(ref[:, 0]) - np.log(np.maximum(lum, 1))).sum(axis=1)
    if 1 in tables and len(tables[1]) == 64:
        chroma = np.asarray(tables[1], dtype=np.float64)
        cost += np.abs(np.log(ref[:, 1]) - np.log(np.maximum(chroma, 1))).sum(axis=1)
    return int(np.argmin(cost)) + 1


def read_quality(data: bytes) -> int | None:
    """The quality of a JPEG file from its header, None when ``data`` is not a JPEG file.

    Only the header is parsed (PIL reads the tables when it opens the file), so the first 64 KiB
    of a large file are enough.
    """
    if not data.startswith(b"\xff\xd8"):
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:
            tables = getattr(im, "quantization", None)
    except (OSError, ValueError, SyntaxError):
        return None
    if not tables:
        return None
    return quality_from_tables(tables)


def blockiness(image: np.ndarray) -> float:
    """How much stronger the luma steps are on the 8x8 grid than beside it (1.0: no grid).

    Columns and rows separately, each at the grid offset where its ratio is largest (a crop may
    have moved the grid); the smaller of the two, since a JPEG grid shows in both directions and
    an image's own edges rarely line up with a period of 8 in both.
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 3:
        img = img[..., :3] @ np.array([0.299, 0.587, 0.114]) if img.shape[2] >= 3 else img[..., 0]
    y = img
    if min(y.shape) < 32:
        return 1.0
    dx = np.abs(np.diff(y, axis=1)).mean(axis=0)  # step between column i and i+1
    dy = np.abs(np.diff(y, axis=0)).mean(axis=1)
    return min(_grid_ratio(dx), _grid_ratio(dy))


def _grid_ratio(steps: np.ndarray) -> float:
    """Largest ratio, over the 8 grid offsets, of the mean step on the grid to the mean step
    two pixels away from it (inside the blocks)."""
    best = 1.0
    for off in range(8):
        on = steps[off::8]
        near = np.concatenate([steps[(off + 2) % 8::8], steps[(off + 6) % 8::8]])
        if len(on) and near.mean() > 1e-6:
            best = max(best, float(on.mean() / near.mean()))
    return best


# Thresholds on blockiness from `clipsr bench jpeg` (docs/benchmarks.md): x4 protocol downscales of
# BSD68 and Sun-Hays80, JPEG-encoded at several qualities. Clean downscales stay under 1.15 for 9 in
# 10 images, so only clear grids count; above q=85 the grid hides in the image's own detail.
_BLIND_STEPS: tuple[tuple[float, int], ...] = ((1.35, 50), (1.22, 75))


def blind_quality(image: np.ndarray) -> int | None:
    """A coarse quality bucket (50 or 75) for a decoded image showing a JPEG grid, else None."""
    b = blockiness(image)
    for threshold, quality in _BLIND_STEPS:
        if b >= threshold:
            return quality
    return None
