"""The rows that flow between the Ray Data stages, and how pixel arrays travel in them.

Every stage takes and returns tables of one Arrow schema, WORK (plan fields, then what each stage
adds), so blocks from different stages and failed rows (nulls where nothing was computed) always
concatenate. Stages convert a batch to Python rows (a copy: Ray's batches are read-only) and back.
Pixel arrays travel as ``.npy`` bytes (dtype and shape included) at their integer precision,
never as float32: a 16-bit 1024x1024 RGB output is 6 MB, not 12.
"""
from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

# Written by the planner: one row per input to process.
PLAN = pa.schema([
    ("input_key", pa.string()), ("input_uri", pa.string()), ("output_uri", pa.string()),
    ("output_format", pa.string()), ("input_size", pa.int64()), ("input_etag", pa.string()),
    ("input_mtime_ms", pa.int64()), ("scale", pa.int32()), ("domain", pa.string()),
    ("model_spec", pa.string()), ("model_id", pa.string()), ("model_version", pa.string()),
    ("route_similarity", pa.float64()), ("clip_encoder", pa.string()), ("route_embedding", pa.binary()),
    # output settings (clipsr.enhance.output) and an adapted model's strength; quality is the one
    # asked for until the write stage records the one applied (null: lossless)
    ("outscale", pa.float64()), ("max_long_edge", pa.int32()), ("quality", pa.int32()), ("strength", pa.float64()),
    ("route_runner_up", pa.string()), ("route_margin", pa.float64()), ("route_descriptor", pa.string()),
])

_ADDED = [
    ("status", pa.string()), ("error", pa.string()), ("notes", pa.string()),
    ("input_sha256", pa.string()), ("input_format", pa.string()), ("input_mode", pa.string()),
    ("input_bit_depth", pa.int32()), ("input_width", pa.int32()), ("input_height", pa.int32()),
    ("output_bit_depth", pa.int32()), ("output_width", pa.int32()), ("output_height", pa.int32()),
    ("output_size", pa.int64()), ("clip_cosine", pa.float64()), ("sharpness_bicubic", pa.float64()),
    ("sharpness_output", pa.float64()), ("sharpness_gain", pa.float64()), ("clipping_ratio", pa.float64()),
    ("read_s", pa.float64()), ("decode_s", pa.float64()), ("infer_s", pa.float64()),
    ("encode_s", pa.float64()), ("write_s", pa.float64()),
    ("precision", pa.string()), ("infer_node_id", pa.string()), ("infer_node_ip", pa.string()),
    ("input_lossless", pa.bool_()),  # decides lossless WebP (clipsr.enhance.encoder)
    ("input_jpeg_quality", pa.int32()), ("input_jpeg_quality_source", pa.string()), ("model_ran", pa.string()),
    # payloads, cleared once the output is written
    ("lr", pa.large_binary()), ("alpha", pa.large_binary()), ("sr", pa.large_binary()),
    ("icc_profile", pa.large_binary()), ("exif", pa.large_binary()),
]
WORK = pa.schema(list(PLAN) + [pa.field(name, kind) for name, kind in _ADDED])
PAYLOADS = ("lr", "alpha", "sr", "icc_profile", "exif")


def group_schema(rows: pa.Schema) -> pa.Schema:
    """A group of rows as one row (column ``rows``): see :func:`group`."""
    return pa.schema([("rows", pa.list_(pa.struct(list(rows))))])


def group(table: pa.Table, lengths: list[int]) -> pa.Table:
    """Consecutive rows of ``table`` as one row per group of these lengths.

    Between the stages, rows travel in groups: Ray Data sizes its blocks by bytes, and pays per
    block and per task, so a thumbnail row alone costs more in Ray than its work; a group (the
    rows of one decode task, at most one inference call's) is a block and a task of its own."""
    offsets = [0]
    for length in lengths:
        offsets.append(offsets[-1] + length)
    if offsets[-1] != table.num_rows:
        raise ValueError(f"groups of {offsets[-1]} rows for a table of {table.num_rows}")
    values = table.to_struct_array().combine_chunks() if table.num_rows else pa.array(
        [], type=pa.struct(list(table.schema)))
    lists = pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), values)
    return pa.Table.from_arrays([lists], schema=group_schema(table.schema))


def ungroup(batch: pa.Table, schema: pa.Schema) -> tuple[pa.Table, list[int]]:
    """Group rows back to the rows they hold (of ``schema``), and the groups' lengths."""
    lists = batch.column("rows").combine_chunks()
    lengths = lists.value_lengths().fill_null(0).to_pylist()
    table = pa.Table.from_struct_array(lists.flatten()) if sum(lengths) else schema.empty_table()
    return table.cast(schema), lengths


def per_group(stage: Callable[[pa.Table], pa.Table], batch: pa.Table, schema: pa.Schema = WORK) -> pa.Table:
    """Run a stage (rows of ``schema`` in, the same rows of WORK out, in order) on groups."""
    table, lengths = ungroup(batch, schema)
    return group(stage(table), lengths)


def from_table(table: pa.Table) -> list[dict[str, Any]]:
    """A batch as mutable row dicts, with every WORK column present (plan tables lack the rest)."""
    rows = table.to_pylist()
    for row in rows:
        for name in WORK.names:
            row.setdefault(name, None)
    return rows


def to_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist([{name: row.get(name) for name in WORK.names} for row in rows], schema=WORK)


def pending(row: dict[str, Any]) -> bool:
    """Still on its way to an output (no stage has failed it)."""
    return row["status"] is None


def fail(row: dict[str, Any], reason: str) -> None:
    """Mark a row failed: no output (the manifest's output_uri is null unless ok), payloads freed."""
    row["status"] = "failed"
    row["error"] = reason
    row["output_uri"] = None
    for name in PAYLOADS:
        row[name] = None


def add_note(row: dict[str, Any], note: str) -> None:
    row["notes"] = f"{row['notes']}; {note}" if row["notes"] else note


def pack(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def unpack(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def short_error(exc: BaseException) -> str:
    """``Type: message`` trimmed for a manifest cell."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
