"""Adapting a source model to one domain from a few HR exemplars ("shots").

Candidates are (scope, learning rate) pairs. The ``adaptive+bias`` scope changes only the
domain-adaptive module and the biases (the set the source model rehearsed in its meta-learning
episodes), so its result is a small delta on the shared source; the ``all`` scope fine-tunes every
weight. Scope, learning rate and step count are chosen without evaluation images: the last shots
(in sorted order) are held out, a trajectory per candidate is scored on them every few steps
within an equal share of the time budget, and the best (scope, learning rate, steps) is then
trained on all the shots. The held-out scores of the selection run are the honest estimate of
the gain, and decide promotion.
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


#: Measured on the bundled x4 model (docs/benchmarks.md): on a CPU budget the bias-only scope
#: moves little, so full fine-tuning at two learning rates is among the candidates.
DEFAULT_CANDIDATES: tuple[tuple[str, float], ...] = (("adaptive+bias", 1e-3), ("all", 2e-4), ("all", 5e-4))


@dataclass
class AdaptSettings:
    candidates: tuple[tuple[str, float], ...] = DEFAULT_CANDIDATES
    max_steps: int = 400  # in practice the time budget stops a candidate first
    eval_every: int = 25
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
    """A copy of ``source`` after ``steps`` steps on ``shots`` (``on_checkpoint`` may stop it early)."""
    model = copy.deepcopy(source)
    _run_into(model, scope, shots, lr, steps, s, on_checkpoint)
    return model.eval()


def _run_into(
    model: CDASR, scope: str, shots: list[np.ndarray], lr: float, steps: int, s: AdaptSettings,
    on_checkpoint: Callable[[int, CDASR], None] | None = None,
) -> None:
    model.train()
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
    # (held-out PSNR, scope, lr, steps); 0 steps = the source model itself
    best: tuple[float, str, float, int] = (before, s.candidates[0][0], 0.0, 0)
    per_candidate = s.budget_seconds * 0.6 / len(s.candidates)
    for scope, lr in s.candidates:
        started = time.perf_counter()
        points: list[tuple[int, float]] = []

        def score(step: int, model: CDASR, points: list = points, started: float = started) -> None:
            points.append((step, heldout_psnr(model, meta, held, scale)))
            if time.perf_counter() - started > per_candidate:
                raise _Budget()

        try:
            _run(source, scope, fit, lr, s.max_steps, s, on_checkpoint=score)
        except _Budget:
            pass
        curve[f"{scope}@{lr:g}"] = points
        for step, psnr in points:
            if psnr > best[0]:
                best = (psnr, scope, lr, step)

    after, scope, lr, steps = best
    model = _run(source, scope, shots, lr, steps, s) if steps > 0 else copy.deepcopy(source).eval()
    return AdaptResult(model, scope, lr, steps, before, after, curve, time.perf_counter() - t0)


def plain_finetune(source: CDASR, shots: list[np.ndarray], lr: float, seconds: float, s: AdaptSettings) -> CDASR:
    """The baseline: every weight, one fixed learning rate, all shots, for ``seconds`` (no selection)."""
    started = time.perf_counter()

    def stop(step: int, model: CDASR) -> None:
        if time.perf_counter() - started > seconds:
            raise _Budget()

    model = copy.deepcopy(source)
    try:
        _run_into(model, "all", shots, lr, 100_000, s, stop)
    except _Budget:
        pass
    return model.eval()


class _Budget(Exception):
    """Internal: a candidate's time budget ran out; its scored points so far still count."""
