"""Stage 3: encode an upscaled image in its output format and commit it, whole or not at all.

The model's output is first resized to the output size where ``--outscale`` or
``--max-long-edge`` ask for another (clipsr.enhance.resize), here rather than in the inference
actors, which stay on the network; the encoder settings come from clipsr.enhance.encoder.
Alpha is upscaled here, separately, with bicubic (the model enhances colour only). ICC profiles
and EXIF (already without its orientation tag: the pixels are upright) are kept where the format
has room; EXIF that cannot be kept is noted on the row. The object is written under its final,
deterministic name by an atomic write, so a rerun overwrites instead of duplicating; its manifest
row is written later, by the next stage, so an ok row never points at an output that is not there.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa

from clipsr import imaging, storage
from clipsr.degrade import imresize
from clipsr.enhance import rows as R
from clipsr.enhance.decode import to_float
from clipsr.enhance.encoder import DEFAULT_QUALITY, encoder_settings
from clipsr.enhance.quality import output_figures
from clipsr.enhance.resize import resize, row_output_size


def encode_write(row: dict[str, Any]) -> None:
    """Encode ``row['sr']``, write it to ``row['output_uri']`` and mark the row ok; mutates ``row``."""
    start = time.perf_counter()
    values = R.unpack(row["sr"])
    values = resize(values, row_output_size(row, int(row["input_height"]), int(row["input_width"])))
    fmt, depth = row["output_format"], int(row["output_bit_depth"])
    quality, lossless = encoder_settings(fmt, int(row["quality"] or DEFAULT_QUALITY), row["input_lossless"])
    alpha = None
    if row["alpha"] is not None:
        if fmt in imaging.ALPHA_FORMATS:
            lr_alpha = to_float(R.unpack(row["alpha"]))
            alpha = imresize(lr_alpha[..., None].astype(np.float64), output_shape=(values.shape[0], values.shape[1]))
            alpha = np.clip(alpha[..., 0], 0.0, 1.0).astype(np.float32)
        else:
            R.add_note(row, f"alpha composited onto white ({fmt} has no alpha)")
    if row["exif"] and fmt not in imaging.EXIF_FORMATS:
        R.add_note(row, f"EXIF dropped ({fmt} has no place for it)")
    if int(row["input_bit_depth"]) == 16 and depth == 8:
        R.add_note(row, f"16-bit input written as 8-bit ({fmt} holds 8 bits)")
    data = imaging.encode(to_float(values), alpha, fmt, bit_depth=depth, icc_profile=row["icc_profile"],
                          exif=row["exif"], quality=quality or DEFAULT_QUALITY, lossless=lossless)
    row["encode_s"] = time.perf_counter() - start
    start = time.perf_counter()
    storage.write_bytes_atomic(row["output_uri"], data)
    row["write_s"] = time.perf_counter() - start
    row.update(output_figures(values, row["sharpness_bicubic"]))
    row.update(status="ok", output_size=len(data), output_height=values.shape[0], output_width=values.shape[1],
               quality=quality)
    for name in R.PAYLOADS:
        row[name] = None


def write_batch(batch: pa.Table) -> pa.Table:
    """Ray Data task UDF: upscaled rows in, written (or failed) rows without payloads out."""
    rows = R.from_table(batch)
    for row in rows:
        if R.pending(row):
            try:
                encode_write(row)
            except Exception as e:  # noqa: BLE001  one bad output must not fail the dataset
                R.fail(row, f"encode/write failed: {R.short_error(e)}")
        if row["status"] != "ok":
            row["quality"] = None  # the manifest records the quality of outputs written
    return R.to_table(rows)


def write_groups(batch: pa.Table) -> pa.Table:
    """Ray Data task UDF: groups of upscaled rows in, the same groups written (or failed) out."""
    return R.per_group(write_batch, batch)
