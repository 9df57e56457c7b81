"""Adapting a source model to one domain from a few HR exemplars ("shots").

Only the adaptation parameters change (the domain-adaptive module and biases: the set the source
model rehearsed in its meta-learning episodes), so an adapted model is a small delta on a shared
source. Step count and learning rate are chosen without evaluation images: the last shots (in
sorted order) are held out, a short trajectory per candidate learning rate is scored on them,
and the best (learning rate, steps) is then trained on all the shots. The held-out scores of the
selection run are the honest estimate of the gain, and decide promotion.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from clipsr.evaluate import score_image
from clipsr.inference import NetworkUpscaler
from clipsr.models.cdasr import CDASR
from clipsr.train.data import PatchSampler, TrainImage
from clipsr.train.episodes import inner_loop


@dataclass
class AdaptSettings:
    scope: str = "adaptive+bias"
    lrs: tuple[float, ...] = (3e-4, 1e-3)
    max_steps: int = 120
    eval_every: int = 20
    batch: int = 12
    lr_patch: int = 48
    holdout: int = 2
    seed: int = 0
    budget_seconds: float = 270.0


@dataclass
class AdaptResult:
    model: CDASR
    scope: str
    lr: float
    steps: int
    heldout_before: float
    heldout_after: float
    curve: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def gain_db(self) -> float:
        return self.heldout_after - self.heldout_before


def heldout_psnr(model: CDASR, meta: dict[str, Any], images: list[np.ndarray], scale: int) -> float:
    """Mean Y-PSNR of ``model`` on whole HR images under the evaluation protocol."""
    up = NetworkUpscaler(model, {**meta, "clip_encoder": None}, encoder=None)
    return float(np.mean([score_image(up, hr, scale)["psnr_y"] for hr in images]))


def _batches(sampler: PatchSampler, batch: int, steps: int):
    for _ in range(steps):
        lr_img, hr_img, _ = sampler.sample(batch)
        yield lr_img, hr_img, None


def _run(
    source: CDASR, scope: str, shots: list[np.ndarray], lr: float, steps: int, s: AdaptSettings,
    on_checkpoint: Callable[[int, CDASR], None] | None = None,
) -> CDASR:
    model = copy.deepcopy(source).train()
    params = model.adaptation_parameters(scope)
    sampler = PatchSampler([TrainImage(str(i), 0, img) for i, img in enumerate(shots)],
                           model.scale, s.lr_patch, seed=s.seed)
    every = s.eval_every if on_checkpoint else steps
    # one optimiser across chunks: Adam's moments carry over between evaluation points
    opt = torch.optim.Adam(params, lr=lr)
    done = 0
    while done < steps:
        n = min(every, steps - done)
        inner_loop(model, params, _batches(sampler, s.batch, n), lr, F.l1_loss, optimizer=opt)
        done += n
        if on_checkpoint:
            on_checkpoint(done, model)
    return model.eval()


def adapt_domain(source: CDASR, meta: dict[str, Any], shots: list[np.ndarray], s: AdaptSettings) -> AdaptResult:
    """Adapt ``source`` to the domain of ``shots`` (uint8 HxWx3 HR images, in sorted order)."""
    t0 = time.perf_counter()
    if len(shots) < s.holdout + 1:
        raise ValueError(f"need at least {s.holdout + 1} exemplars, got {len(shots)}")
    min_side = s.lr_patch * source.scale
    small = [i for i, img in enumerate(shots) if min(img.shape[:2]) < min_side]
    if small:
        raise ValueError(f"exemplars {small} are smaller than one {min_side}px training patch")
    torch.manual_seed(s.seed)
    fit, held = shots[: -s.holdout], shots[-s.holdout :]
    scale = source.scale
    before = heldout_psnr(source, meta, held, scale)

    curve: dict[str, list[tuple[int, float]]] = {}
    best = (before, 0.0, 0)  # (held-out PSNR, lr, steps); 0 steps = the source model itself
    per_lr_budget = s.budget_seconds * 0.6 / len(s.lrs)
    for lr in s.lrs:
        started = time.perf_counter()
        points: list[tuple[int, float]] = []

        def score(step: int, model: CDASR, lr: float = lr, points: list = points) -> None:
            points.append((step, heldout_psnr(model, meta, held, scale)))
            if time.perf_counter() - started > per_lr_budget:
                raise _Budget()

        try:
            _run(source, s.scope, fit, lr, s.max_steps, s, on_checkpoint=score)
        except _Budget:
            pass
        curve[f"{lr:g}"] = points
        for step, psnr in points:
            if psnr > best[0]:
                best = (psnr, lr, step)

    after, lr, steps = best
    model = _run(source, s.scope, shots, lr, steps, s) if steps > 0 else copy.deepcopy(source).eval()
    return AdaptResult(model, s.scope, lr, steps, before, after, curve, time.perf_counter() - t0)


class _Budget(Exception):
    """Internal: a candidate's time budget ran out; its scored points so far still count."""
