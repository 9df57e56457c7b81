"""Model size and CPU inference speed of the shipped architectures, per scale.

For each architecture and scale this records the parameter count that runs at inference (the
adaptive branch folded to one vector, :meth:`CDASR.folded`), the count with the branch, and the
speed of the folded network on one fixed-size LR input in output megapixels per second: one
warm-up run, then the median of timed runs. Weights are random: speed does not depend on them.
Figures are only comparable on the same machine and thread count, so the result carries both,
and the machine's load. Process CPU time is recorded too: on a shared machine the wall clock
measures the neighbours as well, while the CPU time of a one-thread run does not.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any, Callable, Sequence

import torch

from clipsr.factory import create_model, list_models
from clipsr.models.cdasr import count_parameters
from clipsr.models.upsampler import SCALES
from clipsr.provenance import code_revision, utc_now

# Test-only architectures, left out unless named.
EXCLUDED_BY_DEFAULT = ("cdasr-tiny",)


def default_architectures() -> list[str]:
    return [name for name in list_models() if name not in EXCLUDED_BY_DEFAULT]


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def environment() -> dict[str, Any]:
    """What the figures depend on: hardware, threads, library versions, code, date."""
    return {
        "date": utc_now(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": round(os.getloadavg()[0], 2),  # other work on the machine slows every figure
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "code_revision": code_revision(),
    }


def bench_config(arch: str, scale: int, lr_size: int = 128, runs: int = 5, warmup: int = 1) -> dict[str, Any]:
    """Sizes and timed CPU forwards of one architecture at one scale."""
    if lr_size < 1 or runs < 1 or warmup < 0:
        raise ValueError(f"need lr_size >= 1, runs >= 1, warmup >= 0; got {lr_size}, {runs}, {warmup}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = create_model(arch, scale).eval()
        lr = torch.rand(1, 3, lr_size, lr_size)
    folded = model.folded()
    seconds, cpu_seconds = [], []
    with torch.inference_mode():
        for i in range(warmup + runs):
            t0, c0 = time.perf_counter(), time.process_time()
            out = folded(lr)
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
            if i >= warmup:
                seconds.append(elapsed)
                cpu_seconds.append(cpu)
    out_mp = out.shape[-2] * out.shape[-1] / 1e6
    median = statistics.median(seconds)
    cpu_median = statistics.median(cpu_seconds)
    return {
        "arch": arch,
        "scale": scale,
        "params_inference": count_parameters(folded),
        "params_total": count_parameters(model),
        "lr_size": [lr_size, lr_size],
        "output_size": [int(out.shape[-2]), int(out.shape[-1])],
        "runs": runs,
        "seconds": [round(s, 6) for s in seconds],
        "seconds_median": round(median, 6),
        "seconds_min": round(min(seconds), 6),  # least disturbed by other work on a shared machine
        "output_mp_per_s": round(out_mp / median, 4),
        # CPU time of all threads: with one thread, the speed other work on the machine cannot slow
        "cpu_seconds_median": round(cpu_median, 6),
        "output_mp_per_cpu_s": round(out_mp / cpu_median, 4),
    }


def resolve(archs: Sequence[str] | None, scales: Sequence[int] | None) -> tuple[list[str], list[int]]:
    """The configurations to measure (defaults filled in); unknown names and scales are refused."""
    archs = list(archs) if archs else default_architectures()
    scales = list(scales) if scales else list(SCALES)
    known = list_models()
    for arch in archs:
        if arch not in known:
            raise ValueError(f"unknown architecture {arch!r}; known: {known}")
    for scale in scales:
        if scale not in SCALES:
            raise ValueError(f"unsupported scale x{scale}; supported: {', '.join(f'x{s}' for s in SCALES)}")
    return archs, scales


def run(
    archs: Sequence[str] | None = None,
    scales: Sequence[int] | None = None,
    lr_size: int = 128,
    runs: int = 5,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Benchmark every (architecture, scale), with the environment the figures depend on."""
    archs, scales = resolve(archs, scales)
    env = environment()
    results = []
    for arch in archs:
        for scale in scales:
            results.append(bench_config(arch, scale, lr_size=lr_size, runs=runs))
            if on_result is not None:
                on_result(results[-1])
    env["load_average_1m_after"] = round(os.getloadavg()[0], 2)
    return {
        "benchmark": "inference",
        "method": "folded network (null embedding), fp32, batch 1, one warm-up run, median of timed runs",
        "environment": env,
        "results": results,
    }


def format_row(r: dict[str, Any]) -> str:
    return (f"{r['arch']:<12}{'x' + str(r['scale']):>6}{r['params_inference']:>14,}{r['params_total']:>14,}"
            f"{r['seconds_median'] * 1000:>11.1f}{r['output_mp_per_s']:>12.3f}{r['output_mp_per_cpu_s']:>14.3f}")


def format_header() -> str:
    return f"{'arch':<12}{'scale':>6}{'params (inf)':>14}{'params (all)':>14}{'ms/image':>11}{'out MP/s':>12}{'out MP/CPU-s':>14}"
