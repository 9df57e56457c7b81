"""CDASR: a backbone, the domain-adaptive module G before the upsampler, a bicubic skip."""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from clipsr.models.adaptive import DomainAdaptiveModule
from clipsr.models.registry import build_backbone
from clipsr.models.upsampler import UPSAMPLERS


ADAPTATION_SCOPES = ("adaptive", "adaptive+bias", "all")


class CDASR(nn.Module):
    """CLIP-aware domain-adaptive SR network.

    ``forward(lr, embedding)`` takes LR images [B, 3, h, w] in [0, 1] and optional L2-normalised
    CLIP vectors [B, clip_dim] of the LR images (None: the learned null embedding; ``null_mask``:
    the null embedding for some rows, as conditioned training does) and returns [B, 3, s*h, s*w],
    not clamped (callers clamp when they quantise). The network predicts a residual over a
    bicubic upscale, which makes short CPU training runs converge much faster.
    """

    def __init__(
        self,
        scale: int,
        backbone: str,
        channels: int,
        backbone_args: dict[str, Any] | None = None,
        adaptive: dict[str, Any] | None = None,
        clip_dim: int = 512,
        upsampler: str = "light",
    ) -> None:
        super().__init__()
        if upsampler not in UPSAMPLERS:
            raise ValueError(f"unknown upsampler {upsampler!r}; known: {sorted(UPSAMPLERS)}")
        self.scale = scale
        self.head = nn.Conv2d(3, channels, 3, padding=1)
        self.backbone = build_backbone(backbone, channels, **(backbone_args or {}))
        self.adaptive = DomainAdaptiveModule(channels, clip_dim=clip_dim, **(adaptive or {}))
        self.upsampler = UPSAMPLERS[upsampler](channels, scale)

    def forward(self, lr: torch.Tensor, embedding: torch.Tensor | None = None,
                null_mask: torch.Tensor | None = None) -> torch.Tensor:
        if lr.ndim != 4 or lr.shape[1] != 3:
            raise ValueError(f"expected LR images of shape [B, 3, h, w], got {tuple(lr.shape)}")
        feats = self.backbone(self.head(lr))
        feats = self.adaptive(feats, embedding, null_mask)
        base = F.interpolate(lr, scale_factor=self.scale, mode="bicubic", align_corners=False)
        return self.upsampler(feats) + base

    def adaptation_names(self, scope: str) -> list[str]:
        """Names of the parameters that fast adaptation changes (the set meta-training rehearses).

        ``adaptive``: the domain-adaptive module only. ``adaptive+bias``: that plus every bias of
        the rest of the network, a small set that can shift features per domain. ``all``: every
        weight (plain fine-tuning, the baseline). An adapted model stores only these tensors.
        """
        if scope not in ADAPTATION_SCOPES:
            raise ValueError(f"unknown adaptation scope {scope!r}; known: {ADAPTATION_SCOPES}")
        return [
            name for name, _ in self.named_parameters()
            if scope == "all" or name.startswith("adaptive.") or (scope == "adaptive+bias" and name.endswith(".bias"))
        ]

    def adaptation_parameters(self, scope: str) -> list[nn.Parameter]:
        params = dict(self.named_parameters())
        return [params[n] for n in self.adaptation_names(scope)]

    def folded(self, embedding: torch.Tensor | None = None) -> "CDASR":
        """An equivalent copy for one fixed condition (see DomainAdaptiveModule.folded_copy)."""
        folded_adaptive = self.adaptive.folded_copy(embedding)
        adaptive, self.adaptive = self.adaptive, nn.Identity()
        try:
            clone = copy.deepcopy(self)
        finally:
            self.adaptive = adaptive
        clone.adaptive = folded_adaptive
        return clone


def count_parameters(module: nn.Module) -> int:
    """Parameters plus persistent-or-not buffers that carry learned values (a folded condition)."""
    n = sum(p.numel() for p in module.parameters())
    n += sum(b.numel() for name, b in module.named_buffers() if name.endswith("folded"))
    return n
