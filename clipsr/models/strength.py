"""The strength of an adapted model: its weights moved only part of the way from its source's.

``weights = source + strength * (adapted - source)``, tensor by tensor, as Real-ESRGAN's
``--denoise_strength`` blends two networks of one architecture (its ``dni``). Strength 1 is the
adapted model as stored, 0 its source. An adapted model is stored as a delta on its source (or
whole, with its source named in its lineage), so the source's weights are at hand whenever the
adapted model is loaded: toning it down costs one pass over the tensors.

A model at a strength below 1 is another model: its id is the adapted model's with ``@s`` and the
strength appended, so the enhancement index sees a change of strength as a change of model and
enhances those inputs again. At strength 1 the id is the stored one.
"""
from __future__ import annotations

import torch


def check_strength(strength: float) -> float:
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"--strength must be in [0, 1], got {strength}")
    return float(strength)


def strength_id(model_id: str, strength: float) -> str:
    """The id of an adapted model at ``strength`` (the stored id at 1)."""
    return model_id if strength == 1.0 else f"{model_id}@s{check_strength(strength)!r}"


def interpolate(source: dict[str, torch.Tensor], adapted: dict[str, torch.Tensor],
                strength: float) -> dict[str, torch.Tensor]:
    """``source + strength * (adapted - source)`` for every floating-point tensor; other tensors
    (counters, integer buffers) are the adapted model's."""
    check_strength(strength)
    if set(source) != set(adapted):
        missing = sorted(set(source) ^ set(adapted))[:3]
        raise ValueError(f"the adapted model and its source have different tensors (e.g. {missing})")
    out = {}
    for name, a in adapted.items():
        s = source[name]
        if s.shape != a.shape:
            raise ValueError(f"tensor {name}: {tuple(a.shape)} in the adapted model, {tuple(s.shape)} in its source")
        out[name] = torch.lerp(s.to(a.dtype), a, strength) if a.is_floating_point() else a
    return out
