"""Inference speed per CPU at several torch thread counts and precisions: what the planner's
thread default rests on.

A CPU node can run one inference actor with N torch threads or N actors with one thread each.
Which gives more images per CPU is measured here, through the very upscaler an actor runs
(``load_upscaler``: folded network, tiles, the precision's fp32 fallback check), on two
workloads: one LR image of ``size`` x ``size`` (a photo's tile) and a batch of small images in one
forward pass (thumbnails, as ``InferStage`` groups them). Throughput per CPU divides by
min(threads, CPUs): more threads than cores (oversubscription) cannot use more CPUs than there are.
One warm-up run, then the median of timed runs; process CPU time is recorded beside wall time.
"""
from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from clipsr.bench.inference import environment
from clipsr.factory import load_upscaler


def _time(run: Callable[[], Any], runs: int) -> tuple[float, float]:
    """Median wall and CPU seconds of ``runs`` calls after one warm-up."""
    run()
    walls, cpus = [], []
    for _ in range(runs):
        t0, c0 = time.perf_counter(), time.process_time()
        run()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


def measure(model: str, scale: int, threads: int, precision: str, size: int = 128, small: int = 48,
            batch: int = 16, runs: int = 5) -> list[dict[str, Any]]:
    """Both workloads at one thread count and precision."""
    torch.set_num_threads(threads)
    up = load_upscaler(model, scale, precision=precision)
    rng = np.random.default_rng(0)
    photo = rng.random((size, size, 3), dtype=np.float32)
    thumbs = [rng.random((small, small, 3), dtype=np.float32) for _ in range(batch)]
    cpus = min(threads, os.cpu_count() or threads)
    results = []
    for workload, images, side, run in (
            (f"1 x {size}x{size}", 1, size, lambda: up.upscale(photo)),
            (f"{batch} x {small}x{small} in one pass", batch, small, lambda: up.upscale_batch(thumbs))):
        wall, cpu = _time(run, runs)
        out_mp = images * (side * scale) ** 2 / 1e6
        results.append({
            "workload": workload, "threads": threads, "precision": up.last_precision,
            "ms_per_image": round(1000 * wall / images, 2), "images_per_s": round(images / wall, 3),
            "output_mp_per_s": round(out_mp / wall, 3), "output_mp_per_s_per_cpu": round(out_mp / wall / cpus, 3),
            "cpu_seconds_per_image": round(cpu / images, 4),
        })
    return results


def run(model: str = "default", scale: int = 4, threads: Sequence[int] = (1, 2, 4),
        precisions: Sequence[str] = ("fp32", "bf16"), size: int = 128, runs: int = 5,
        on_result: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    env = environment()
    results = []
    for precision in precisions:
        for n in threads:
            for result in measure(model, scale, n, precision, size=size, runs=runs):
                results.append(result)
                if on_result is not None:
                    on_result(result)
    env["load_average_1m_after"] = round(os.getloadavg()[0], 2)
    return {"benchmark": "threads", "model": model, "scale": scale, "environment": env, "results": results}


def format_header() -> str:
    return (f"{'workload':<28}{'precision':>10}{'threads':>8}{'ms/image':>10}{'images/s':>10}"
            f"{'out MP/s':>10}{'per CPU':>9}")


def format_row(r: dict[str, Any]) -> str:
    return (f"{r['workload']:<28}{r['precision']:>10}{r['threads']:>8}{r['ms_per_image']:>10.1f}"
            f"{r['images_per_s']:>10.2f}{r['output_mp_per_s']:>10.3f}{r['output_mp_per_s_per_cpu']:>9.3f}")
