"""Adaptation gain on unseen images: source model, few-shot adaptation, plain fine-tuning.

For each domain folder the first ``shots`` images (sorted order) are the exemplars. Adaptation runs
as ``clipsr adapt`` does (candidates probed on held-out exemplars, the best trained on); the
baseline fine-tunes every weight of the source model at one fixed learning rate, RGB L1 and no
warm-up, on the same exemplars for as many steps as adaptation trained, with the same patch sampler
and arithmetic (so about the same time, less adaptation's held-out scoring). Times are wall seconds
and the process's CPU seconds: with one torch thread the second is the thread's own time, which a
busy machine inflates less. Each result is scored with the evaluation protocol on the rest of the
folder (``--skip-first shots``), which neither ever saw.
"""
from __future__ import annotations

import tempfile
import time
from typing import Any

import torch

from clipsr import storage
from clipsr.adapt.fast import plain_finetune, resolve_precision
from clipsr.adapt.run import adapt_one, read_shots
from clipsr.adapt.settings import AdaptSettings
from clipsr.adapt.spec import DomainSpec
from clipsr.bench.inference import environment
from clipsr.degradations import Degradation
from clipsr.evaluate import evaluate
from clipsr.factory import load_checkpoint, load_encoder_for, load_upscaler
from clipsr.inference import NetworkUpscaler


def _score(upscaler: Any, name: str, folder: str, shots: int, jpeg: int | None) -> float:
    return evaluate(upscaler, {name: folder}, skip_first=shots, jpeg=jpeg)["datasets"][name]["psnr_y"]


def _scored_quality(degradation: str) -> int | None:
    """The JPEG quality the unseen images are scored at: the one the exemplars were degraded with."""
    archive = Degradation.parse(degradation)
    if archive.is_clean:
        return None
    if archive.noise is not None or archive.jpeg[0] != archive.jpeg[1]:
        raise ValueError(f"the benchmark scores at one JPEG quality; got --degradation {degradation}")
    return archive.jpeg[0]


def bench_adaptation(
    source: str, domains: dict[str, str], shots: int, steps: int, budget_seconds: float | None, finetune_lr: float,
    threads: int, seed: int = 0, patch_tries: int = AdaptSettings.patch_tries, device: str = "cpu",
    precision: str = AdaptSettings.precision, candidates: tuple[tuple[str, float], ...] = AdaptSettings.candidates,
    clip_weights: str | None = None, lr_patch: int | None = None, degradation: str = "clean",
    batch: int = AdaptSettings.batch,
) -> dict[str, Any]:
    torch.set_num_threads(threads)
    jpeg = _scored_quality(degradation)
    settings = AdaptSettings(candidates=candidates, steps=steps, budget_seconds=budget_seconds, seed=seed,
                             patch_tries=patch_tries, device=device, precision=precision, lr_patch=lr_patch,
                             degradation=degradation, batch=batch)
    out: dict[str, Any] = {"environment": environment(), "source": source, "shots": shots, "steps": steps,
                           "budget_seconds": budget_seconds, "threads": threads, "candidates": settings.candidates,
                           "finetune_lr": finetune_lr, "patch_tries": patch_tries, "batch": batch, "seed": seed,
                           "device": device, "precision": resolve_precision(precision, device), "degradation": degradation,
                           "domains": {}}
    src_model, src_meta = load_checkpoint(source)
    out["lr_patch"] = settings.patch_side(src_model.scale)
    encoder = load_encoder_for(src_meta, clip_weights)
    with tempfile.TemporaryDirectory() as registry:
        for name, folder in domains.items():
            base = _score(load_upscaler(source, clip_weights=clip_weights), name, folder, shots, jpeg)
            print(f"[{name}] source model: {base:.3f} dB", flush=True)
            cpu = time.process_time()
            row = adapt_one(DomainSpec.shorthand(f"{name}={folder}", shots, None), source, settings,
                            registry, {"arch": "color-stats"}, threads, clip_weights)
            cpu = time.process_time() - cpu
            if row["status"] != "ok":
                raise RuntimeError(f"adapting {name} failed: {row['error']}")
            adapted = _score(load_upscaler(f"{registry}/{name}/v{row['version']}", clip_weights=clip_weights),
                             name, folder, shots, jpeg)
            print(f"[{name}] adapted: {adapted:.3f} dB ({adapted - base:+.3f}), {row['scope']} "
                  f"{row['steps']} steps ({row['stop_reason']}) at lr {row['lr']:g}, {row['seconds']:.0f} s, held-out "
                  f"{row['gain_db']:+.3f} ({'promoted' if row['promoted'] else 'not promoted'})", flush=True)

            out["domains"][name] = {
                "source_psnr_y": base,
                "adapted": {"psnr_y": adapted, "gain_db": adapted - base, "seconds": row["seconds"],
                            "cpu_seconds": cpu,
                            "scope": row["scope"], "lr": row["lr"], "steps": row["steps"],
                            "stop_reason": row["stop_reason"],
                            "heldout_gain_db": row["gain_db"], "promoted": row["promoted"]},
            }
            if finetune_lr <= 0:
                continue
            imgs, _ = read_shots(storage.list_images(folder)[:shots])
            t0, cpu = time.perf_counter(), time.process_time()
            tuned = plain_finetune(src_model, imgs, finetune_lr, row["steps"], settings, encoder)
            tuned_seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu
            fine = _score(NetworkUpscaler(tuned, {**src_meta, "id": "fine-tuned"}, encoder=encoder), name, folder,
                          shots, jpeg)
            print(f"[{name}] plain fine-tuning: {fine:.3f} dB ({fine - base:+.3f}), {row['steps']} steps, "
                  f"{tuned_seconds:.0f} s", flush=True)
            out["domains"][name]["finetuned"] = {"psnr_y": fine, "gain_db": fine - base, "steps": row["steps"],
                                                 "seconds": tuned_seconds, "cpu_seconds": cpu}
    return out
