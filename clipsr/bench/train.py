"""Pretraining throughput: patches per second with 1 and 2 Ray Train workers, same total CPUs.

Each configuration runs the real ``clipsr pretrain`` path (TorchTrainer, DDP with gloo, episodes
on) for a fixed number of steps on the given folders; the figure is the rate over the steps after
the last logging interval, as the training loop reports it (start-up and the first steps excluded).
"""
from __future__ import annotations

import tempfile
from typing import Any

from clipsr.bench.inference import environment
from clipsr.train.settings import load_settings


def bench_workers(
    data: list[str], workers: list[int], total_cpus: float, steps: int, arch: str, scale: int,
    batch: int, lr_patch: int,
) -> dict[str, Any]:
    from clipsr.train.trainer import build_trainer
    from clipsr.train.embeddings import prepare_embeddings

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in workers:
            cpus = total_cpus / n
            s = load_settings(None, [
                f"name=bench-{n}", f"storage_path={tmp}", f"data.train={data}",
                f"model.arch={arch}", f"model.scale={scale}", f"batch.size={batch}", f"batch.lr_patch={lr_patch}",
                f"optim.steps={steps}", f"checkpoint.every={steps}", f"validation.log_every={max(1, steps // 4)}",
                f"scaling.num_workers={n}", f"scaling.cpus_per_worker={cpus}",
                f"scaling.torch_threads={max(1, int(cpus))}",
            ])
            prepare_embeddings(s)
            result = build_trainer(s).fit()
            rate = result.metrics["patches_per_s"]
            results.append({"workers": n, "cpus_per_worker": cpus, "patches_per_s": rate,
                            "steps": steps, "global_batch": batch * n})
            print(f"{n} worker(s) x {cpus:g} CPU: {rate:.1f} patches/s "
                  f"({arch} x{scale}, {lr_patch}px LR patches, {batch}/worker)", flush=True)
    return {"environment": environment(), "arch": arch, "scale": scale, "lr_patch": lr_patch,
            "batch_per_worker": batch, "results": results}
