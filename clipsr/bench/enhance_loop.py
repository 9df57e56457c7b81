"""The enhancement job against a plain loop: same model, same images, same stages, same threads.

``plain_loop`` runs one image at a time in one process: read, decode, infer, encode, write, calling
the very stage functions the Ray pipeline runs, so both do identical work (quality figures
included). ``ray_job`` runs ``run_enhance`` on the same folder into another output folder, with Ray
started beforehand: Ray's start-up is excluded, as the acceptance asks; the inference actor's
start-up (a worker importing torch and loading the model) is a cost of the pipeline and is
included. Both report images/s, output megapixels/s and peak memory: the plain loop its own peak
RSS, the Ray run the peak of the summed RSS of the driver and every process it started, sampled
every 0.5 s (shared pages counted once per process: an upper bound).

Weights may be random (``--arch``): speed does not depend on them. On a busy machine every figure
drops; the environment record carries the load average.
"""
from __future__ import annotations

import os
import resource
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from clipsr import storage
from clipsr.bench.inference import environment
from clipsr.enhance import manifest
from clipsr.enhance.decode import read_decode
from clipsr.enhance.infer import InferStage
from clipsr.enhance.listing import output_format
from clipsr.enhance.options import DEFAULT_MAX_OUTPUT_PIXELS, EnhanceOptions
from clipsr.enhance.routing import resolve_model
from clipsr.enhance.rows import WORK
from clipsr.enhance.write import encode_write
from clipsr.factory import create_model, save_checkpoint
from clipsr.reaper import descendants
from clipsr.inference import resolve_precision

_PAGE = os.sysconf("SC_PAGE_SIZE")


def make_images(folder: str, count: int, size: int, seed: int = 0) -> None:
    """``count`` deterministic size x size RGB PNGs with structure (gradients, edges, noise)."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(count):
        phase = rng.uniform(0, 6.28, 3)
        base = np.stack([np.sin(8 * xx + phase[0]), np.cos(6 * yy + phase[1]), np.sin(5 * (xx + yy) + phase[2])], 2)
        img = (base * 90 + 128 + rng.normal(0, 6, (size, size, 3))).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(folder, f"img_{i:05d}.png"))


def random_checkpoint(arch: str, scale: int, folder: str) -> str:
    path = os.path.join(folder, f"{arch}-x{scale}-random.safetensors")
    torch.manual_seed(0)
    save_checkpoint(path, create_model(arch, scale), arch)
    return path


def _figures(images: int, seconds: float, output_pixels: int, peak_bytes: int, failed: int) -> dict[str, Any]:
    return {"images": images, "failed": failed, "seconds": round(seconds, 3),
            "images_per_s": round(images / seconds, 3), "output_mp_per_s": round(output_pixels / 1e6 / seconds, 3),
            "peak_memory_mb": round(peak_bytes / 2**20, 1)}


def plain_loop(input_dir: str, output_dir: str, spec: str, scale: int | None, threads: int,
               precision: str = "auto") -> dict[str, Any]:
    """One process, one image after another; the model is loaded before the clock starts."""
    torch.set_num_threads(threads)
    model = resolve_model(spec, scale)
    stage = InferStage(threads=threads, precision=precision)
    stage.upscaler(model.spec, model.scale)
    infos = sorted(storage.iter_objects(input_dir), key=lambda o: o.key)
    pixels = failed = 0
    start = time.perf_counter()
    for info in infos:
        row = dict.fromkeys(WORK.names)
        row.update(input_key=info.key, input_uri=info.uri, output_uri=storage.join(output_dir, info.key),
                   output_format=output_format(info.key), input_size=info.size, scale=model.scale,
                   model_spec=model.spec, model_id=model.id)
        read_decode(row, DEFAULT_MAX_OUTPUT_PIXELS)
        if row["status"] is None:
            stage.upscale_row(row)
        if row["status"] is None:
            encode_write(row)
        if row["status"] == "ok":
            pixels += row["output_width"] * row["output_height"]
        else:
            failed += 1
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return _figures(len(infos), seconds, pixels, peak, failed)


class _TreeMemory:
    """Peak summed RSS of this process and all its descendants, sampled in a thread (Linux: /proc)."""

    def __init__(self, interval: float = 0.5) -> None:
        self._interval = interval
        self._stop = threading.Event()
        self.peak = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _sample() -> int:
        total = 0
        for pid in [os.getpid(), *descendants(os.getpid())]:
            try:
                with open(f"/proc/{pid}/statm") as f:
                    total += int(f.read().split()[1]) * _PAGE
            except OSError:  # processes come and go while we sample
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self._interval)

    def __enter__(self) -> "_TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def ray_job(input_dir: str, output_dir: str, spec: str, scale: int | None, threads: int | None,
            precision: str = "auto", batch_size: int = 16) -> dict[str, Any]:
    """``run_enhance`` over the folder, Ray already running (started here if needed)."""
    import ray

    from clipsr.ray_runtime import init_ray
    from clipsr.enhance.run import run_enhance

    started = init_ray(dashboard=False)
    try:
        with _TreeMemory() as memory:
            start = time.perf_counter()
            result = run_enhance(EnhanceOptions(input=input_dir, output=output_dir, model=spec, scale=scale,
                                                threads=threads, device="cpu", max_failed_fraction=1.0,
                                                precision=precision, batch_size=batch_size))
            seconds = time.perf_counter() - start
        if result.exit_code != 0:
            raise RuntimeError(result.summary)
        pixels = 0
        for part in manifest.iter_parts(result.manifest_uri.rstrip("/")):
            table = manifest.read_part(part, ["output_width", "output_height"])
            widths, heights = table.column("output_width").to_pylist(), table.column("output_height").to_pylist()
            pixels += sum(w * h for w, h in zip(widths, heights) if w)
        return {**_figures(result.counts["ok"] + result.counts["failed"], seconds, pixels, memory.peak,
                           result.counts["failed"]), "summary": result.summary}
    finally:
        if started:
            ray.shutdown()


def run(images: int, size: int, scale: int, threads: int, model: str | None = None, arch: str = "cdasr-lite",
        workdir: str | None = None, precision: str = "auto", batch_size: int = 16) -> dict[str, Any]:
    """Both runs on ``images`` synthetic size x size inputs; returns the figures and their ratio."""
    with tempfile.TemporaryDirectory(prefix="clipsr-bench-enhance-", dir=workdir) as tmp:
        spec = model or random_checkpoint(arch, scale, tmp)
        inputs = str(Path(tmp, "in"))
        make_images(inputs, images, size)
        loop = plain_loop(inputs, str(Path(tmp, "out-loop")), spec, scale, threads, precision)
        job = ray_job(inputs, str(Path(tmp, "out-ray")), spec, scale, threads, precision, batch_size)
    return {
        "environment": environment(),
        "setup": {"images": images, "lr_size": size, "scale": scale, "threads": threads,
                  "precision": resolve_precision(precision, "cpu"), "batch_size": batch_size,
                  "model": model or f"{arch} (random weights)"},
        "plain_loop": loop,
        "ray": job,
        "ray_over_loop_images_per_s": round(job["images_per_s"] / loop["images_per_s"], 3),
    }
