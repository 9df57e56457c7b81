"""Decide, from the listings alone, what happens to every listed key: process, skip or fail.

The input listing, the output listing and the index are streamed into SQLite tables on the
driver's local disk and joined there, so the driver's memory does not grow with the number of
keys (SQLite sorts and joins out of core). One ordered pass then decides each key:

- unsafe keys, keys whose output would land in the job's own state and objects over
  ``--max-input-bytes``: failed, never read;
- hidden files and non-image names: skipped ("not an input");
- image files of a format not decoded here: unsupported, never read;
- two inputs with one output key (``--format`` maps ``a.png`` and ``a.jpg`` to ``a.webp``): the
  first in sorted order (byte order of the key) wins, the later is failed, never an overwrite;
- unchanged inputs: skipped without being read. Unchanged means the index's latest ok row for the
  key has the same size and ETag (mtime where there is no ETag), the same model id, scale and
  output URI, and the output object is still there with the size that run wrote;
- everything else: a plan row, written in parts for the Ray Data pipeline to read.

Skipped, unsupported and failed rows go straight to the manifest from here.
"""
from __future__ import annotations

import io
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from clipsr import storage
from clipsr.enhance import manifest
from clipsr.enhance import rows as R
from clipsr.enhance.layout import RESERVED, RunLayout
from clipsr.enhance.listing import STATUS_BY_KIND, classify_key, output_format

if TYPE_CHECKING:  # routing imports the model factory (torch); plan parts are read in light tasks
    from clipsr.enhance.routing import Route, Router

PLAN_ROWS_PER_PART = 1000
MANIFEST_ROWS_PER_PART = 50_000
_INSERT_BATCH = 10_000


@dataclass
class PlanCounts:
    listed: int = 0
    to_process: int = 0
    statuses: Counter = field(default_factory=Counter)  # failed / skipped / unsupported decided here
    reasons: Counter = field(default_factory=Counter)  # first part of each of their reasons
    models: Counter = field(default_factory=Counter)  # model id -> inputs to process


class PlanSink(Protocol):
    def process(self, row: dict[str, Any]) -> None: ...

    def record(self, row: dict[str, Any]) -> None: ...


class CountingSink:
    """Dry runs: decide everything, write nothing."""

    def process(self, row: dict[str, Any]) -> None:
        pass

    def record(self, row: dict[str, Any]) -> None:
        pass


class StorageSink:
    """Plan rows to ``<output>/_runs/<run>/plan/part-N.parquet``; decided rows to the manifest."""

    def __init__(self, layout: RunLayout, before_write: Callable[[], None] = lambda: None) -> None:
        self.layout = layout
        self.before_write = before_write  # raises to stop: the run lock's check
        self.plan_parts: list[str] = []
        self._plan: list[dict[str, Any]] = []
        self._decided: list[dict[str, Any]] = []

    def process(self, row: dict[str, Any]) -> None:
        self._plan.append(row)
        if len(self._plan) >= PLAN_ROWS_PER_PART:
            self._flush_plan()

    def record(self, row: dict[str, Any]) -> None:
        self._decided.append(row)
        if len(self._decided) >= MANIFEST_ROWS_PER_PART:
            self._flush_decided()

    def _flush_plan(self) -> None:
        if not self._plan:
            return
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(self._plan, schema=R.PLAN), buf)
        self.before_write()
        uri = f"{self.layout.plan}/part-{len(self.plan_parts):06d}.parquet"
        storage.write_bytes_atomic(uri, buf.getvalue())
        self.plan_parts.append(uri)
        self._plan = []

    def _flush_decided(self) -> None:
        if self._decided:
            self.before_write()
            manifest.write_part(self._decided, self.layout.manifest_run())
            self._decided = []

    def close(self) -> list[str]:
        self._flush_plan()
        self._flush_decided()
        return self.plan_parts


def read_plan_parts(batch: pa.Table) -> pa.Table:
    """Ray Data task UDF: plan part URIs in (column ``part``), their plan rows out."""
    tables = [pq.read_table(io.BytesIO(storage.read_bytes(uri))) for uri in batch.column("part").to_pylist()]
    return pa.concat_tables(tables).cast(R.PLAN)


def create_tables(db: sqlite3.Connection) -> None:
    db.execute("CREATE TABLE listing (key TEXT PRIMARY KEY, uri TEXT, size INTEGER, etag TEXT, "
               "mtime_ms INTEGER, kind TEXT, reason TEXT, out_key TEXT)")
    db.execute("CREATE TABLE outputs (key TEXT PRIMARY KEY, size INTEGER)")


def _printable(text: str) -> str:
    """Keys that are not valid UTF-8 (local file names) with their bad bytes escaped."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _mtime_ms(mtime: float | None) -> int | None:
    return None if mtime is None else round(mtime * 1000)


def _batched(items: Iterable[tuple], size: int = _INSERT_BATCH) -> Iterator[list[tuple]]:
    batch: list[tuple] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def load_listing(db: sqlite3.Connection, objects: Iterable[storage.ObjectInfo], fmt: str | None,
                 max_input_bytes: int | None = None) -> int:
    """Stream the input listing into ``listing`` with each key's classification; returns the count."""
    def rows() -> Iterator[tuple]:
        for info in objects:
            decision = classify_key(info.key, fmt, info.size, max_input_bytes)
            yield (_printable(info.key), _printable(info.uri), info.size, info.etag, _mtime_ms(info.mtime),
                   decision.kind, decision.reason, decision.output_key)

    count = 0
    for batch in _batched(rows()):
        db.executemany("INSERT OR IGNORE INTO listing VALUES (?, ?, ?, ?, ?, ?, ?, ?)", batch)
        count += len(batch)
    db.execute("CREATE INDEX listing_out ON listing (out_key, key)")
    return count


def load_outputs(db: sqlite3.Connection, objects: Iterable[storage.ObjectInfo]) -> int:
    """Stream the output listing (images only, not the job's own state) into ``outputs``."""
    def rows() -> Iterator[tuple]:
        for info in objects:
            if info.key.split("/", 1)[0] not in RESERVED and storage.is_image_key(info.key):
                yield (_printable(info.key), info.size)

    count = 0
    for batch in _batched(rows()):
        db.executemany("INSERT OR IGNORE INTO outputs VALUES (?, ?)", batch)
        count += len(batch)
    return count


def _route_columns(route: Route) -> dict[str, Any]:
    return {"domain": route.domain, "model_id": route.model.id, "model_version": route.model.version,
            "route_similarity": route.similarity, "clip_encoder": route.model.clip_encoder}


def _unchanged(size, etag, mtime_ms, route: Route, scale: int, output_uri: str, idx: tuple, out_size) -> bool:
    i_size, i_etag, i_mtime, i_model, i_scale, i_output, i_output_size, i_run = idx
    if i_run is None or out_size is None or out_size != i_output_size:
        return False
    same_content = (etag == i_etag) if etag and i_etag else (mtime_ms is not None and mtime_ms == i_mtime)
    return (same_content and size == i_size and i_model == route.model.id and i_scale == scale
            and i_output == output_uri)


def decide(db: sqlite3.Connection, layout: RunLayout, router: Router, scale: int, fmt: str | None,
           sink: PlanSink) -> PlanCounts:
    """One ordered pass over the joined tables; every listed key goes to ``sink`` exactly once."""
    counts = PlanCounts()
    cursor = db.execute(
        "SELECT l.key, l.uri, l.size, l.etag, l.mtime_ms, l.kind, l.reason, l.out_key, "
        "i.size, i.etag, i.mtime_ms, i.model_id, i.scale, i.output_uri, i.output_size, i.run_id, o.size "
        "FROM listing l LEFT JOIN idx i ON i.key = l.key LEFT JOIN outputs o ON o.key = l.out_key "
        "ORDER BY l.out_key, l.key")
    winner: tuple[str, str] | None = None  # (output key, input key) of the last candidate
    for key, uri, size, etag, mtime_ms, kind, reason, out_key, *rest in cursor:
        idx, out_size = tuple(rest[:8]), rest[8]
        counts.listed += 1
        base = {"run_id": layout.run_id, "input_key": key, "input_uri": uri, "input_size": size,
                "input_etag": etag, "input_mtime": mtime_ms, "scale": scale}
        if kind != "candidate":
            status = STATUS_BY_KIND[kind]
            _record(sink, counts, {**base, "status": status, "error": reason})
            continue
        route = router.route(key)
        output_uri = layout.output_uri(out_key)
        if winner is not None and winner[0] == out_key:
            _record(sink, counts, {**base, **_route_columns(route), "status": "failed",
                                   "error": f"output key collision: {out_key!r} is already the output of "
                                            f"{winner[1]!r}, which comes first in sorted order; not overwritten"})
            continue
        winner = (out_key, key)
        if _unchanged(size, etag, mtime_ms, route, scale, output_uri, idx, out_size):
            what = "ETag" if etag and idx[1] else "mtime"
            _record(sink, counts, {**base, **_route_columns(route), "status": "skipped",
                                   "previous_run_id": idx[7],
                                   "error": f"unchanged since run {idx[7]}: same size, {what}, model and output"})
            continue
        counts.to_process += 1
        counts.models[route.model.id] += 1
        sink.process({"input_key": key, "input_uri": uri, "output_uri": output_uri,
                      "output_format": output_format(out_key, fmt), "input_size": size, "input_etag": etag,
                      "input_mtime_ms": mtime_ms, "scale": scale, "model_spec": route.model.spec,
                      **_route_columns(route)})
    return counts


def _record(sink: PlanSink, counts: PlanCounts, row: dict[str, Any]) -> None:
    counts.statuses[row["status"]] += 1
    counts.reasons[f"{row['status']}: {row['error'].split(':', 1)[0]}"] += 1
    sink.record(row)
