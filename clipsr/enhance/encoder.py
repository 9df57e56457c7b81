"""Encoder settings of an output: ``--quality`` for the lossy formats, lossless WebP for lossless inputs.

JPEG is written at ``--quality`` (default 95, 4:4:4 chroma). A WebP output is lossless when its
input was stored losslessly (PNG, BMP, GIF, a lossless WebP, a TIFF not compressed as JPEG): lossy
compression would throw away some of the detail the model just made, where the input had lost
none; a WebP of a lossy input (JPEG, lossy WebP...) is written at ``--quality``. PNG and TIFF are
always lossless. The manifest's ``quality`` column holds the quality a lossy encoder was given,
and is null for lossless outputs.
"""
from __future__ import annotations

import io

from PIL import Image

DEFAULT_QUALITY = 95
LOSSY_FORMATS = frozenset({"JPEG", "WEBP"})
_LOSSLESS_FORMATS = frozenset({"PNG", "BMP", "GIF"})
_JPEG_IN_TIFF = frozenset({"jpeg", "tiff_jpeg"})


def check_quality(quality: int) -> None:
    if not 1 <= quality <= 100:
        raise ValueError(f"--quality must be from 1 to 100, got {quality}")


def lossless_input(data: bytes, fmt: str) -> bool:
    """Whether an input of decoded format ``fmt`` (imaging's names) was stored without loss."""
    if fmt in _LOSSLESS_FORMATS:
        return True
    if fmt == "WEBP":
        return _webp_lossless(data)
    if fmt == "TIFF":
        try:
            with Image.open(io.BytesIO(data)) as im:  # reads the first directory, not the pixels
                return im.info.get("compression") not in _JPEG_IN_TIFF
        except Exception:  # noqa: BLE001  TIFFs only tifffile reads (BigTIFF, floats): not JPEG-coded
            return True
    return False


def _webp_lossless(data: bytes) -> bool:
    """The first image chunk of a WebP is VP8L (lossless) rather than VP8 (lossy); an extended
    file's chunks, and an animation's first frame, are walked to find it."""
    pos, end = 12, len(data)
    while pos + 8 <= end:
        kind, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        if kind in (b"VP8L", b"VP8 "):
            return kind == b"VP8L"
        if kind == b"ANMF":  # frame header (16 bytes), then the frame's own chunks
            pos += 8 + 16
            continue
        pos += 8 + size + (size & 1)
    return False


def encoder_settings(output_format: str, quality: int, input_lossless: bool | None) -> tuple[int | None, bool]:
    """(quality given to a lossy encoder, or None; whether a WebP is lossless) for one output."""
    fmt = output_format.upper()
    if fmt == "WEBP" and input_lossless:
        return None, True
    return (quality if fmt in LOSSY_FORMATS else None), False
