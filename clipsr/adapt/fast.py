"""Adapting a source model to one domain from a few HR exemplars ("shots").

Within a time budget, in two phases:

1. **Probe.** Each candidate (scope, learning rate) trains its own copy of the source model on all
   shots but the last ``holdout`` (in sorted order) for an equal share of ``probe_fraction`` of the
   budget, and is scored on the held-out shots. The best candidate wins if it beats the source
   model there; otherwise the source model is kept (0 steps, not promoted).
2. **Continue.** The winner's trajectory (weights and optimiser state) goes on over *all* the
   shots for the rest of the budget, its learning rate decayed along a cosine to
   ``final_lr_ratio`` of the start: nothing trained in the probe is thrown away, and the last steps
   are small.

The held-out score of the winner in phase 1 (taken before phase 2 sees the held-out shots) is the
honest estimate of the gain, and decides promotion. Scope ``adaptive+bias`` changes only the
domain-adaptive module and the biases (a small delta on the shared source model); ``all`` tunes
every weight.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from clipsr.adapt.settings import AdaptSettings
from clipsr.evaluate import score_image
from clipsr.inference import NetworkUpscaler
from clipsr.models.cdasr import CDASR
from clipsr.train.data import PatchSampler, TrainImage
from clipsr.train.episodes import inner_loop


@dataclass
class AdaptResult:
    model: CDASR
    scope: str
    lr: float
    steps: int  # probe + continuation steps of the chosen candidate (0: the source model kept)
    probe_steps: int
    heldout_before: float
    heldout_after: float  # the chosen candidate's held-out score at the end of the probe
    curve: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def gain_db(self) -> float:
        return self.heldout_after - self.heldout_before


def heldout_psnr(model: CDASR, meta: dict[str, Any], images: list[np.ndarray], scale: int) -> float:
    """Mean Y-PSNR of ``model`` on whole HR images under the evaluation protocol."""
    up = NetworkUpscaler(model, {**meta, "clip_encoder": None}, encoder=None)
    return float(np.mean([score_image(up, hr, scale)["psnr_y"] for hr in images]))


class Trajectory:
    """A copy of the source model being tuned: its parameters in ``scope``, their Adam state, and
    the shots it samples patches from (which can be widened to all shots part-way)."""

    def __init__(self, source: CDASR, scope: str, lr: float, shots: list[np.ndarray], s: AdaptSettings) -> None:
        self.model = copy.deepcopy(source).train()
        self.scope, self.lr, self.s = scope, lr, s
        self.params = self.model.adaptation_parameters(scope)
        self.opt = torch.optim.Adam(self.params, lr=lr)
        self.steps = 0
        self.train_seconds = 0.0
        self.use(shots)

    def use(self, shots: list[np.ndarray]) -> None:
        self.sampler = PatchSampler([TrainImage(str(i), 0, img) for i, img in enumerate(shots)],
                                    self.model.scale, self.s.lr_patch, seed=self.s.seed + self.steps,
                                    tries=self.s.patch_tries)

    def step(self, lr: float) -> None:
        started = time.perf_counter()
        for group in self.opt.param_groups:
            group["lr"] = lr
        lr_img, hr_img, _ = self.sampler.sample(self.s.batch)
        inner_loop(self.model, self.params, [(lr_img, hr_img, None)], lr, F.l1_loss, optimizer=self.opt)
        self.steps += 1
        self.train_seconds += time.perf_counter() - started

    def run_for(self, seconds: float, max_steps: int) -> None:
        """Constant-lr steps until ``seconds`` have passed (checked every ``chunk`` steps)."""
        started = time.perf_counter()
        done = 0
        while done < max_steps and time.perf_counter() - started < seconds:
            for _ in range(min(self.s.chunk, max_steps - done)):
                self.step(self.lr)
                done += 1

    def decay(self, steps: int) -> None:
        """``steps`` steps with the learning rate on a cosine from ``lr`` to ``final_lr_ratio * lr``."""
        low = self.lr * self.s.final_lr_ratio
        for i in range(steps):
            self.step(low + 0.5 * (self.lr - low) * (1 + math.cos(math.pi * i / steps)))

    def seconds_per_step(self) -> float:
        return self.train_seconds / max(self.steps, 1)


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
    before = heldout_psnr(source, meta, held, source.scale)

    curve: dict[str, list[tuple[int, float]]] = {}
    best: tuple[float, Trajectory] | None = None
    share = s.budget_seconds * s.probe_fraction / len(s.candidates)
    for scope, lr in s.candidates:
        trajectory = Trajectory(source, scope, lr, fit, s)
        trajectory.run_for(share, s.max_steps)
        score = heldout_psnr(trajectory.model, meta, held, source.scale)
        curve[f"{scope}@{lr:g}"] = [(trajectory.steps, score)]
        if score > before and (best is None or score > best[0]):
            best = (score, trajectory)
    if best is None:
        return AdaptResult(copy.deepcopy(source).eval(), s.candidates[0][0], 0.0, 0, 0, before, before,
                           curve, time.perf_counter() - t0)

    score, chosen = best
    probe_steps = chosen.steps
    left = s.budget_seconds - (time.perf_counter() - t0)
    steps = min(s.max_steps, max(0, int(left / chosen.seconds_per_step())))
    chosen.use(shots)
    chosen.decay(steps)
    return AdaptResult(chosen.model.eval(), chosen.scope, chosen.lr, chosen.steps, probe_steps, before, score,
                       curve, time.perf_counter() - t0)


def plain_finetune(source: CDASR, shots: list[np.ndarray], lr: float, seconds: float, s: AdaptSettings) -> CDASR:
    """The baseline: every weight, one fixed learning rate, all shots, for ``seconds`` (no selection)."""
    trajectory = Trajectory(source, "all", lr, shots, dataclasses.replace(s, patch_tries=1))
    trajectory.run_for(seconds, s.max_steps)
    return trajectory.model.eval()
