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


class CDASR(nn.Module):
    """CLIP-aware domain-adaptive SR network.

    ``forward(lr, embedding)`` takes LR images [B, 3, h, w] in [0, 1] and optional L2-normalised
    CLIP vectors [B, clip_dim] (None: the learned null embedding) and returns [B, 3, s*h, s*w],
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

    def forward(self, lr: torch.Tensor, embedding: torch.Tensor | None = None) -> torch.Tensor:
        if lr.ndim != 4 or lr.shape[1] != 3:
            raise ValueError(f"expected LR images of shape [B, 3, h, w], got {tuple(lr.shape)}")
        feats = self.backbone(self.head(lr))
        feats = self.adaptive(feats, embedding)
        base = F.interpolate(lr, scale_factor=self.scale, mode="bicubic", align_corners=False)
        return self.upsampler(feats) + base

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
