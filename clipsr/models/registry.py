"""A tiny name -> class registry, so an architecture config can name its backbone."""
from __future__ import annotations

from typing import Callable, TypeVar

import torch.nn as nn

T = TypeVar("T", bound=type[nn.Module])

BACKBONES: dict[str, type[nn.Module]] = {}


def register_backbone(name: str) -> Callable[[T], T]:
    def wrap(cls: T) -> T:
        if name in BACKBONES:
            raise ValueError(f"backbone {name!r} is registered twice")
        BACKBONES[name] = cls
        return cls

    return wrap


def build_backbone(name: str, channels: int, **kwargs) -> nn.Module:
    try:
        cls = BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; known: {sorted(BACKBONES)}") from None
    return cls(channels=channels, **kwargs)
