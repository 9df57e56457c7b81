"""Adapting a source model to one domain from a few HR exemplars ("shots").

A fixed number of training steps (``steps``), in two phases, with the last ``holdout`` shots (in
sorted order) kept out of training throughout:

1. **Hold.** The first ``probe_fraction`` of the steps run at a constant learning rate. With several
   candidates (scope, learning rate), each trains its own copy of the source model through this
   phase and is scored on the held-out shots; the best there wins. With one (the default), nothing
   is scored here: there is nothing to choose.
2. **Decay.** The winner's trajectory (weights and optimiser state) goes on over the same shots
   for the rest of the steps, its learning rate decayed along a cosine to ``final_lr_ratio`` of the
   start: nothing trained in the probe is thrown away, and the last steps are small.

Steps, not seconds, are the budget, so the same exemplars, seed and settings give the same
weights on a fast machine and on a busy one (bit for bit on a CPU with the same thread count).
``budget_seconds`` is only a safety cap: a domain that reaches it stops training there and records
"time cap" as the reason, where a normal run records "steps".

Every step samples aligned patches of the exemplars degraded whole (clipsr.adapt.shots), measures
the L1 distance of luma (the channel the domain is scored on), warms its learning rate up over the
first ``warmup_steps``, runs in bf16 where the CPU computes it natively, and updates the weights
with a fused Adam.

A source model conditioned on a CLIP encoder is adapted and scored as inference will run it: each
patch is conditioned on the embedding of its exemplar's whole LR (what inference embeds is the LR
input), and the held-out shots are scored through the same upscaler, encoder included. A model
without an encoder trains and is scored on its null embedding.

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
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from clipsr import imaging, inference
from clipsr.adapt.settings import AdaptSettings
from clipsr.adapt.shots import ShotPair, ShotSampler, degrade_shots
from clipsr.inference import NetworkUpscaler
from clipsr.metrics import Y_WEIGHTS, psnr
from clipsr.models.cdasr import CDASR
from clipsr.train.episodes import inner_loop

if TYPE_CHECKING:  # open_clip is a heavy import, and only conditioned models need it
    from clipsr.clip import ImageEncoder

#: Why training stopped: every planned step ran, or the safety cap on seconds was reached first.
STOP_STEPS, STOP_TIME_CAP = "steps", "time cap"

#: ``on_progress(steps done, steps planned, latest held-out gain or None, phase)``, called after
#: every step and around each held-out scoring.
OnProgress = Callable[[int, int, "float | None", str], None]


@dataclass
class AdaptResult:
    model: CDASR
    scope: str
    lr: float
    steps: int  # steps the returned weights trained (hold and decay)
    probe_steps: int  # of which at the constant learning rate
    stop_reason: str  # STOP_STEPS or STOP_TIME_CAP
    shot_lrs: list[np.ndarray]  # each shot degraded whole (uint8): what inference would be given
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
    fp32 one (docs/benchmarks.md); fp32 elsewhere, GPUs included: on an H200 the small network's
    steps are bound by kernel launches, and bf16's casts made them slower (22 ms against 19)."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, got {precision!r}")
    return inference.resolve_precision(precision, device)  # the same rule as inference


def heldout_psnr(model: CDASR, meta: dict[str, Any], pairs: list[ShotPair], device: str = "cpu",
                 encoder: ImageEncoder | None = None) -> float:
    """Mean Y-PSNR of ``model`` on whole exemplars under the evaluation protocol (fp32; the same
    figure as ``clipsr evaluate`` with the same encoder, from the LR each exemplar was degraded to
    once, and without the SSIM that evaluation adds)."""
    scale = int(meta["scale"])
    up = NetworkUpscaler(model, meta, encoder=encoder, device=device)
    return float(np.mean([
        psnr(imaging.to_uint8(up.upscale(p.lr.astype(np.float32) / 255.0)), p.hr, crop_border=scale)
        for p in pairs
    ]))


def rgb_l1(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over R, G and B, in fp32 whatever precision the network ran in."""
    return F.l1_loss(sr.float(), hr)


def luma_l1(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """Mean absolute error of BT.601 luma, in fp32: the network's few steps go where Y-PSNR looks."""
    w = torch.tensor(Y_WEIGHTS / 255.0, dtype=torch.float32, device=sr.device).view(1, 3, 1, 1)
    return F.l1_loss((sr.float() * w).sum(1), (hr * w).sum(1))


LOSSES = {"l1": rgb_l1, "luma-l1": luma_l1}


def scheduled_lr(lr: float, step: int, s: AdaptSettings) -> float:
    """The learning rate of step ``step`` (0-based, warm-up aside): ``lr`` through the hold, then a
    cosine down to ``final_lr_ratio * lr`` at the last step."""
    hold = s.hold_steps()
    if step < hold:
        return lr
    low = lr * s.final_lr_ratio
    return low + 0.5 * (lr - low) * (1 + math.cos(math.pi * (step - hold) / max(1, s.steps - hold)))


class Trajectory:
    """A copy of the source model being tuned: its parameters in ``scope``, their Adam state, and
    the shots it samples patches from."""

    def __init__(self, source: CDASR, scope: str, lr: float, pairs: list[ShotPair], s: AdaptSettings,
                 embeddings: torch.Tensor | None = None) -> None:
        self.model = copy.deepcopy(source).to(s.device).train()
        self.scope, self.lr, self.s = scope, lr, s
        self.autocast = {"device_type": torch.device(s.device).type, "dtype": torch.bfloat16,
                         "enabled": resolve_precision(s.precision, s.device) == "bf16"}
        self.params = self.model.adaptation_parameters(scope)
        # Fused: one kernel over every weight instead of a dozen small ops each; a domain took 140 s
        # on one CPU thread instead of 158 (docs/benchmarks.md, "Few-shot adaptation"). It relies
        # on inner_loop handing it gradients laid out as their weights.
        self.opt = torch.optim.Adam(self.params, lr=lr, fused=True)
        self.loss = LOSSES[s.loss]
        self.steps = 0
        self.sampler = ShotSampler(pairs, self.model.scale, s.patch_side(self.model.scale), seed=s.seed, tries=s.patch_tries)
        self.embeddings = None if embeddings is None else embeddings.to(s.device)  # [shots, D], by shot index

    def step(self, lr: float) -> None:
        """One Adam step at ``lr``, scaled down linearly over the first ``warmup_steps``: Adam's
        first updates move every weight by about the learning rate whatever its gradient, which
        costs a tuned model more than its first hundred steps win back."""
        lr *= min(1.0, (self.steps + 1) / max(self.s.warmup_steps, 1))
        for group in self.opt.param_groups:
            group["lr"] = lr
        lr_img, hr_img, shots = self.sampler.sample(self.s.batch)
        emb = None if self.embeddings is None else self.embeddings[shots]
        batch = [(lr_img.to(self.s.device), hr_img.to(self.s.device), emb)]
        with torch.autocast(**self.autocast):
            inner_loop(self.model, self.params, batch, lr, self.loss, optimizer=self.opt)
        self.steps += 1

    def run_to(self, steps: int, deadline: float, after_step: Callable[[], None] = lambda: None) -> bool:
        """Scheduled steps until ``steps`` have run in all; False if ``deadline`` (a
        ``time.perf_counter()`` value) came first."""
        while self.steps < steps:
            if time.perf_counter() >= deadline:
                return False
            self.step(scheduled_lr(self.lr, self.steps, self.s))
            after_step()
        return True


def shot_embeddings(pairs: list[ShotPair], encoder: ImageEncoder | None) -> torch.Tensor | None:
    """[shots, D]: each exemplar's whole LR embedded once, as inference embeds its input (None
    without an encoder: the null embedding)."""
    if encoder is None:
        return None
    return torch.from_numpy(encoder.embed_images([p.lr for p in pairs]))


def adapt_domain(source: CDASR, meta: dict[str, Any], shots: list[np.ndarray], s: AdaptSettings,
                 encoder: ImageEncoder | None = None, on_progress: OnProgress | None = None) -> AdaptResult:
    """Adapt ``source`` to the domain of ``shots`` (uint8 HxWx3 HR images, in sorted order);
    ``encoder``: the CLIP encoder the source model is conditioned on (see ``load_encoder_for``)."""
    t0 = time.perf_counter()
    deadline = t0 + s.budget_seconds if s.budget_seconds else math.inf
    if s.steps < 1:
        raise ValueError(f"steps must be >= 1, got {s.steps}")
    if s.holdout < 1:
        raise ValueError(f"the gate needs at least one held-out exemplar, got holdout={s.holdout}")
    if len(shots) < s.holdout + 1:
        raise ValueError(f"need at least {s.holdout + 1} exemplars, got {len(shots)}")
    pairs = degrade_shots(shots, source.scale, s.patch_side(source.scale), s.degradation, s.seed)
    torch.manual_seed(s.seed)
    n_fit = len(shots) - s.holdout
    fit, held = pairs[:n_fit], pairs[n_fit:]
    embeddings = shot_embeddings(pairs, encoder)
    before = heldout_psnr(source, meta, held, s.device, encoder)

    curve: dict[str, list[tuple[int, float]]] = {}
    hold, total = s.hold_steps(), s.planned_steps()
    done, gain, phase = 0, None, "train"

    def progress() -> None:
        nonlocal done
        done += 1
        if on_progress is not None:
            on_progress(done, total, gain, phase)

    on_time = True
    if len(s.candidates) == 1:
        chosen = Trajectory(source, *s.candidates[0], fit, s, embeddings)
    else:  # every candidate through the hold, then the best on the held-out shots
        probed: list[tuple[float, Trajectory]] = []
        for scope, lr in s.candidates:
            trajectory = Trajectory(source, scope, lr, fit, s, embeddings)
            phase = f"probe {scope}@{lr:g}"
            on_time = trajectory.run_to(hold, deadline, progress)
            score = heldout_psnr(trajectory.model, meta, held, s.device, encoder)
            curve[f"{scope}@{lr:g}"] = [(trajectory.steps, score)]
            probed.append((score, trajectory))
            if not on_time:
                break
        best, chosen = max(probed, key=lambda p: p[0])
        gain, phase = best - before, "train"
    on_time = on_time and chosen.run_to(s.steps, deadline, progress)
    if on_progress is not None:
        on_progress(done, total, gain, "scoring")
    after = heldout_psnr(chosen.model, meta, held, s.device, encoder)
    if on_progress is not None:
        on_progress(done, total, after - before, "scored")
    curve.setdefault(f"{chosen.scope}@{chosen.lr:g}", []).append((chosen.steps, after))
    return AdaptResult(chosen.model.cpu().eval(), chosen.scope, chosen.lr, chosen.steps, min(hold, chosen.steps),
                       STOP_STEPS if on_time else STOP_TIME_CAP, [p.lr for p in pairs], list(range(n_fit)),
                       list(range(n_fit, len(shots))), before, after, curve, time.perf_counter() - t0)


def plain_finetune(source: CDASR, shots: list[np.ndarray], lr: float, steps: int, s: AdaptSettings,
                   encoder: ImageEncoder | None = None) -> CDASR:
    """The baseline: every weight, one fixed learning rate, RGB L1, no warm-up, all shots, for
    ``steps`` steps (no selection, nothing held out)."""
    plain = dataclasses.replace(s, patch_tries=1, loss="l1", warmup_steps=0)
    pairs = degrade_shots(shots, source.scale, s.patch_side(source.scale), s.degradation, s.seed)
    trajectory = Trajectory(source, "all", lr, pairs, plain, shot_embeddings(pairs, encoder))
    for _ in range(steps):
        trajectory.step(lr)
    return trajectory.model.cpu().eval()
