"""Decide, from the listings alone, what happens to every listed key: process, skip or fail.

The input listing, the output listing and the index are streamed into SQLite tables on the
driver's local disk and joined there, so the driver's memory does not grow with the number of
keys (SQLite sorts and joins out of core). One ordered pass then decides each key:

- inputs that an earlier run failed for a permanent reason (clipsr.enhance.failures) or found in
  a format not decoded here, with the same size, ETag (mtime where there is no ETag) and scale:
  the same status again without being read, ``carried_forward`` with the earlier run's reason,
  unless ``--retry-failed``;
- unsafe keys, keys whose output would land in the job's own state and objects over
  ``--max-input-bytes``: failed, never read;
- hidden files and non-image names: skipped ("not an input");
- image files of a format not decoded here: unsupported, never read;
- an output key that belongs to another input is failed, never an overwrite. It belongs to the
  input whose index row names it (an earlier run made it from that input) while that input still
  maps to it or the output object is still there. Otherwise, when two inputs map to one output
  key (``--format`` maps ``a.png`` and ``a.jpg`` to ``a.webp``), the first in sorted order (byte
  order of the key) wins;
- unchanged inputs: skipped without being read. Unchanged means the index's latest ok row for the
  key has the same size and ETag (mtime), the same model id, scale, output settings
  (clipsr.enhance.output) and output URI, and the output object is still there with the size that
  run wrote. Under ``--route auto`` the model is the one the input's stored embedding routes to
  now, so a registry change redoes only the inputs whose domain or domain version changed;
- everything else: a plan row, written in parts for the Ray Data pipeline to read.

Skipped, unsupported and failed rows go straight to the manifest from here.
"""
from __future__ import annotations

import io
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from clipsr import storage
from clipsr.enhance import manifest
from clipsr.enhance import rows as R
from clipsr.enhance.layout import RESERVED, RunLayout
from clipsr.enhance.listing import STATUS_BY_KIND, classify_key, output_format
from clipsr.enhance.output import OutputSettings

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
    carried: int = 0  # of the failed and unsupported: carried forward from an earlier run (not attempted)
    reasons: Counter = field(default_factory=Counter)  # first part of each of their reasons
    models: Counter = field(default_factory=Counter)  # model id -> inputs to process
    #: (earlier model id, model id now) -> inputs to process only because their model changed
    model_changed: Counter = field(default_factory=Counter)


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


#: Input bytes one decode task takes at most (a single larger input is a group of its own): a
#: thumbnail's task decodes many inputs, so Ray's cost per task and per block is paid once for
#: them, while a photograph's task decodes it alone, beside the others.
GROUP_BYTES = 1 << 20


def group_rows(sizes: list[int | None], max_rows: int, max_bytes: int = GROUP_BYTES) -> list[tuple[int, int]]:
    """Consecutive ``(start, stop)`` slices of rows with these input sizes, each of at most
    ``max_rows`` rows and ``max_bytes`` bytes, or of one row that is larger on its own."""
    groups: list[tuple[int, int]] = []
    start = total = 0
    for i, size in enumerate(sizes):
        if i > start and (i - start >= max_rows or total + (size or 0) > max_bytes):
            groups.append((start, i))
            start, total = i, 0
        total += size or 0
    if len(sizes) > start:
        groups.append((start, len(sizes)))
    return groups


def read_plan_parts(batch: pa.Table, max_rows: int, max_bytes: int = GROUP_BYTES) -> pa.Table:
    """Ray Data task UDF: plan part URIs in (column ``part``), their plan rows out in decode groups
    (:func:`group_rows`), one row each (``rows.group``)."""
    tables = [pq.read_table(io.BytesIO(storage.read_bytes(uri))) for uri in batch.column("part").to_pylist()]
    rows = pa.concat_tables(tables).cast(R.PLAN)
    bounds = group_rows(rows.column("input_size").to_pylist(), max_rows, max_bytes)
    return R.group(rows, [stop - start for start, stop in bounds])


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
            "route_similarity": route.similarity, "route_runner_up": route.runner_up, "route_margin": route.margin,
            "route_descriptor": route.descriptor, "clip_encoder": route.model.clip_encoder,
            "strength": route.model.strength}


class _Prior(NamedTuple):
    """The index row of a listed key (all None when it has none)."""
    status: str | None
    error: str | None
    size: int | None
    etag: str | None
    mtime_ms: int | None
    model_id: str | None
    scale: int | None
    output_uri: str | None
    output_size: int | None
    run_id: str | None
    route_embedding: bytes | None
    outscale: float | None
    max_long_edge: int | None
    quality: int | None
    route_descriptor: str | None


def _same_content(size, etag, mtime_ms, prior: _Prior) -> bool:
    """Same size and ETag as the index row; without ETags on either side, same mtime."""
    same = (etag == prior.etag) if etag and prior.etag else (mtime_ms is not None and mtime_ms == prior.mtime_ms)
    return same and size == prior.size


def _unchanged_but_model(size, etag, mtime_ms, scale: int, output_uri: str, prior: _Prior, out_size,
                         settings: OutputSettings, fmt: str) -> bool:
    """The index's ok row still describes this input and its output, whatever model made it."""
    if prior.status != "ok" or out_size is None or out_size != prior.output_size:
        return False
    return (_same_content(size, etag, mtime_ms, prior)
            and prior.scale == scale and prior.output_uri == output_uri
            and settings.unchanged(prior.outscale, prior.max_long_edge, prior.quality, fmt))


def _failed_before(size, etag, mtime_ms, scale: int, prior: _Prior) -> bool:
    """An earlier run failed this key with these very bytes, at this scale, for a permanent reason
    (or found it in a format not decoded here)."""
    return (prior.status in ("failed", "unsupported") and prior.scale == scale
            and _same_content(size, etag, mtime_ms, prior))


def _carried_forward(prior: _Prior) -> dict[str, Any]:
    return {"status": prior.status, "carried_forward": True, "previous_run_id": prior.run_id,
            "error": f"carried forward from run {prior.run_id}: {prior.error}"}


def decide(db: sqlite3.Connection, layout: RunLayout, router: Router, scale: int, fmt: str | None,
           sink: PlanSink, retry_failed: bool = False, settings: OutputSettings = OutputSettings()) -> PlanCounts:
    """One ordered pass over the joined tables; every listed key goes to ``sink`` exactly once.

    Within an output key, the input that produced the output in an earlier run (``w``, its owner)
    comes first, then the others in sorted order."""
    db.create_function("output_uri", 1, lambda key: None if key is None else layout.output_uri(key),
                       deterministic=True)
    cursor = db.execute(
        "SELECT l.key, l.uri, l.size, l.etag, l.mtime_ms, l.kind, l.reason, l.out_key, l.out_uri, "
        "i.status, i.error, i.size, i.etag, i.mtime_ms, i.model_id, i.scale, i.output_uri, i.output_size, i.run_id, "
        "i.route_embedding, i.outscale, i.max_long_edge, i.quality, i.route_descriptor, o.size, w.key, w.run_id "
        "FROM (SELECT *, output_uri(out_key) AS out_uri FROM listing) l "
        "LEFT JOIN idx i ON i.key = l.key LEFT JOIN outputs o ON o.key = l.out_key "
        "LEFT JOIN idx w ON w.key = (SELECT x.key FROM idx x WHERE x.output_uri = l.out_uri "
        "ORDER BY x.run_id DESC LIMIT 1) "
        "ORDER BY l.out_key, l.key IS NOT w.key, l.key")
    counts = PlanCounts()
    winner: tuple[str, str, str] | None = None  # (output key, input key, why it won) of the last candidate
    reroute = getattr(router, "reroute", None)  # --route auto: a stored embedding routes on the driver
    for key, uri, size, etag, mtime_ms, kind, reason, out_key, output_uri, *rest in cursor:
        prior, (out_size, owner, owner_run) = _Prior(*rest[:15]), rest[15:]
        counts.listed += 1
        base = {"run_id": layout.run_id, "input_key": key, "input_uri": uri, "input_size": size,
                "input_etag": etag, "input_mtime": mtime_ms, "scale": scale,
                "outscale": settings.outscale, "max_long_edge": settings.max_long_edge}
        carried = not retry_failed and _failed_before(size, etag, mtime_ms, scale, prior)
        if kind != "candidate":
            if carried:
                _record(sink, counts, {**base, **_carried_forward(prior)})
                continue
            status = STATUS_BY_KIND[kind]
            _record(sink, counts, {**base, "status": status, "error": reason})
            continue
        embedding, route = prior.route_embedding, None
        if reroute is not None and embedding is not None and _same_content(size, etag, mtime_ms, prior):
            route = reroute(embedding, prior.route_descriptor)  # None: made by another descriptor
        if route is None:
            route, embedding = router.route(key), None
        if winner is not None and winner[0] == out_key:
            _record(sink, counts, {**base, **_route_columns(route), "status": "failed",
                                   "error": f"output key collision: {out_key!r} is already the output of "
                                            f"{winner[1]!r}, {winner[2]}; not overwritten"})
            continue
        if owner not in (None, key) and out_size is not None:
            _record(sink, counts, {**base, **_route_columns(route), "status": "failed",
                                   "error": f"output key collision: {out_key!r} is already the output of "
                                            f"{owner!r} from an earlier run (recorded in run {owner_run}); "
                                            "not overwritten"})
            continue
        winner = (out_key, key, f"from an earlier run (recorded in run {owner_run})" if owner == key
                  else "which comes first in sorted order")
        if carried:
            _record(sink, counts, {**base, **_route_columns(route), **_carried_forward(prior)})
            continue
        out_format = output_format(out_key, fmt)
        unchanged_but_model = _unchanged_but_model(size, etag, mtime_ms, scale, output_uri, prior, out_size, settings,
                                                   out_format)
        if unchanged_but_model and prior.model_id == route.model.id:
            what = "ETag" if etag and prior.etag else "mtime"
            _record(sink, counts, {**base, **_route_columns(route), "status": "skipped",
                                   "previous_run_id": prior.run_id,
                                   "error": f"unchanged since run {prior.run_id}: same size, {what}, model and output"})
            continue
        counts.to_process += 1
        counts.models[route.model.id] += 1
        chosen_later = reroute is not None and embedding is None  # --route auto's chooser picks in the pipeline
        if unchanged_but_model and not chosen_later and prior.model_id is not None:
            counts.model_changed[(prior.model_id, route.model.id)] += 1  # redone only for its model
        sink.process({"input_key": key, "input_uri": uri, "output_uri": output_uri,
                      "output_format": out_format, "input_size": size, "input_etag": etag,
                      "input_mtime_ms": mtime_ms, "scale": scale, "model_spec": route.model.spec,
                      "route_embedding": embedding, **_route_columns(route), **settings.columns()})
    return counts


def _record(sink: PlanSink, counts: PlanCounts, row: dict[str, Any]) -> None:
    counts.statuses[row["status"]] += 1
    if row.get("carried_forward"):
        counts.carried += 1
        head = "carried forward"
    else:
        head = row["error"].split(":", 1)[0]
    counts.reasons[f"{row['status']}: {head}"] += 1
    sink.record(row)
