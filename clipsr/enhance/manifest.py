"""The manifest: columns, Parquet parts, and reading them back.

The published JSON Schema (schemas/manifest.schema.json) is the single source of the columns: the
Arrow schema below is built from its ``x-arrow`` types, so the Parquet written and the schema
published cannot drift apart. Parts are named by a hash of the input keys they hold: a retried
task rewrites the same part instead of adding a second copy of its rows.
"""
from __future__ import annotations

import base64
import datetime as dt
import hashlib
import io
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import lru_cache
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from clipsr import storage
from clipsr.config import load_schema
from clipsr.enhance import rows as R

STATUSES = ("ok", "failed", "skipped", "unsupported")
_ARROW_TYPES = {
    "string": pa.string(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float64": pa.float64(),
    "bool": pa.bool_(),
    "timestamp[ms, tz=UTC]": pa.timestamp("ms", tz="UTC"),
    "binary": pa.binary(),
}


@lru_cache(maxsize=1)
def arrow_schema() -> pa.Schema:
    """The manifest's Arrow schema, in the published column order, with its version as metadata."""
    doc = load_schema("manifest")
    fields = []
    for name in doc["required"]:
        prop = doc["properties"][name]
        kinds = prop.get("type", "string")
        nullable = "null" in kinds if isinstance(kinds, list) else False
        fields.append(pa.field(name, _ARROW_TYPES[prop["x-arrow"]], nullable=nullable))
    return pa.schema(fields, metadata={"clipsr.manifest.version": str(doc["x-manifest-version"])})


def columns() -> list[str]:
    return arrow_schema().names


@lru_cache(maxsize=1)
def _defaults() -> dict[str, Any]:
    """Values of the columns the published schema gives a default, for rows that leave them out."""
    return {name: prop["default"] for name, prop in load_schema("manifest")["properties"].items() if "default" in prop}


def part_name(keys: Iterable[str]) -> str:
    """``part-<16 hex>.parquet`` from the sorted input keys: same rows, same name."""
    digest = hashlib.sha256()
    for key in sorted(keys):
        digest.update(key.encode("utf-8", "surrogateescape") + b"\0")
    return f"part-{digest.hexdigest()[:16]}.parquet"


def to_table(rows: list[Mapping[str, Any]]) -> pa.Table:
    """Manifest rows (dicts with the manifest's columns; missing or None: null, or the schema's
    default) as a table of the published schema."""
    schema, defaults = arrow_schema(), _defaults()
    return pa.Table.from_pylist([{name: defaults.get(name) if row.get(name) is None else row.get(name)
                                  for name in schema.names} for row in rows], schema=schema)


def write_part(rows: list[Mapping[str, Any]], run_uri: str) -> str:
    """Write rows as one Parquet part under ``<manifest>/run=<id>/``; returns its URI."""
    if not rows:
        raise ValueError("a manifest part needs at least one row")
    table = to_table(rows)
    _check_rows(table)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    uri = f"{run_uri}/{part_name(str(row['input_key']) for row in rows)}"
    storage.write_bytes_atomic(uri, buf.getvalue())
    return uri


def _check_rows(table: pa.Table) -> None:
    """The invariants other tools rely on, checked before a part is committed."""
    status = table.column("status").to_pylist()
    output = table.column("output_uri").to_pylist()
    error = table.column("error").to_pylist()
    for s, o, e in zip(status, output, error):
        if s not in STATUSES or (s == "ok") != (o is not None) or (s != "ok") != (e is not None):
            raise ValueError(f"manifest row breaks the contract: status={s!r} output_uri={o!r} error={e!r}")


def iter_parts(run_uri: str) -> Iterator[str]:
    """URIs of a run's manifest parts (none when the run folder does not exist)."""
    try:
        for info in storage.iter_objects(run_uri):
            if info.key.endswith(".parquet") and "/" not in info.key:
                yield info.uri
    except FileNotFoundError:
        return


def read_part(uri: str, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(io.BytesIO(storage.read_bytes(uri)), columns=columns)


def count_statuses(run_uri: str) -> Counter:
    """Rows per status in a run's manifest (reads the status column only)."""
    counts: Counter = Counter()
    for uri in iter_parts(run_uri):
        counts.update(read_part(uri, ["status"]).column("status").to_pylist())
    return counts


def json_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A Parquet row as the JSON document the published schema describes (timestamps as ISO text,
    binary as base64)."""
    def view(v: Any) -> Any:
        if isinstance(v, dt.datetime):
            return v.isoformat()
        return base64.b64encode(v).decode() if isinstance(v, bytes) else v

    return {k: view(v) for k, v in row.items()}


def finish_row(row: dict[str, Any], run_id: str) -> dict[str, Any]:
    """A pipeline row as a manifest row of ``run_id``."""
    if R.pending(row):  # every stage sets a status or passes the row on; never expected
        R.fail(row, "internal error: row reached the manifest without a result")
    row["run_id"] = run_id
    row["input_mtime"] = row["input_mtime_ms"]
    return row


class ManifestWriter:
    """The driver's end of the pipeline: rows arrive as their outputs are committed and are
    written as parts of the run's manifest every ``every_rows`` rows or ``every_s`` seconds,
    whichever comes first, so a killed run loses at most the rows of that window.

    ``fence`` is called before every part is written and raises when this run may no longer write
    (it lost its lock): no row of a fenced-out run reaches the manifest after that.
    """

    def __init__(self, run_id: str, run_uri: str, fence: Callable[[], None] = lambda: None,
                 every_rows: int = 1000, every_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if every_rows < 1 or every_s < 0:
            raise ValueError(f"manifest parts need every_rows >= 1 and every_s >= 0, got {every_rows}, {every_s}")
        self.run_id, self.run_uri, self.fence = run_id, run_uri, fence
        self.every_rows, self.every_s, self.clock = every_rows, every_s, clock
        self.parts: list[str] = []
        self._rows: list[dict[str, Any]] = []
        self._last = clock()

    def add(self, batch: pa.Table) -> Counter:
        """Take a batch of pipeline rows; returns its rows per status."""
        rows = [finish_row(row, self.run_id) for row in R.from_table(batch)]
        for row in rows:
            for name in R.PAYLOADS:
                row[name] = None
        self._rows += rows
        if len(self._rows) >= self.every_rows or self.clock() - self._last >= self.every_s:
            self.flush()
        return Counter(row["status"] for row in rows)

    def flush(self) -> None:
        self._last = self.clock()
        if not self._rows:
            return
        self.fence()
        self.parts.append(write_part(self._rows, self.run_uri))
        self._rows = []

    def close(self) -> list[str]:
        self.flush()
        return self.parts
