"""Asking an autoscaling cluster for GPUs before the inference pool is sized.

An autoscaling cluster may have GPU node types configured but no GPU node up when a run starts
(GPU nodes scale to zero between nightly runs). Sized on the nodes alive at that moment, the run
would use only CPUs, or refuse ``--device cuda``. So, when GPUs are wanted and none is alive, the
driver asks the autoscaler for them (``ray.autoscaler.sdk.request_resources``) and waits up to
``--gpu-wait`` seconds for the first to join, then sizes the pool on what has joined, letting it
grow to the GPUs asked for as the rest join. If none joins in time, ``--device cuda`` stops
(exit 1) with the reason, and ``--device auto`` runs on the CPUs, saying so in the log.

GPUs are wanted when the run asks for ``--device cuda`` on a cluster it joined (RAY_ADDRESS), or
when ``--device auto`` finds GPU node types in the autoscaling config the cluster publishes to
Ray (what Ray Data and Ray Train read; not every autoscaler publishes it). A Ray the driver
started on its own machine has no autoscaler: nothing is asked for there. The request is withdrawn when the run ends, so the autoscaler can scale the
GPU nodes down again.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

#: Seconds between looks at the cluster while waiting for GPU nodes.
POLL_S = 5.0


def gpus_to_request(device: str, alive_gpus: float, configured_gpus: int | None, joined: bool,
                    actors: int | None = None, max_actors: int | None = None, actors_per_gpu: int = 1) -> int:
    """How many GPUs to ask the autoscaler for (0: none), from what is known at the start.

    ``configured_gpus``: the most GPUs the cluster's node types can bring up (None: no autoscaling
    config published, 0: no GPU node type); ``joined``: the driver joined a running cluster (it did
    not start Ray itself). The count is the pool's GPUs: ``--actors`` or ``--max-actors`` over
    ``--actors-per-gpu``, else one, capped by what the node types can bring up."""
    if device == "cpu" or alive_gpus >= 1 or not joined or configured_gpus == 0:
        return 0
    if configured_gpus is None and device != "cuda":  # auto, and nothing says GPUs can come
        return 0
    wanted = math.ceil((actors or max_actors or actors_per_gpu) / actors_per_gpu)
    return min(wanted, configured_gpus) if configured_gpus else wanted


def configured_gpus() -> int | None:
    """The most GPUs the cluster's autoscaling config allows (None: no config published)."""
    from ray._private.state import state  # no public API yet; Ray Train and Ray Data read it so too

    try:
        limits = state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001  an older or unusual cluster: treat as unknown
        log.debug("could not read the cluster's autoscaling config", exc_info=True)
        return None
    return None if limits is None else int(limits.get("GPU", 0))


def alive_nodes() -> list[Mapping[str, float]]:
    import ray

    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


class GpuRequest:
    """The autoscaler request of one run, withdrawn on exit (``with GpuRequest(n) as r: r.wait(...)``)."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __enter__(self) -> "GpuRequest":
        from ray.autoscaler.sdk import request_resources

        log.warning("no GPU node is up: asking the autoscaler for %d GPU(s)", self.count)
        request_resources(bundles=[{"GPU": 1}] * self.count)
        return self

    def __exit__(self, *exc: Any) -> None:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[])  # requests last until replaced

    def wait(self, timeout_s: float, poll_s: float = POLL_S) -> list[Mapping[str, float]]:
        """The alive nodes once one has a GPU, or when ``timeout_s`` has passed (then without)."""
        deadline = time.monotonic() + timeout_s
        while True:
            nodes = alive_nodes()
            if sum(n.get("GPU", 0) for n in nodes) >= 1 or time.monotonic() >= deadline:
                return nodes
            time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))


def nodes_for_run(device: str, joined: bool, wait_s: float, actors: int | None = None,
                  max_actors: int | None = None, actors_per_gpu: int = 1
                  ) -> tuple[list[Mapping[str, float]], str, int | None]:
    """The nodes to size the pool on, the device to use and the pool's upper bound.

    Asks for GPUs and waits when :func:`gpus_to_request` says so. Raises ValueError when
    ``--device cuda`` got no GPU in time; with ``--device auto`` that falls back to the CPUs."""
    nodes = alive_nodes()
    alive = sum(n.get("GPU", 0) for n in nodes)
    count = gpus_to_request(device, alive, configured_gpus() if joined and alive < 1 else None, joined,
                            actors, max_actors, actors_per_gpu)
    if not count:
        return nodes, device, max_actors
    with GpuRequest(count) as asked:
        start = time.monotonic()
        nodes = asked.wait(wait_s)
        if sum(n.get("GPU", 0) for n in nodes) >= 1:
            log.warning("a GPU node joined after %.0f s", time.monotonic() - start)
            return nodes, "cuda", max(max_actors or 0, count * actors_per_gpu) or None
    why = (f"asked the autoscaler for {count} GPU(s), but none joined within --gpu-wait={wait_s:g} s; "
           "check the GPU node type's limits (max workers, cloud quota)")
    if device == "cuda":
        raise ValueError(f"--device cuda: {why}, or run with --device cpu")
    log.warning("running on CPUs: %s", why)
    return nodes, "cpu", max_actors
