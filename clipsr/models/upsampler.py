"""Pixel-shuffle upsamplers for x2, x3, x4 and x8."""
from __future__ import annotations

import math

import torch.nn as nn

SCALES = (2, 3, 4, 8)


def _check_scale(scale: int) -> None:
    if scale not in SCALES:
        raise ValueError(f"unsupported scale x{scale}; supported: {', '.join(f'x{s}' for s in SCALES)}")


def light_upsampler(channels: int, scale: int, out_channels: int = 3) -> nn.Module:
    """One conv to ``out * scale**2`` channels and one shuffle (ESPCN-style): cheapest per pixel."""
    _check_scale(scale)
    return nn.Sequential(
        nn.Conv2d(channels, out_channels * scale * scale, 3, padding=1),
        nn.PixelShuffle(scale),
    )


def progressive_upsampler(channels: int, scale: int, out_channels: int = 3) -> nn.Module:
    """x2 stages (x3 in one), then a conv to RGB (EDSR-style): more capacity at high resolution."""
    _check_scale(scale)
    layers: list[nn.Module] = []
    if scale == 3:
        layers += [nn.Conv2d(channels, channels * 9, 3, padding=1), nn.PixelShuffle(3)]
    else:
        for _ in range(int(math.log2(scale))):
            layers += [nn.Conv2d(channels, channels * 4, 3, padding=1), nn.PixelShuffle(2)]
    layers.append(nn.Conv2d(channels, out_channels, 3, padding=1))
    return nn.Sequential(*layers)


UPSAMPLERS = {"light": light_upsampler, "progressive": progressive_upsampler}
