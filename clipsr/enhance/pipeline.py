"""The Ray Data graph: plan parts -> read+decode -> infer (actor pool) -> encode+write -> driver.

Only the actors import torch: the task functions live in torch-free modules (plan, decode, write,
manifest), because Ray imports a function's module in every worker that runs it, and a torch
import costs each task worker seconds and about 400 MB.

Rows travel between the stages in decode groups (:func:`clipsr.enhance.rows.group`): up to one
inference call's rows and 1 MiB of input each, so a group of thumbnails costs one Ray task and one
block per stage, while a large image is a group of its own.

The written rows (payloads already dropped) stream back to the driver, which writes them as
manifest parts every few seconds (manifest.ManifestWriter): a killed run keeps every row that
reached the driver, and the rerun redoes only the inputs that were in flight.

Sizing (:func:`plan_resources`, pure): the inference pool holds as many actors as the cluster's
nodes hold when the run starts, node by node, leaving each node room for the decode and write tasks
(an actor pool that takes every CPU starves the tasks that feed it, and the job hangs). A node too
small for more than one actor gives it all its usable CPUs as torch threads, so a laptop or a
2-core VM uses both cores; larger nodes run one single-thread actor per CPU, the most images per
CPU measured (docs/benchmarks.md). On GPUs, one actor per GPU, or several sharing one
(``--actors-per-gpu``) when one cannot keep it busy. ``--max-actors`` above the cluster's size lets
an autoscaling cluster add nodes for the pending actors.

Workers get the storage endpoint and region through the stages' runtime_env
(:func:`clipsr.ray_runtime.worker_env`), whether this driver started Ray or joined one whose
workers were started with another environment; credentials are never passed that way (see there).
"""
from __future__ import annotations

import logging
import math
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import ray
import ray.data

from clipsr.enhance import rows as R
from clipsr.enhance.decode import decode_groups
from clipsr.enhance.infer import InferGroups
from clipsr.enhance.manifest import ManifestWriter
from clipsr.enhance.options import DEFAULT_MAX_INPUT_BYTES
from clipsr.enhance.plan import read_plan_parts
from clipsr.enhance.write import write_groups

log = logging.getLogger(__name__)

#: Bytes per block. Rows travel in groups (``rows.group``): a group of thumbnails, or one large
#: image, is a block of its own, so groups decode, upscale and write side by side; groups of plan
#: rows of large images (a few hundred bytes each) share a block, a few to a decode task.
BLOCK_BYTES = 1024
#: Logical CPUs of one decode or write task, and of the light plan-reading task. Small: the tasks
#: spend much of their time waiting on storage, and several must run beside each actor to keep it fed.
TASK_CPUS, LIGHT_CPUS = 0.1, 0.05
#: Decode (and write) tasks at once per CPU that the actors leave free: each task runs its group's
#: inputs one after another, CPU-bound on local storage and partly waiting on object storage; more
#: would only start more worker processes (each a Python interpreter with Ray, seconds of CPU to
#: start, which Ray stops again when idle).
IO_TASKS_PER_CPU = 2
#: Decode groups per actor a short run is cut into at least (groups shrink below one inference
#: call's rows for that): the least busy actor takes the next group, so with fewer groups than
#: actors, or as few, some actors get nothing while one does the run.
GROUPS_PER_ACTOR = 4
#: Seconds the pipeline waits for its initial actors (each loads torch and the model) to start.
ACTOR_START_S = 600
#: Torch threads per CPU inference actor on nodes that hold several actors (docs/benchmarks.md:
#: one thread gives the most images per CPU).
CPU_THREADS = 1


@dataclass(frozen=True)
class Resources:
    device: str  # "cpu" or "cuda"
    min_actors: int  # what the cluster holds at the start
    max_actors: int
    actor_cpus: float
    actor_gpus: float
    threads: int  # torch threads per actor
    task_cpus: float  # decode and write tasks
    light_cpus: float  # plan reading
    io_tasks: int = 2  # decode tasks at once, and write tasks at once

    def describe(self) -> str:
        pool = f"{self.max_actors}" if self.min_actors == self.max_actors else f"{self.min_actors}-{self.max_actors}"
        gpu = f", {self.actor_gpus:.2g} GPU" if self.actor_gpus else ""
        return (f"{pool} {self.device} actor(s), {self.actor_cpus:.2g} CPU{gpu} and {self.threads} torch "
                f"thread(s) each; up to {self.io_tasks} decode and {self.io_tasks} write tasks at once")


def io_reserve(node_cpus: float) -> float:
    """CPUs of one node kept free of inference actors for the decode and write tasks. Under half
    of a one-CPU node: its actor then takes more than half, so the actor Ray restarts for a lost
    node can never squeeze onto a survivor's free share and starve its decode tasks (a hang)."""
    return max(0.4, node_cpus / 8)


def plan_resources(nodes: Iterable[Mapping[str, float]], device: str = "auto", actors: int | None = None,
                   threads: int | None = None, max_actors: int | None = None,
                   actors_per_gpu: int = 1) -> Resources:
    """Size the inference pool to the cluster's alive nodes (each ``ray.nodes()[i]["Resources"]``)."""
    nodes = [n for n in nodes if n.get("CPU", 0) > 0 or n.get("GPU", 0) > 0]
    if not nodes:
        raise ValueError("the Ray cluster has no node with CPUs or GPUs")
    gpus = sum(n.get("GPU", 0) for n in nodes)
    if device == "auto":
        device = "cuda" if gpus >= 1 else "cpu"
    if device == "cuda" and gpus < 1:
        raise ValueError("--device cuda, but the Ray cluster has no GPU")
    for name, value in (("--actors", actors), ("--threads", threads), ("--max-actors", max_actors),
                        ("--actors-per-gpu", actors_per_gpu)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if device == "cuda":
        gpu_nodes = [n for n in nodes if n.get("GPU", 0) >= 1]
        smallest = min(n.get("CPU", 0) for n in gpu_nodes) / max(n["GPU"] for n in gpu_nodes) / actors_per_gpu
        actor_cpus = min(1.0, max(0.1, smallest - io_reserve(smallest)))
        fits = sum(math.floor(n["GPU"] * actors_per_gpu) for n in gpu_nodes)
        actor_gpus = 1.0 / actors_per_gpu
        threads = threads or 1
    else:
        cpu_nodes = [n["CPU"] for n in nodes if n.get("CPU", 0) > 0]
        usable = min(cpu_nodes) - io_reserve(min(cpu_nodes))
        per_thread = threads or CPU_THREADS
        if usable < 2 * per_thread:  # one actor per node: give it the node's usable CPUs
            actor_cpus = usable
            threads = threads or max(1, round(usable))
        else:
            actor_cpus, threads = float(per_thread), per_thread
        if actors is not None:  # a fixed pool must fit too: share the usable CPUs if it asks for more
            actor_cpus = min(actor_cpus, sum(c - io_reserve(c) for c in cpu_nodes) / actors)
        fits = sum(max(0, math.floor((c - io_reserve(c)) / actor_cpus + 1e-9)) for c in cpu_nodes)
        actor_gpus = 0.0
    fits = max(1, fits)
    if actors is not None:
        low = high = actors
    else:  # never below what the cluster holds now: Ray Data retires actors that idle while the reads start
        high = max(max_actors or fits, 1)
        low = min(fits, high)
    free = sum(n.get("CPU", 0) for n in nodes) - low * actor_cpus  # what the actors leave, now
    io_tasks = max(2, math.ceil(IO_TASKS_PER_CPU * free * high / low - 1e-9))  # and as the pool grows
    return Resources(device=device, min_actors=low, max_actors=high, actor_cpus=actor_cpus,
                     actor_gpus=actor_gpus, threads=threads, task_cpus=TASK_CPUS, light_cpus=LIGHT_CPUS,
                     io_tasks=io_tasks)


def rows_per_group(batch_size: int, rows: int | None, actors: int) -> int:
    """Rows per decode group: one inference call's at most, and few enough that a short run of
    ``rows`` inputs still has GROUPS_PER_ACTOR groups for every actor."""
    if rows is None:
        return batch_size
    return max(1, min(batch_size, math.ceil(rows / (GROUPS_PER_ACTOR * actors))))


def build_dataset(plan_parts: list[str], res: Resources, env: dict[str, str], max_output_pixels: int,
                  precision: str, tile: int, clip_weights: str | None, image_timeout: float,
                  batch_size: int = 16, max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES,
                  rows: int | None = None) -> ray.data.Dataset:
    """The lazy dataset of one run (``rows`` inputs planned); iterating it runs the job and yields
    the written (or failed) rows."""
    remote: dict[str, Any] = {"runtime_env": {"env_vars": env}} if env else {}
    ds = ray.data.from_items([{"part": uri} for uri in plan_parts], override_num_blocks=max(1, len(plan_parts)))
    ds.context.target_max_block_size = BLOCK_BYTES
    # Which actor takes the next group is Ray Data's own choice (its default, actor locality): an
    # actor on the node that holds the decoded group while it has a free slot, else the least busy
    # one. So a second actor gets work once the first falls behind, as it does when inference is
    # the bottleneck; a model much faster than the decode keeps a short run on one actor.
    # Start when the pool's first actors are all up, not when the fastest is: otherwise a short run
    # is done by the first actor before the others have loaded torch.
    ds.context.wait_for_min_actors_s = ACTOR_START_S
    # Decode groups of at most one inference call's rows and plan.GROUP_BYTES of input: a thumbnail's
    # group shares Ray's costs per task and block among many inputs, and a short run still has
    # several groups for every actor (rows_per_group). (Groups, not a repartition by rows: that is an operator of its own,
    # tasks of a whole CPU, which a cluster of small nodes, each holding an actor, never has free.)
    ds = ds.map_batches(read_plan_parts, batch_size=1, batch_format="pyarrow", num_cpus=res.light_cpus,
                        fn_kwargs={"max_rows": rows_per_group(batch_size, rows, res.min_actors)}, **remote)
    io = ray.data.TaskPoolStrategy(size=res.io_tasks)
    ds = ds.map_batches(decode_groups, batch_size=1, batch_format="pyarrow", num_cpus=res.task_cpus, compute=io,
                        fn_kwargs={"max_output_pixels": max_output_pixels, "max_input_bytes": max_input_bytes},
                        **remote)
    pool = ray.data.ActorPoolStrategy(min_size=res.min_actors, max_size=res.max_actors)
    ds = ds.map_batches(
        InferGroups, batch_size=1, batch_format="pyarrow", compute=pool,
        num_cpus=res.actor_cpus, num_gpus=res.actor_gpus or None,
        fn_constructor_kwargs={"device": res.device, "precision": precision, "tile": tile,
                               "clip_weights": clip_weights, "threads": res.threads,
                               "image_timeout": image_timeout},
        **remote)
    return ds.map_batches(write_groups, batch_size=1, batch_format="pyarrow", num_cpus=res.task_cpus, compute=io,
                          **remote)


def execute(ds: ray.data.Dataset, writer: ManifestWriter, on_progress: Callable[[Counter], None]) -> Counter:
    """Run the dataset, handing every row to the manifest writer as it arrives; returns the totals
    (``ok``, ``failed``, ``rows``). The last part is written before this returns."""
    totals: Counter = Counter()
    with warnings.catch_warnings():  # fewer groups than tasks or actors: nothing to report
        warnings.filterwarnings("ignore", message="The m(ax|in)imum number of concurrent", category=UserWarning)
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            statuses = writer.add(R.ungroup(batch, R.WORK)[0])
            totals.update(statuses)
            totals["rows"] += sum(statuses.values())
            on_progress(totals)
    writer.close()
    return totals
