"""Stage 1: read an input's bytes and decode them, or record why not.

Three bounds keep one odd input from taking its worker down with it:

- bytes: the plan refuses objects over ``--max-input-bytes`` from the listing, without reading
  them; here a read stops one byte past the limit, so an object that grew since it was listed is
  refused too, never held whole;
- pixels: an input whose output would exceed ``--max-output-pixels`` (the model's own output, or
  the ``--outscale`` one where that is larger: clipsr.enhance.resize) is refused from its header,
  read first with one ranged GET of ``HEADER_BYTES`` (the rest is fetched only if the header
  passes, or does not fit in those bytes), so a 24-megapixel photo at x4 (384 megapixels out) is a
  failed row with the reason, never an out-of-memory worker;
- the decoder: it runs in a child process (:mod:`clipsr.enhance.isolate`) whose memory is capped
  at ``decoder_memory_bytes``; a decoder that crashes or runs out of memory there is a failed row
  ("decoder crashed: ..."), and the task, its worker and the run go on.
"""
from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import pyarrow as pa

from clipsr import imaging, storage
from clipsr.jpeg import blind_quality, read_quality
from clipsr.enhance import rows as R
from clipsr.enhance.encoder import lossless_input
from clipsr.enhance.isolate import ChildDied, Isolated
from clipsr.enhance.options import DEFAULT_MAX_INPUT_BYTES
from clipsr.enhance.quality import bicubic_sharpness
from clipsr.enhance.resize import limit_factor, output_size

#: The first read of every input: enough for the header of every format but TIFFs whose directory
#: follows the pixels and JPEGs with more metadata than this before their frame header (those are
#: read whole, within --max-input-bytes, and their pixels checked then, still before decoding).
HEADER_BYTES = 64 * 1024
#: Address space of the decoder process: what the interpreter and its libraries map (about 300 MB
#: measured, 1 GiB allowed), twice the input's bytes (as sent, as received), and per pixel what
#: was measured with margin: decoding and its copies about 70 bytes an input pixel, the bicubic
#: reference of the quality figures about 40 bytes an output pixel.
DECODER_BASE_BYTES = 1 << 30
DECODER_BYTES_PER_INPUT_PIXEL = 80
DECODER_BYTES_PER_OUTPUT_PIXEL = 48

_decoders: dict[int, Isolated] = {}


def input_pixel_limit(max_output_pixels: int, scale: float) -> int:
    """The most input pixels an image may have so that its output (``scale`` times its sides) stays
    within the limit."""
    return min(imaging.DEFAULT_MAX_PIXELS, math.floor(max_output_pixels / (scale * scale)))


def decoder_memory_bytes(max_input_bytes: int, max_output_pixels: int, scale: float) -> int:
    """The decoder process's cap: any input within the limits fits under it."""
    return (DECODER_BASE_BYTES + 2 * max_input_bytes + DECODER_BYTES_PER_OUTPUT_PIXEL * max_output_pixels
            + DECODER_BYTES_PER_INPUT_PIXEL * input_pixel_limit(max_output_pixels, scale))


def _decoder(memory_bytes: int) -> Isolated:
    """This worker's decoder process for a cap (one per run in practice), started on first use."""
    if memory_bytes not in _decoders:
        _decoders[memory_bytes] = Isolated(memory_bytes)
    return _decoders[memory_bytes]


def decode_pixels(data: bytes, max_pixels: int, scale: int, outscale: float | None = None,
                  max_long_edge: int | None = None) -> dict[str, Any]:
    """Runs in the decoder process: the row's decoded columns (pixels packed at their precision)."""
    decoded = imaging.decode(data, max_pixels=max_pixels)
    size = output_size(decoded.height, decoded.width, scale, outscale, max_long_edge)
    quantise = imaging.to_uint16 if decoded.bit_depth == 16 else imaging.to_uint8
    quality, source = read_quality(data), "tables"
    if quality is None and decoded.bit_depth == 8:
        quality, source = blind_quality(decoded.pixels), "blind"
    return {"input_format": decoded.format, "input_mode": decoded.mode, "input_bit_depth": decoded.bit_depth,
            "input_width": decoded.width, "input_height": decoded.height,
            "icc_profile": decoded.icc_profile, "exif": decoded.exif, "notes": decoded.notes,
            "lr": R.pack(quantise(decoded.pixels)),
            "alpha": None if decoded.alpha is None else R.pack(quantise(decoded.alpha)),
            "sharpness_bicubic": bicubic_sharpness(decoded.pixels, size),
            "input_lossless": lossless_input(data, decoded.format),
            "input_jpeg_quality": quality, "input_jpeg_quality_source": None if quality is None else source}


def _too_many_pixels(reason: str, scale: float, max_output_pixels: int) -> str:
    if reason.startswith("too many pixels:"):
        return f"output too large: x{scale:g} would exceed --max-output-pixels={max_output_pixels:,} ({reason})"
    return reason


def read_decode(row: dict[str, Any], max_output_pixels: int, max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES,
                decoder: Isolated | None = None) -> None:
    """Fill a plan row with the decoded input (or fail it); mutates ``row``."""
    scale = limit_factor(int(row["scale"]), row["outscale"])
    max_pixels = input_pixel_limit(max_output_pixels, scale)
    start = time.perf_counter()
    try:
        data = storage.read_range(row["input_uri"], 0, HEADER_BYTES)
        if len(data) == HEADER_BYTES:  # more to come: check the header before fetching it
            header = imaging.header_size(data)
            if header is not None:
                fmt, width, height = header
                try:
                    imaging.check_pixels(width, height, max_pixels)
                except imaging.ImageDecodeError as e:
                    R.fail(row, f"{_too_many_pixels(str(e), scale, max_output_pixels)}; "
                                f"{imaging.format_name(fmt)} header read, the rest not fetched")
                    return
            data += storage.read_range(row["input_uri"], HEADER_BYTES, max_input_bytes + 1)
    except FileNotFoundError:
        R.fail(row, "input not found: deleted since it was listed")
        return
    if len(data) > max_input_bytes:
        R.fail(row, f"input too large: more than --max-input-bytes={max_input_bytes:,} when read "
                    f"({row['input_size']:,} listed); not read further")
        return
    row["read_s"] = time.perf_counter() - start
    row["input_sha256"] = storage.content_hash(data)
    if len(data) != row["input_size"]:
        R.add_note(row, f"size changed since listing ({row['input_size']} listed, {len(data)} read)")
    decoder = decoder or _decoder(decoder_memory_bytes(max_input_bytes, max_output_pixels, scale))
    start = time.perf_counter()
    try:
        decoded = decoder.call(decode_pixels, data, max_pixels, int(row["scale"]), row["outscale"],
                               row["max_long_edge"])
    except imaging.ImageDecodeError as e:
        R.fail(row, _too_many_pixels(str(e), scale, max_output_pixels))
        return
    except ChildDied as e:
        R.fail(row, f"decoder crashed: the decoder process {e} while decoding this input ({len(data):,} bytes)")
        return
    except MemoryError:
        R.fail(row, f"decoder out of memory: needs more than its {decoder.memory_bytes:,} bytes "
                    f"(from --max-input-bytes and --max-output-pixels)")
        return
    del data
    for note in decoded.pop("notes"):
        R.add_note(row, note)
    row.update(decoded)
    row["decode_s"] = time.perf_counter() - start


def to_float(values: np.ndarray) -> np.ndarray:
    """Integer samples back to float32 [0, 1] (exact for 8 and 16 bits)."""
    return values.astype(np.float32) / np.float32(np.iinfo(values.dtype).max)


def decode_batch(batch: pa.Table, max_output_pixels: int, max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES
                 ) -> pa.Table:
    """Ray Data task UDF: a plan batch in, the same rows decoded (or failed) out."""
    rows = R.from_table(batch)
    for row in rows:
        try:
            read_decode(row, max_output_pixels, max_input_bytes)
        except Exception as e:  # noqa: BLE001  one bad input must not fail the dataset
            R.fail(row, f"read/decode failed: {R.short_error(e)}")
    return R.to_table(rows)


def decode_groups(batch: pa.Table, max_output_pixels: int, max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES
                  ) -> pa.Table:
    """Ray Data task UDF: groups of plan rows in, the same groups decoded (or failed) out."""
    return R.per_group(lambda table: decode_batch(table, max_output_pixels, max_input_bytes), batch, R.PLAN)
