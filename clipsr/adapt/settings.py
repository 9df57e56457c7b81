"""Settings of few-shot adaptation (no torch here: the command line reads its defaults)."""
from __future__ import annotations

from dataclasses import dataclass

#: Measured on the bundled x4 model (docs/benchmarks.md): on a CPU budget the adaptive+bias scope
#: barely moves the held-out score, so the candidates tune every weight at two learning rates.
DEFAULT_CANDIDATES: tuple[tuple[str, float], ...] = (("all", 3e-4), ("all", 1e-3))


@dataclass
class AdaptSettings:
    """How one domain is adapted (see clipsr.adapt.fast); recorded in each registry entry."""

    candidates: tuple[tuple[str, float], ...] = DEFAULT_CANDIDATES
    budget_seconds: float = 270.0
    probe_fraction: float = 0.25  # of the budget, shared by the candidates
    final_lr_ratio: float = 0.05  # the continuation decays the learning rate to this fraction
    chunk: int = 10  # steps between looks at the clock
    max_steps: int = 100_000  # a cap on each phase (tests use small ones); the budget binds first
    batch: int = 12
    lr_patch: int = 48
    patch_tries: int = 1  # >1: each patch is the most textured of this many random positions
    holdout: int = 2
    seed: int = 0
