"""The Ray Data graph: plan parts -> read+decode -> infer (actor pool) -> encode+write -> manifest.

Only the actors import torch: the task functions live in torch-free modules (plan, decode, write,
manifest), because Ray imports a function's module in every worker that runs it, and a torch
import costs each task worker seconds and about 400 MB.

CPU budget: on a small machine an actor pool that takes every CPU starves the read tasks and the
job hangs. The inference actors take one CPU each (one actor by default on CPU, one per GPU on a
GPU cluster), and the stages around them take fractions, so reads, writes and manifests always
find room. Blocks carry a few rows each so the decode and write tasks run in parallel with
inference instead of one task working through a whole plan part.

Workers get the storage endpoint and region through the stages' runtime_env
(:func:`clipsr.ray_runtime.worker_env`), whether this driver started Ray or joined one whose
workers were started with another environment; credentials are never passed that way (see there).
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
import ray.data

from clipsr.enhance.decode import decode_batch
from clipsr.enhance.manifest import manifest_batch
from clipsr.enhance.infer import InferStage
from clipsr.enhance.plan import read_plan_parts
from clipsr.enhance.write import write_batch

log = logging.getLogger(__name__)

ROWS_PER_BLOCK = 2
MANIFEST_ROWS_PER_PART = 256


@dataclass(frozen=True)
class Resources:
    device: str  # "cpu" or "cuda"
    actors: int
    actor_cpus: float
    actor_gpus: float
    threads: int  # torch threads per actor
    task_cpus: float  # decode and write tasks
    light_cpus: float  # plan reading and manifest tasks


def plan_resources(cluster: dict[str, float], device: str = "auto", actors: int | None = None,
                   threads: int | None = None) -> Resources:
    """Share a cluster's CPUs (and GPUs) between the inference actors and the I/O tasks."""
    cpus, gpus = float(cluster.get("CPU", 1)), float(cluster.get("GPU", 0))
    if device == "auto":
        device = "cuda" if gpus >= 1 else "cpu"
    if device == "cuda" and gpus < 1:
        raise ValueError("--device cuda, but the Ray cluster has no GPU")
    if actors is None:
        actors = int(gpus) if device == "cuda" else 1
    if actors < 1:
        raise ValueError(f"--actors must be at least 1, got {actors}")
    # Leave at least one CPU's worth for decode/write tasks; below that, actors take fractions.
    actor_cpus = 1.0 if cpus - actors >= 1 else max(0.25, (cpus - 0.5) / actors)
    return Resources(device=device, actors=actors, actor_cpus=actor_cpus,
                     actor_gpus=1.0 if device == "cuda" else 0.0,
                     threads=threads or max(1, math.floor(actor_cpus)),
                     task_cpus=0.5 if cpus >= 2 else 0.25, light_cpus=0.1)


def build_dataset(plan_parts: list[str], run_id: str, run_uri: str, res: Resources, env: dict[str, str],
                  max_output_pixels: int, precision: str, tile: int, clip_weights: str | None,
                  image_timeout: float) -> ray.data.Dataset:
    """The lazy dataset of one run; iterating it runs the job and yields one count row per manifest part."""
    remote: dict[str, Any] = {"runtime_env": {"env_vars": env}} if env else {}
    ds = ray.data.from_items([{"part": uri} for uri in plan_parts], override_num_blocks=max(1, len(plan_parts)))
    ds = ds.map_batches(read_plan_parts, batch_size=1, batch_format="pyarrow", num_cpus=res.light_cpus, **remote)
    ds = ds.repartition(target_num_rows_per_block=ROWS_PER_BLOCK)
    ds = ds.map_batches(decode_batch, batch_size=1, batch_format="pyarrow", num_cpus=res.task_cpus,
                        fn_kwargs={"max_output_pixels": max_output_pixels}, **remote)
    ds = ds.map_batches(
        InferStage, batch_size=1, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=res.actors),
        num_cpus=res.actor_cpus, num_gpus=res.actor_gpus or None,
        fn_constructor_kwargs={"device": res.device, "precision": precision, "tile": tile,
                               "clip_weights": clip_weights, "threads": res.threads,
                               "image_timeout": image_timeout},
        **remote)
    ds = ds.map_batches(write_batch, batch_size=1, batch_format="pyarrow", num_cpus=res.task_cpus, **remote)
    return ds.map_batches(manifest_batch, batch_size=MANIFEST_ROWS_PER_PART, batch_format="pyarrow",
                          num_cpus=res.light_cpus, fn_kwargs={"run_id": run_id, "run_uri": run_uri}, **remote)


def execute(ds: ray.data.Dataset, on_progress: Callable[[Counter], None]) -> Counter:
    """Run the dataset, streaming the per-part counts back; returns the totals."""
    totals: Counter = Counter()
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in batch.to_pylist():
            totals.update({"ok": row["ok"], "failed": row["failed"], "rows": row["rows"]})
        on_progress(totals)
    return totals
