"""EDSR-style residual CNN (no batch norm): the plain, larger backbone."""
from __future__ import annotations

import torch
import torch.nn as nn

from clipsr.models.registry import register_backbone


class ResBlock(nn.Module):
    def __init__(self, channels: int, res_scale: float = 1.0) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1),
        )
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) * self.res_scale


@register_backbone("rescnn")
class ResCNN(nn.Module):
    """Feature extractor: ``blocks`` residual blocks and a closing conv, with a long skip.

    Maps features [B, C, h, w] to features of the same shape; the head conv and the upsampler
    live in :class:`clipsr.models.CDASR` so every backbone shares them.
    """

    def __init__(self, channels: int, blocks: int = 16, res_scale: float = 1.0) -> None:
        super().__init__()
        self.body = nn.Sequential(*[ResBlock(channels, res_scale) for _ in range(blocks)])
        self.tail = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.tail(self.body(x))
