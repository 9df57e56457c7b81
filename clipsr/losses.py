"""Training losses: pixel (L1), perceptual (VGG features), semantic consistency (CLIP cosine).

The paper publishes no loss weights, so they are configuration (:class:`LossWeights`); a term is
computed only when its weight is > 0, and a positive weight without its network is an error rather
than a silently missing term. Feature networks are always loaded from explicit weights and carry
an identity (arch + sha256) for run metadata.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.vgg import cfgs as _VGG_CFGS, make_layers

from clipsr.clip import ImageEncoder, read_weights, weights_label
from clipsr.digest import tensors_sha256

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_VGG_LAYOUTS = {"vgg11": "A", "vgg13": "B", "vgg16": "D", "vgg19": "E"}


def _check_pair(sr: torch.Tensor, hr: torch.Tensor) -> None:
    if sr.shape != hr.shape:
        raise ValueError(f"SR and HR batches must have the same shape, got {tuple(sr.shape)} and {tuple(hr.shape)}")


def pixel_loss(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """Mean absolute error."""
    _check_pair(sr, hr)
    return F.l1_loss(sr, hr)


def vgg_layer_names(arch: str) -> list[str]:
    """Names of torchvision's VGG ``features`` entries: conv1_1, relu1_1, ..., pool1, conv2_1, ..."""
    if arch not in _VGG_LAYOUTS:
        raise ValueError(f"unknown perceptual network {arch!r}; use one of {sorted(_VGG_LAYOUTS)}")
    names, block, index = [], 1, 1
    for entry in _VGG_CFGS[_VGG_LAYOUTS[arch]]:
        if entry == "M":
            names.append(f"pool{block}")
            block, index = block + 1, 1
        else:
            names += [f"conv{block}_{index}", f"relu{block}_{index}"]
            index += 1
    return names


class PerceptualLoss(nn.Module):
    """Weighted L1 between VGG features of SR and HR (inputs in [0, 1], ImageNet-normalised).

    Only the part of ``features`` up to the deepest requested layer is built, so shallow layer
    choices stay cheap. Build it with :meth:`from_weights`: there is no randomly initialised variant.
    """

    def __init__(self, features: nn.Sequential, layers: Mapping[str, float], arch: str, identity: dict[str, Any]):
        super().__init__()
        self.features = features
        self.layers = dict(layers)
        self.arch = arch
        self._identity = identity
        names = vgg_layer_names(arch)
        self._indices = {names.index(name): name for name in self.layers}
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.features.eval()
        for param in self.features.parameters():
            param.requires_grad_(False)

    @classmethod
    def from_weights(cls, weights: str, layers: Mapping[str, float] | None = None, arch: str = "vgg19",
                     cache_dir: str | os.PathLike | None = None) -> "PerceptualLoss":
        """Load a torchvision VGG state dict (full model or ``features`` only) from a path or URI.

        ``layers`` maps layer names (e.g. "conv5_4", "relu2_2", see :func:`vgg_layer_names`) to
        weights; the default is BasicSR's {"conv5_4": 1.0} (before the activation).
        """
        layers = dict(layers or {"conv5_4": 1.0})
        names = vgg_layer_names(arch)
        unknown = sorted(set(layers) - set(names))
        if not layers or unknown:
            raise ValueError(f"unknown {arch} layers {unknown or '(none given)'}; choose from {names}")
        if any(not math.isfinite(w) or w < 0 for w in layers.values()):
            raise ValueError(f"layer weights must be finite and >= 0, got {layers}")
        state = read_weights(weights, cache_dir)
        sha256 = tensors_sha256(state)  # of the file's tensors, whichever layers are used
        if any(key.startswith("features.") for key in state):
            state = {key[len("features."):]: value for key, value in state.items() if key.startswith("features.")}
        depth = max(names.index(name) for name in layers) + 1
        features = make_layers(_VGG_CFGS[_VGG_LAYOUTS[arch]])[:depth]
        for module in features:
            if isinstance(module, nn.ReLU):
                module.inplace = False  # an in-place ReLU would overwrite captured conv outputs
        # keep the layers this loss uses; anything unexpected stays in and fails the strict load
        used = {key: value for key, value in state.items()
                if not key.split(".", 1)[0].isdigit() or int(key.split(".", 1)[0]) < depth}
        try:
            features.load_state_dict(used, strict=True)
        except RuntimeError as exc:
            raise ValueError(
                f"weights {weights_label(weights)} are not a torchvision {arch} state dict: {str(exc)[:600]}"
            ) from exc
        identity = {"arch": arch, "layers": layers, "weights": weights_label(weights),
                    "sha256": sha256}
        return cls(features, layers, arch, identity)

    @property
    def identity(self) -> dict[str, Any]:
        """arch, layers, weights label and sha256 of the loaded tensors, for run metadata."""
        return dict(self._identity, layers=dict(self.layers))

    def train(self, mode: bool = True) -> "PerceptualLoss":
        super().train(mode)
        self.features.eval()  # frozen: stays in eval mode whatever the trainer does
        return self

    def _features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected images as [B, 3, H, W] (or [B, 1, H, W]), got {tuple(x.shape)}")
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        x = (x - self.mean) / self.std
        out = {}
        for index, module in enumerate(self.features):
            x = module(x)
            if index in self._indices:
                out[self._indices[index]] = x
        return out

    def forward(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        _check_pair(sr, hr)
        sr_features = self._features(sr)
        with torch.no_grad():
            hr_features = self._features(hr)
        return sum(weight * F.l1_loss(sr_features[name], hr_features[name]) for name, weight in self.layers.items())


def semantic_consistency_loss(encoder: ImageEncoder, sr: torch.Tensor, hr: torch.Tensor | None,
                              hr_embedding: torch.Tensor | np.ndarray | None = None) -> torch.Tensor:
    """Mean over the batch of 1 - cos(E(sr), E(hr)); gradients flow to ``sr`` only.

    Pass ``hr_embedding`` ([B, D], e.g. from :meth:`ImageEncoder.embed_images`' cache) to skip
    the HR forward; it must come from the same encoder.
    """
    sr_embedding = encoder.embed_tensor(sr)
    if hr_embedding is None:
        if hr is None:
            raise ValueError("semantic_consistency_loss needs hr or hr_embedding")
        _check_pair(sr, hr)
        with torch.no_grad():
            target = encoder.embed_tensor(hr)
    else:
        target = torch.as_tensor(hr_embedding).to(sr_embedding)
        if target.shape != sr_embedding.shape:
            raise ValueError(f"hr_embedding must have shape {tuple(sr_embedding.shape)}, got {tuple(target.shape)}")
        target = F.normalize(target.detach(), dim=-1)
    return (1.0 - (sr_embedding * target).sum(dim=-1)).mean()


@dataclass(frozen=True)
class LossWeights:
    """Weights of the three terms; 0 switches a term off (the default for the expensive ones)."""

    pixel: float = 1.0
    perceptual: float = 0.0
    semantic: float = 0.0

    def __post_init__(self) -> None:
        values = asdict(self)
        if any(not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 for v in values.values()):
            raise ValueError(f"loss weights must be finite numbers >= 0, got {values}")
        if not any(v > 0 for v in values.values()):
            raise ValueError("at least one loss weight must be > 0")

    @classmethod
    def from_mapping(cls, data: Mapping[str, float]) -> "LossWeights":
        unknown = sorted(set(data) - {"pixel", "perceptual", "semantic"})
        if unknown:
            raise ValueError(f"unknown loss terms {unknown}; use pixel, perceptual, semantic")
        return cls(**data)


class CompositeLoss(nn.Module):
    """pixel * L1 + perceptual * VGG + semantic * (1 - cos CLIP), with per-term values for logging."""

    def __init__(self, weights: LossWeights | Mapping[str, float] = LossWeights(),
                 perceptual: PerceptualLoss | None = None, encoder: ImageEncoder | None = None):
        super().__init__()
        self.weights = weights if isinstance(weights, LossWeights) else LossWeights.from_mapping(weights)
        if self.weights.perceptual > 0 and perceptual is None:
            raise ValueError("perceptual loss weight is > 0 but no perceptual network was given "
                             "(build one with PerceptualLoss.from_weights)")
        if self.weights.semantic > 0 and encoder is None:
            raise ValueError("semantic loss weight is > 0 but no CLIP encoder was given")
        self.perceptual = perceptual if self.weights.perceptual > 0 else None
        self.encoder = encoder if self.weights.semantic > 0 else None

    def forward(self, sr: torch.Tensor, hr: torch.Tensor,
                hr_embedding: torch.Tensor | np.ndarray | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Returns (total, {term: value, ..., "total": value}) with only the active terms listed."""
        _check_pair(sr, hr)
        terms: dict[str, torch.Tensor] = {}
        if self.weights.pixel > 0:
            terms["pixel"] = pixel_loss(sr, hr)
        if self.perceptual is not None:
            terms["perceptual"] = self.perceptual(sr, hr)
        if self.encoder is not None:
            terms["semantic"] = semantic_consistency_loss(self.encoder, sr, hr, hr_embedding)
        total = sum(getattr(self.weights, name) * value for name, value in terms.items())
        logged = {name: float(value.detach()) for name, value in terms.items()}
        logged["total"] = float(total.detach())
        return total, logged
