"""The incremental index: the latest state of every key that has one worth keeping, so a nightly
run can decide from the listing alone, without reading years of manifests: an ok row lets it skip
an unchanged input, a permanently failed row (clipsr.enhance.failures) lets it carry the failure
forward without reading the input again. Transient failures are not kept: those inputs are retried.

Stored under ``<output>/_index/``: ``index.json`` names the current generation's Parquet parts
(one row per key, sorted by key) and the runs that started since it was written
(``in_progress``). A run registers itself there when it starts and writes a new generation when
it ends, folding in its own rows and those of every earlier run that never finished (killed, or
failed before the end): their manifest parts hold an ok row only for outputs already committed, so
a rerun skips exactly the finished images. A failed row keeps the output its key had before, so
that output stays the key's (plan.py refuses it to other inputs). Generations are written whole,
then ``index.json`` is replaced atomically, then old generations are removed. Runs are serialised
by the lock.

Fenced: every write of ``index.json`` is conditional on the version this run itself wrote last
(S3 ``If-Match``, created with ``If-None-Match``). A run that lost its lock finds that another run
has registered since, and its commit raises :class:`IndexFencedError` having deleted only its own
new parts. Only generations older than the committing run's are removed: a run that takes over a
lock starts later, so a stale run can never delete the parts a newer ``index.json`` names.

Held on the driver in SQLite on local disk (the ``idx`` table), never as a Python dict: memory
stays flat at millions of keys.

Version 2 added the ``status`` and ``error`` columns (failed rows); version 1 indexes (ok rows
only) are read as such, and rewritten by the next run. Version 3 added the output settings
(``outscale``, ``max_long_edge``, ``quality``: clipsr.enhance.output); rows of earlier versions
read them as null, the defaults they were made with; and ``route_descriptor``, the
encoder of ``route_embedding``: an embedding without one (written before) is never routed on, its
input is embedded again by its next ``--route auto`` run.
"""
from __future__ import annotations

import io
import json
import logging
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from clipsr import storage
from clipsr.enhance import manifest
from clipsr.enhance.failures import is_permanent

log = logging.getLogger(__name__)

INDEX_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
ROWS_PER_PART = 1_000_000
SCHEMA = pa.schema([
    ("key", pa.string()), ("size", pa.int64()), ("etag", pa.string()), ("mtime_ms", pa.int64()),
    ("model_id", pa.string()), ("model_version", pa.string()), ("domain", pa.string()),
    ("scale", pa.int32()), ("output_uri", pa.string()), ("output_size", pa.int64()), ("run_id", pa.string()),
    ("route_embedding", pa.binary()),  # --route auto: routes the input again without reading it
    ("outscale", pa.float64()), ("max_long_edge", pa.int32()), ("quality", pa.int32()),  # version 3
    ("status", pa.string()), ("error", pa.string()),  # version 2: "ok", "failed" with the permanent reason, or "unsupported"
    ("route_descriptor", pa.string()),  # version 3: the encoder of route_embedding
])
_COLUMNS = SCHEMA.names
_MANIFEST_COLUMNS = ["input_key", "input_size", "input_etag", "input_mtime", "model_id", "model_version", "domain",
                     "scale", "output_uri", "output_size", "run_id", "route_embedding", "outscale",
                     "max_long_edge", "quality", "status", "error", "route_descriptor"]  # in _COLUMNS' order
_STATUS, _ERROR = _MANIFEST_COLUMNS.index("status"), _MANIFEST_COLUMNS.index("error")


class IndexFencedError(RuntimeError):
    """``index.json`` is no longer the version this run wrote: another run has taken over."""


@dataclass
class IndexMeta:
    generation: str | None = None  # run id that wrote the current parts
    parts: list[str] = field(default_factory=list)  # relative to the index folder
    rows: int = 0
    in_progress: list[dict[str, str]] = field(default_factory=list)  # {"run_id", "manifest"}

    def to_json(self) -> bytes:
        return json.dumps({"version": INDEX_VERSION, "generation": self.generation, "parts": self.parts,
                           "rows": self.rows, "in_progress": self.in_progress}, indent=1).encode()


def create_table(db: sqlite3.Connection) -> None:
    db.execute("CREATE TABLE idx (key TEXT PRIMARY KEY, size INTEGER, etag TEXT, mtime_ms INTEGER, "
               "model_id TEXT, model_version TEXT, domain TEXT, scale INTEGER, output_uri TEXT, "
               "output_size INTEGER, run_id TEXT, route_embedding BLOB, outscale REAL, max_long_edge INTEGER, "
               "quality INTEGER, status TEXT, error TEXT, route_descriptor TEXT)")
    # plan.decide looks up who produced an output: by output URI, out of core at millions of keys
    db.execute("CREATE INDEX idx_output ON idx (output_uri)")


_KEPT_WHEN_NULL = ("output_uri", "output_size")  # a failed row has none; its key's earlier output stays its
_UPSERT = (f"INSERT INTO idx ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))}) "
           "ON CONFLICT(key) DO UPDATE SET "
           + ", ".join(f"{c} = coalesce(excluded.{c}, idx.{c})" if c in _KEPT_WHEN_NULL else f"{c} = excluded.{c}"
                       for c in _COLUMNS[1:])
           + " WHERE excluded.run_id >= idx.run_id")


def upsert(db: sqlite3.Connection, rows: Iterable[tuple]) -> None:
    """Insert or replace index rows (tuples in SCHEMA's order); an older run's row never replaces a
    newer one's, and a failed row keeps the output its key had."""
    db.executemany(_UPSERT, rows)


class IndexStore:
    """The index of one output prefix."""

    def __init__(self, index_uri: str) -> None:
        self.uri = index_uri
        self.meta_uri = f"{index_uri}/index.json"
        self._token: str | None = None  # version of index.json this store last wrote

    def read_meta(self) -> IndexMeta:
        return self._read()[0]

    def _read(self) -> tuple[IndexMeta, str | None]:
        try:
            data, token = storage.read_bytes_with_etag(self.meta_uri)
        except FileNotFoundError:
            return IndexMeta(), None
        doc = json.loads(data)
        if doc.get("version") not in READABLE_VERSIONS:
            raise ValueError(f"{self.meta_uri}: unsupported index version {doc.get('version')!r}")
        return IndexMeta(doc["generation"], list(doc["parts"]), int(doc["rows"]), list(doc["in_progress"])), token

    def _swap(self, meta: IndexMeta, token: str | None) -> bool:
        """Write ``meta`` only if index.json is still at ``token`` (absent if None); remembers the new version."""
        data = meta.to_json()
        if token is None:
            written = storage.write_bytes_if_absent(self.meta_uri, data)
        else:
            written = storage.write_bytes_if_match(self.meta_uri, data, token)
        if not written:
            return False
        current = storage.read_bytes_with_etag(self.meta_uri)  # S3 assigns the new ETag
        if current[0] != data:
            return False
        self._token = current[1]
        return True

    def load(self, db: sqlite3.Connection, meta: IndexMeta) -> int:
        """Load the current generation into ``idx``; returns the number of rows."""
        count = 0
        for part in meta.parts:
            table = pq.read_table(io.BytesIO(storage.read_bytes(f"{self.uri}/{part}")))
            if "status" not in table.column_names:  # version 1: ok rows only
                table = table.append_column("status", pa.array(["ok"] * table.num_rows, pa.string()))
            table = _with_columns(table, SCHEMA)
            for batch in table.to_batches(max_chunksize=50_000):
                rows = list(zip(*(batch.column(c).to_pylist() for c in _COLUMNS)))
                upsert(db, rows)
                count += len(rows)
        return count

    def begin(self, run_id: str, manifest_uri: str) -> list[dict[str, str]]:
        """Register a starting run; returns the earlier runs that never finished."""
        meta, token = self._read()
        unfinished = [r for r in meta.in_progress if r["run_id"] != run_id]
        meta.in_progress = unfinished + [{"run_id": run_id, "manifest": manifest_uri}]
        if not self._swap(meta, token):
            raise IndexFencedError(f"{self.meta_uri} changed while run {run_id} registered in it: another run is "
                                   "writing this output prefix; nothing was written, rerun when it has finished")
        return unfinished

    def commit(self, db: sqlite3.Connection, run_id: str, merged: Iterable[str]) -> IndexMeta:
        """Write ``idx`` as a new generation and drop ``merged`` runs from in_progress.

        Fenced by :meth:`begin`: raises IndexFencedError, leaving the index as another run made
        it, if index.json changed since this store last wrote it."""
        old, token = self._read()
        if self._token is None:
            raise RuntimeError(f"run {run_id} commits to {self.meta_uri} without having registered (begin)")
        if token != self._token:
            raise self._fenced(run_id)
        merged = set(merged)
        meta = IndexMeta(generation=run_id, in_progress=[r for r in old.in_progress if r["run_id"] not in merged])
        cursor = db.execute(f"SELECT {', '.join(_COLUMNS)} FROM idx ORDER BY key")
        while True:
            rows = cursor.fetchmany(ROWS_PER_PART)
            if not rows:
                break
            table = pa.Table.from_pylist([dict(zip(_COLUMNS, r)) for r in rows], schema=SCHEMA)
            buf = io.BytesIO()
            pq.write_table(table, buf, compression="zstd")
            part = f"gen={run_id}/part-{len(meta.parts):05d}.parquet"
            storage.write_bytes_atomic(f"{self.uri}/{part}", buf.getvalue())
            meta.parts.append(part)
            meta.rows += len(rows)
        if not self._swap(meta, token):
            self._remove_generations(lambda gen: gen == run_id)
            raise self._fenced(run_id)
        self._remove_generations(lambda gen: gen < run_id)
        return meta

    def _fenced(self, run_id: str) -> IndexFencedError:
        return IndexFencedError(f"{self.meta_uri} was changed by another run after run {run_id} registered "
                                "(it lost its lock): the index was left as that run wrote it")

    def _remove_generations(self, which: Callable[[str], bool]) -> None:
        """Delete the parts of the generations (run ids) ``which`` selects."""
        for info in storage.iter_objects(self.uri):
            folder = info.key.split("/", 1)[0]
            if folder.startswith("gen=") and which(folder[len("gen="):]):
                storage.delete(info.uri)


def kept(status: str, error: str | None, carried_forward: bool | None) -> bool:
    """Whether the index keeps a manifest row: ok, or failed for a permanent reason (or unsupported)
    in the run that first found it (a carried-forward row repeats an earlier run's, which the index
    already holds)."""
    if carried_forward:
        return False
    return status in ("ok", "unsupported") or (status == "failed" and is_permanent(error))


def manifest_index_rows(run_uri: str) -> Iterable[list[tuple]]:
    """A run's rows that the index keeps, as index rows, one list per manifest part."""
    for part in manifest.iter_parts(run_uri):
        table = _with_columns(manifest.read_part(part), manifest.arrow_schema())  # older parts lack columns
        cols: dict[str, Any] = {c: table.column(c).to_pylist() for c in _MANIFEST_COLUMNS}
        cols["input_mtime"] = table.column("input_mtime").cast(pa.int64()).to_pylist()
        carried = table.column("carried_forward").to_pylist()
        rows = [row for row, c in zip(zip(*cols.values()), carried) if kept(row[_STATUS], row[_ERROR], c)]
        if rows:
            yield rows


def _with_columns(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Parts written before a column existed read with that column null."""
    for f in schema:
        if f.name not in table.column_names:
            table = table.append_column(f, pa.nulls(table.num_rows, f.type))
    return table


def merge_run(db: sqlite3.Connection, run_uri: str) -> int:
    """Fold one run's kept rows (:func:`kept`) into ``idx``; returns how many."""
    count = 0
    for rows in manifest_index_rows(run_uri):
        upsert(db, rows)
        count += len(rows)
    return count
