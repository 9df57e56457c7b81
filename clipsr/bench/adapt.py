"""Adaptation gain: source model vs few-shot adaptation vs plain fine-tuning, on unseen images.

For each domain folder: the first ``shots`` images (sorted order) are the exemplars; adaptation runs
once per scope with the same time budget (``adaptive+bias``: the method; ``all``: every weight,
the fine-tuning baseline), and each result is scored with the evaluation protocol on the rest of
the folder (``--skip-first shots``), which adaptation never saw.
"""
from __future__ import annotations

import tempfile
import time
from typing import Any

from clipsr.adapt.fast import AdaptSettings
from clipsr.adapt.run import adapt_one
from clipsr.adapt.spec import DomainSpec
from clipsr.bench.inference import environment
from clipsr.evaluate import evaluate
from clipsr.factory import load_upscaler


def bench_adaptation(
    source: str, domains: dict[str, str], shots: int, scopes: list[str], budget_seconds: float,
    threads: int, seed: int = 0,
) -> dict[str, Any]:
    out: dict[str, Any] = {"environment": environment(), "source": source, "shots": shots,
                           "budget_seconds": budget_seconds, "domains": {}}
    with tempfile.TemporaryDirectory() as registry:
        for name, folder in domains.items():
            base = evaluate(load_upscaler(source), {name: folder}, skip_first=shots)["datasets"][name]
            d: dict[str, Any] = {"source_psnr_y": base["psnr_y"], "eval_images": base["images"], "runs": {}}
            print(f"[{name}] source model: {base['psnr_y']:.3f} dB on {base['images']} unseen images", flush=True)
            for scope in scopes:
                t0 = time.perf_counter()
                row = adapt_one(DomainSpec.shorthand(f"{name}={folder}", shots, None), source,
                                AdaptSettings(scope=scope, budget_seconds=budget_seconds, seed=seed),
                                f"{registry}/{scope.replace('+', '-')}", {"arch": "color-stats"}, threads)
                seconds = time.perf_counter() - t0
                if row["status"] != "ok":
                    d["runs"][scope] = {"error": row["error"]}
                    print(f"[{name}] {scope}: failed: {row['error']}", flush=True)
                    continue
                ref = f"{registry}/{scope.replace('+', '-')}/{name}/v{row['version']}"
                score = evaluate(load_upscaler(ref), {name: folder}, skip_first=shots)["datasets"][name]
                d["runs"][scope] = {
                    "psnr_y": score["psnr_y"], "gain_db": score["psnr_y"] - base["psnr_y"],
                    "adapt_seconds": seconds, "steps": row["steps"], "lr": row["lr"],
                    "heldout_gain_db": row["gain_db"], "promoted": row["promoted"],
                }
                print(f"[{name}] {scope}: {score['psnr_y']:.3f} dB ({score['psnr_y'] - base['psnr_y']:+.3f}), "
                      f"{row['steps']} steps at lr {row['lr']:g}, {seconds:.0f} s", flush=True)
            out["domains"][name] = d
    return out
