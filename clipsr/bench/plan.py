"""What the driver costs at archive scale: planning a nightly over N keys, and the index it keeps.

A synthetic listing of N keys (three in four unchanged since an indexed earlier run, the rest new
or changed) goes through the planner exactly as `clipsr enhance` runs it: the listing, the output
listing and the index streamed into SQLite on local disk, one ordered pass deciding every key,
skipped rows written as manifest parts and the work list as plan parts, then the index committed
as a new generation. No image is read: this is the driver's share of a nightly, which does not
grow with the cluster. Peak memory is the process's peak resident set (Linux ``ru_maxrss``), so
run this in a fresh process. The manifest's bytes per row are measured on the written parts.
"""
from __future__ import annotations

import resource
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from clipsr import storage
from clipsr.bench.inference import environment
from clipsr.enhance import index as idx
from clipsr.enhance import manifest, plan
from clipsr.enhance.layout import RunLayout
from clipsr.enhance.routing import ModelRef, SingleModelRouter

MODEL = ModelRef(spec="default", id="cdasr-lite-x4-000000000000", scale=4)
EARLIER_RUN = "20261101T000000Z-000000"


def _key(i: int) -> str:
    return f"scans/{i % 997:03d}/{i // 997:05d}/page-{i:08d}.jpg"


def _listing(keys: int, root: str) -> Iterator[storage.ObjectInfo]:
    for i in range(keys):
        changed = i % 4 == 3  # one in four new or changed since the indexed run
        yield storage.ObjectInfo(uri=f"{root}/{_key(i)}", key=_key(i), size=200_000 + i % 5000,
                                 etag=f"{i:032x}" if not changed else f"{i + 1:032x}", mtime=1.7e9)


def _outputs(keys: int, root: str) -> Iterator[storage.ObjectInfo]:
    for i in range(keys):
        yield storage.ObjectInfo(uri=f"{root}/{_key(i)}", key=_key(i), size=3_000_000, etag=None, mtime=1.7e9)


def _index_rows(keys: int, out_root: str) -> Iterator[list[tuple]]:
    batch = []
    for i in range(keys):
        batch.append((_key(i), 200_000 + i % 5000, f"{i:032x}", 1_700_000_000_000, MODEL.id, None, "default", 4,
                      f"{out_root}/{_key(i)}", 3_000_000, EARLIER_RUN, None, None, None, None, "ok", None, None))
        if len(batch) == 50_000:
            yield batch
            batch = []
    if batch:
        yield batch


def _peak_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def _folder_bytes(uri: str) -> int:
    return sum(info.size for info in storage.iter_objects(uri))


def _ok_row_bytes(folder: str, rows: int = 20_000) -> float:
    """Bytes per row of a manifest part of enhanced rows with every figure filled in."""
    rng = np.random.default_rng(0)
    now = 1_764_000_000_000
    part = [{"run_id": "20261129T000000Z-000001", "input_uri": f"s3://archive/in/{_key(i)}",
             "output_uri": f"s3://archive/out/{_key(i)}", "status": "ok", "input_key": _key(i),
             "input_size": int(rng.integers(1e5, 1e6)), "input_etag": f"{rng.integers(2**62):032x}",
             "input_mtime": now, "input_sha256": f"sha256:{rng.integers(2**62):064x}", "input_format": "JPEG",
             "input_mode": "RGB", "input_bit_depth": 8, "input_width": 640, "input_height": 480,
             "output_format": "JPEG", "output_bit_depth": 8, "output_width": 2560, "output_height": 1920,
             "output_size": int(rng.integers(1e6, 3e6)), "scale": 4, "domain": "default", "model_id": MODEL.id,
             "sharpness_bicubic": float(rng.random()), "sharpness_output": float(rng.random()),
             "sharpness_gain": float(rng.random()), "clipping_ratio": float(rng.random() / 100),
             "read_s": float(rng.random()), "decode_s": float(rng.random()), "infer_s": float(rng.random()),
             "encode_s": float(rng.random()), "write_s": float(rng.random()), "precision": "bf16",
             "infer_node_id": f"{rng.integers(2**62):056x}", "infer_node_ip": "10.0.3.17"} for i in range(rows)]
    manifest.write_part(part, folder)
    return round(_folder_bytes(folder) / rows, 1)


def run(keys: int, workdir: str | None = None) -> dict[str, Any]:
    """Plan ``keys`` synthetic keys against an index of all of them; returns times, memory, sizes."""
    phases: dict[str, float] = {}
    before = _rss_mb()  # the imports (torch among them, as in the enhance driver)
    with tempfile.TemporaryDirectory(prefix="clipsr-bench-plan-", dir=workdir) as tmp:
        layout = RunLayout.create("s3://archive/in", str(Path(tmp, "out")), None, "20261129T000000Z-000001")
        db = sqlite3.connect(str(Path(tmp, "plan.sqlite")))
        plan.create_tables(db)
        idx.create_table(db)
        start = time.perf_counter()
        for rows in _index_rows(keys, layout.output):
            idx.upsert(db, rows)
        phases["load_index_s"] = time.perf_counter() - start
        start = time.perf_counter()
        plan.load_outputs(db, _outputs(keys, layout.output))
        plan.load_listing(db, _listing(keys, layout.input), None)
        phases["load_listings_s"] = time.perf_counter() - start
        start = time.perf_counter()
        sink = plan.StorageSink(layout)
        counts = plan.decide(db, layout, SingleModelRouter(MODEL), 4, None, sink)
        sink.close()
        phases["decide_and_write_s"] = time.perf_counter() - start
        start = time.perf_counter()
        store = idx.IndexStore(layout.index)
        store.begin(layout.run_id, layout.manifest)
        meta = store.commit(db, layout.run_id, [layout.run_id])
        phases["commit_index_s"] = time.perf_counter() - start
        db.close()
        manifest_bytes = _folder_bytes(layout.manifest_run())
        result = {
            "environment": environment(),
            "keys": keys,
            "decided": {"to_process": counts.to_process, **dict(counts.statuses)},
            "seconds": {k: round(v, 2) for k, v in phases.items()},
            "total_s": round(sum(phases.values()), 2),
            "driver_rss_before_mb": before,
            "driver_peak_rss_mb": _peak_mb(),
            "index_bytes": _folder_bytes(layout.index),
            "index_rows": meta.rows,
            "plan_mb": round(_folder_bytes(layout.plan) / 2**20, 1),
            "manifest_bytes_per_skipped_row": round(manifest_bytes / max(1, counts.statuses["skipped"]), 1),
            "manifest_bytes_per_ok_row": _ok_row_bytes(str(Path(tmp, "ok-rows"))),
        }
    return result
