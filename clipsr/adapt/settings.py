"""Settings of few-shot adaptation (no torch here: the command line reads its defaults)."""
from __future__ import annotations

from dataclasses import dataclass

#: Measured on the bundled x4 model of 0.1.0, default-x4-v1 (docs/benchmarks.md): on a CPU budget
#: the adaptive+bias scope barely moves the held-out score, so every weight is tuned; with the
#: warm-up and the cosine decay 2e-3 gained more on unseen urban100 images than 1e-3 or 3e-4. One
#: candidate by default: given 1e-3 and 2e-3, the short probe preferred 1e-3 on urban100 with both
#: seeds tried (a tuned model first loses a little, more so at a higher rate), while 2e-3 ended
#: higher, so probing both spent a quarter of the budget on a choice it got wrong. More candidates
#: can be given to compare.
DEFAULT_CANDIDATES: tuple[tuple[str, float], ...] = (("all", 2e-3),)


@dataclass
class AdaptSettings:
    """How one domain is adapted (see clipsr.adapt.fast); recorded in each registry entry."""

    candidates: tuple[tuple[str, float], ...] = DEFAULT_CANDIDATES
    steps: int = 1000  # training steps of the published weights: the budget
    budget_seconds: float | None = 900.0  # a safety cap on a domain's seconds (None: none), not a budget
    probe_fraction: float = 0.25  # of the steps at a constant rate (each candidate's probe), then the decay
    final_lr_ratio: float = 0.05  # the decay ends at this fraction of the learning rate
    batch: int = 12
    lr_patch: int | None = None  # side of the LR training patches; None: patch_side(scale)
    patch_tries: int = 1  # >1: each patch is the most textured of this many random positions
    warmup_steps: int = 100  # the learning rate ramps up linearly over the first steps
    loss: str = "luma-l1"  # "luma-l1" (BT.601 Y, what the domain is scored on) or "l1" (RGB)
    holdout: int = 2  # the last exemplars, never trained on: they choose the candidate and gate promotion
    seed: int = 0
    device: str = "cpu"  # "cuda" when the domain's task was given a GPU
    precision: str = "auto"  # training arithmetic: auto (bf16 on CPUs with AVX-512 BF16), bf16 or fp32
    # What the domain's archive did to its LR after the bicubic ("clean", "jpeg:Q", "jpeg:Q1-Q2"):
    # the exemplars' LR is degraded the same way, so the model learns the archive's inputs.
    degradation: str = "clean"
    degradation_from: str | None = None  # the archive prefix it was measured from, when it was

    def patch_side(self, scale: int) -> int:
        """LR patch side at ``scale``: 32 px (48 px took 1.7 times as long per domain for nearly the
        same gain on unseen images, docs/benchmarks.md), at most 256 px of HR, so x8 and x16
        exemplars of a few hundred pixels still hold a patch."""
        return self.lr_patch or min(32, 256 // scale)

    def hold_steps(self) -> int:
        """Steps at the constant learning rate (each candidate's probe, with several)."""
        return min(self.steps, max(1, round(self.steps * self.probe_fraction)))

    def planned_steps(self) -> int:
        """Steps a domain trains in all: the published weights', and the losing candidates' probes."""
        return self.steps + self.hold_steps() * (len(self.candidates) - 1)
