"""Adapting a source model to one domain from a few HR exemplars ("shots").

Within a time budget, in two phases, with the last ``holdout`` shots (in sorted order) kept out of
training throughout:

1. **Probe.** Each candidate (scope, learning rate) trains its own copy of the source model on the
   other shots for an equal share of ``probe_fraction`` of the budget, and is scored on the
   held-out shots. The best candidate there wins.
2. **Continue.** The winner's trajectory (weights and optimiser state) goes on over the same shots
   for the rest of the budget, its learning rate decayed along a cosine to ``final_lr_ratio`` of
   the start: nothing trained in the probe is thrown away, and the last steps are small.

Every step samples aligned patches of the exemplars degraded whole (clipsr.adapt.shots), measures
the L1 distance of luma (the channel the domain is scored on), warms its learning rate up over the
first ``warmup_steps``, and runs in bf16 where the CPU computes it natively. The chosen candidate
trains on at most ``patches_per_shot`` patches per exemplar trained on, wherever the time budget
would allow more: on ten exemplars, longer runs learn the exemplars rather than their domain.

The weights returned are scored on the held-out shots after their last step, and that score
decides promotion: the gate judges exactly the model that is published, on exemplars it never
saw. The price is two fewer training exemplars (of ten, by default). With several candidates the
held-out shots also chose the winner, which flatters its score a little; the default has one.
Scope ``adaptive+bias`` changes only the domain-adaptive module and the biases (a small delta on
the shared source model); ``all`` tunes every weight.
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
from clipsr.adapt.shots import ShotPair, ShotSampler, degrade_shots
from clipsr.evaluate import score_image
from clipsr import inference
from clipsr.inference import NetworkUpscaler
from clipsr.metrics import Y_WEIGHTS
from clipsr.models.cdasr import CDASR
from clipsr.train.episodes import inner_loop


@dataclass
class AdaptResult:
    model: CDASR
    scope: str
    lr: float
    steps: int  # probe + continuation steps of the chosen candidate
    probe_steps: int
    train_shots: list[int]  # indices of the shots the returned weights trained on
    heldout_shots: list[int]  # the others: they never trained, they choose and score
    heldout_before: float  # the source model on the held-out shots
    heldout_after: float  # the returned weights, after their last step, on the held-out shots
    curve: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def gain_db(self) -> float:
        return self.heldout_after - self.heldout_before


def resolve_precision(precision: str, device: str) -> str:
    """``auto``: bf16 on CPUs with AVX-512 BF16, where a training step of cdasr-lite takes 0.6 of an
    fp32 one (docs/benchmarks.md), so the time budget buys more steps; fp32 elsewhere, GPUs
    included: on an H200 the small network's steps are bound by kernel launches, and bf16's casts
    made them slower (22 ms against 19)."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, got {precision!r}")
    return inference.resolve_precision(precision, device)  # the same rule as inference


def heldout_psnr(model: CDASR, meta: dict[str, Any], images: list[np.ndarray], scale: int,
                 device: str = "cpu") -> float:
    """Mean Y-PSNR of ``model`` on whole HR images under the evaluation protocol (always fp32)."""
    up = NetworkUpscaler(model, {**meta, "clip_encoder": None}, encoder=None, device=device)
    return float(np.mean([score_image(up, hr, scale)["psnr_y"] for hr in images]))


def rgb_l1(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over R, G and B, in fp32 whatever precision the network ran in."""
    return F.l1_loss(sr.float(), hr)


def luma_l1(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """Mean absolute error of BT.601 luma, in fp32: the network's few steps go where Y-PSNR looks."""
    w = torch.tensor(Y_WEIGHTS / 255.0, dtype=torch.float32, device=sr.device).view(1, 3, 1, 1)
    return F.l1_loss((sr.float() * w).sum(1), (hr * w).sum(1))


LOSSES = {"l1": rgb_l1, "luma-l1": luma_l1}


class Trajectory:
    """A copy of the source model being tuned: its parameters in ``scope``, their Adam state, and
    the shots it samples patches from."""

    def __init__(self, source: CDASR, scope: str, lr: float, pairs: list[ShotPair], s: AdaptSettings) -> None:
        self.model = copy.deepcopy(source).to(s.device).train()
        self.scope, self.lr, self.s = scope, lr, s
        self.autocast = {"device_type": torch.device(s.device).type, "dtype": torch.bfloat16,
                         "enabled": resolve_precision(s.precision, s.device) == "bf16"}
        self.params = self.model.adaptation_parameters(scope)
        self.opt = torch.optim.Adam(self.params, lr=lr)
        self.loss = LOSSES[s.loss]
        self.steps = 0
        self.train_seconds = 0.0
        self.sampler = ShotSampler(pairs, self.model.scale, s.lr_patch, seed=s.seed, tries=s.patch_tries)

    def step(self, lr: float) -> None:
        """One Adam step at ``lr``, scaled down linearly over the first ``warmup_steps``: Adam's
        first updates move every weight by about the learning rate whatever its gradient, which
        costs a tuned model more than its first hundred steps win back."""
        started = time.perf_counter()
        lr *= min(1.0, (self.steps + 1) / max(self.s.warmup_steps, 1))
        for group in self.opt.param_groups:
            group["lr"] = lr
        lr_img, hr_img, _ = self.sampler.sample(self.s.batch)
        batch = [(lr_img.to(self.s.device), hr_img.to(self.s.device), None)]
        with torch.autocast(**self.autocast):
            inner_loop(self.model, self.params, batch, lr, self.loss, optimizer=self.opt)
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
    if s.holdout < 1:
        raise ValueError(f"the gate needs at least one held-out exemplar, got holdout={s.holdout}")
    if len(shots) < s.holdout + 1:
        raise ValueError(f"need at least {s.holdout + 1} exemplars, got {len(shots)}")
    pairs = degrade_shots(shots, source.scale, s.lr_patch)
    torch.manual_seed(s.seed)
    n_fit = len(shots) - s.holdout
    held = shots[n_fit:]
    fit = pairs[:n_fit]
    before = heldout_psnr(source, meta, held, source.scale, s.device)

    curve: dict[str, list[tuple[int, float]]] = {}
    probed: list[tuple[float, Trajectory]] = []
    share = s.budget_seconds * s.probe_fraction / len(s.candidates)
    # More steps than this over a few exemplars learns them rather than their domain (measured:
    # on 10 urban100 shots, 3600- and 7200-step runs ended below an 1800-step one on unseen images).
    cap = min(s.max_steps, s.patches_per_shot * len(fit) // s.batch)
    for scope, lr in s.candidates:
        trajectory = Trajectory(source, scope, lr, fit, s)
        trajectory.run_for(share, max(1, int(cap * s.probe_fraction)))
        started = time.perf_counter()
        score = heldout_psnr(trajectory.model, meta, held, source.scale, s.device)
        scoring = time.perf_counter() - started
        curve[f"{scope}@{lr:g}"] = [(trajectory.steps, score)]
        probed.append((score, trajectory))

    _, chosen = max(probed, key=lambda p: p[0])
    probe_steps = chosen.steps
    # Time is kept for scoring the final weights: that score, not the probe's, is the gate.
    left = s.budget_seconds - (time.perf_counter() - t0) - scoring
    chosen.decay(min(cap - probe_steps, max(0, int(left / chosen.seconds_per_step()))))
    after = heldout_psnr(chosen.model, meta, held, source.scale, s.device)
    curve[f"{chosen.scope}@{chosen.lr:g}"].append((chosen.steps, after))
    return AdaptResult(chosen.model.cpu().eval(), chosen.scope, chosen.lr, chosen.steps, probe_steps,
                       list(range(n_fit)), list(range(n_fit, len(shots))), before, after, curve,
                       time.perf_counter() - t0)


def plain_finetune(source: CDASR, shots: list[np.ndarray], lr: float, seconds: float, s: AdaptSettings) -> CDASR:
    """The baseline: every weight, one fixed learning rate, all shots, for ``seconds`` (no selection)."""
    plain = dataclasses.replace(s, patch_tries=1, loss="l1", warmup_steps=0)
    trajectory = Trajectory(source, "all", lr, degrade_shots(shots, source.scale, s.lr_patch), plain)
    trajectory.run_for(seconds, s.max_steps)
    return trajectory.model.cpu().eval()
