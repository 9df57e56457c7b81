"""Stage 1: read an input's bytes and decode them, or record why not.

The pixel limit comes from ``--max-output-pixels``: an input whose output would exceed it is
refused from its header, before any pixel is decoded, so a 24-megapixel photo at x4 (384
megapixels out) is a failed row with the reason, never an out-of-memory worker.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa

from clipsr import imaging, storage
from clipsr.enhance import rows as R
from clipsr.enhance.quality import bicubic_sharpness


def input_pixel_limit(max_output_pixels: int, scale: int) -> int:
    """The most input pixels an image may have so that its output stays within the limit."""
    return min(imaging.DEFAULT_MAX_PIXELS, max_output_pixels // (scale * scale))


def read_decode(row: dict[str, Any], max_output_pixels: int) -> None:
    """Fill a plan row with the decoded input (or fail it); mutates ``row``."""
    start = time.perf_counter()
    try:
        data = storage.read_bytes(row["input_uri"])
    except FileNotFoundError:
        R.fail(row, "input not found: deleted since it was listed")
        return
    row["read_s"] = time.perf_counter() - start
    row["input_sha256"] = storage.content_hash(data)
    if len(data) != row["input_size"]:
        R.add_note(row, f"size changed since listing ({row['input_size']} listed, {len(data)} read)")
    scale = int(row["scale"])
    start = time.perf_counter()
    try:
        decoded = imaging.decode(data, max_pixels=input_pixel_limit(max_output_pixels, scale))
    except imaging.ImageDecodeError as e:
        reason = str(e)
        if reason.startswith("too many pixels:"):
            reason = (f"output too large: x{scale} would exceed --max-output-pixels={max_output_pixels:,} "
                      f"({reason})")
        R.fail(row, reason)
        return
    del data
    row.update(input_format=decoded.format, input_mode=decoded.mode, input_bit_depth=decoded.bit_depth,
               input_width=decoded.width, input_height=decoded.height,
               icc_profile=decoded.icc_profile, exif=decoded.exif)
    for note in decoded.notes:
        R.add_note(row, note)
    quantise = imaging.to_uint16 if decoded.bit_depth == 16 else imaging.to_uint8
    row["lr"] = R.pack(quantise(decoded.pixels))
    row["alpha"] = None if decoded.alpha is None else R.pack(quantise(decoded.alpha))
    row["sharpness_bicubic"] = bicubic_sharpness(decoded.pixels, scale)
    row["decode_s"] = time.perf_counter() - start


def to_float(values: np.ndarray) -> np.ndarray:
    """Integer samples back to float32 [0, 1] (exact for 8 and 16 bits)."""
    return values.astype(np.float32) / np.float32(np.iinfo(values.dtype).max)


def decode_batch(batch: pa.Table, max_output_pixels: int) -> pa.Table:
    """Ray Data task UDF: a plan batch in, the same rows decoded (or failed) out."""
    rows = R.from_table(batch)
    for row in rows:
        try:
            read_decode(row, max_output_pixels)
        except Exception as e:  # noqa: BLE001  one bad input must not fail the dataset
            R.fail(row, f"read/decode failed: {R.short_error(e)}")
    return R.to_table(rows)
