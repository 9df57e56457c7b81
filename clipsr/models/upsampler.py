"""Pixel-shuffle upsamplers for x2, x3, x4, x8 and x16."""
from __future__ import annotations

import math

import torch.nn as nn

SCALES = (2, 3, 4, 8, 16)
# x16 in one shuffle would need a conv to 3 * 256 channels (330k weights at 48 channels): two x4
# shuffles through a narrow 16-channel stage keep the whole model under 0.5M parameters.
_X16_MID = 16


def _check_scale(scale: int) -> None:
    if scale not in SCALES:
        raise ValueError(f"unsupported scale x{scale}; supported: {', '.join(f'x{s}' for s in SCALES)}")


def light_upsampler(channels: int, scale: int, out_channels: int = 3) -> nn.Module:
    """One conv to ``out * scale**2`` channels and one shuffle (ESPCN-style): cheapest per pixel.
    x16 takes two x4 shuffles (see ``_X16_MID``)."""
    _check_scale(scale)
    if scale == 16:
        return nn.Sequential(
            nn.Conv2d(channels, _X16_MID * 16, 3, padding=1),
            nn.PixelShuffle(4),
            nn.Conv2d(_X16_MID, out_channels * 16, 3, padding=1),
            nn.PixelShuffle(4),
        )
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
