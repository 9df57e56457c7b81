"""The CLIP-guided domain-adaptive module G of CDASR (METHOD.md, section 1).

G turns SR features F(x) and a CLIP image vector f into aligned features in three stages:

1. CLIP feature processing: ``f_proc = ReLU(W2 ReLU(W1 f + b1) + b2)`` (hidden 1024, output 512);
2. spatial feature generation: ``f_spatial = Conv2(ReLU(Conv1(f_proc)))`` with ``f_proc``
   broadcast over the feature map;
3. fusion: ``f_aligned = Conv_fusion(concat[F(x), f_spatial])``.

``f_proc`` is constant over the map, so Conv1/Conv2 are 1x1 convolutions evaluated once on a 1x1
map and then broadcast: identical to running them on the broadcast map, at the cost of one vector
per image instead of one per pixel. When no CLIP vector is given, a learned null embedding stands
in, so a model works (and can be trained) without an encoder. Training with an encoder replaces
the vectors of some samples by the null embedding (``null_mask``), so that fallback stays trained.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


class DomainAdaptiveModule(nn.Module):
    def __init__(
        self,
        channels: int,
        clip_dim: int = 512,
        mlp_hidden: int = 1024,
        mlp_out: int = 512,
        spatial_hidden: int = 64,
        fusion_kernel: int = 1,
    ) -> None:
        super().__init__()
        if fusion_kernel % 2 != 1:
            raise ValueError(f"fusion_kernel must be odd, got {fusion_kernel}")
        self.clip_dim = clip_dim
        self.mlp = nn.Sequential(
            nn.Linear(clip_dim, mlp_hidden),
            nn.ReLU(inplace=True),
            nn.Linear(mlp_hidden, mlp_out),
            nn.ReLU(inplace=True),
        )
        self.spatial = nn.Sequential(
            nn.Conv2d(mlp_out, spatial_hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(spatial_hidden, channels, 1),
        )
        self.fusion = nn.Conv2d(2 * channels, channels, fusion_kernel, padding=fusion_kernel // 2)
        # A unit vector, like the L2-normalised CLIP vectors it stands in for.
        null = torch.randn(clip_dim)
        self.null_embedding = nn.Parameter(null / null.norm())
        self.register_buffer("folded", None, persistent=False)
        self._init_fusion_as_identity(channels)

    @torch.no_grad()
    def _init_fusion_as_identity(self, channels: int) -> None:
        """Start as a pass-through of F(x) so a fresh module does not disturb the backbone."""
        w = self.fusion.weight
        w.normal_(0.0, 1e-3)
        centre = w.shape[-1] // 2
        w[:, :channels, centre, centre] += torch.eye(channels)
        self.fusion.bias.zero_()

    def condition(self, embedding: torch.Tensor | None, batch: int,
                  null_mask: torch.Tensor | None = None) -> torch.Tensor:
        """f_spatial as a [B, C, 1, 1] tensor: the per-image domain signal. Rows of ``embedding``
        where ``null_mask`` (a [B] bool tensor) is True take the null embedding instead."""
        if self.folded is not None:
            if embedding is not None or null_mask is not None:
                raise ValueError("this module's condition is folded; it takes no CLIP vector")
            return self.folded.expand(batch, -1, -1, -1)
        null = self.null_embedding.unsqueeze(0).expand(batch, -1)
        if embedding is None:
            embedding = null
        elif embedding.shape != (batch, self.clip_dim):
            raise ValueError(
                f"CLIP embedding must have shape ({batch}, {self.clip_dim}), got {tuple(embedding.shape)}"
            )
        elif null_mask is not None:
            # always through torch.where, so the null embedding takes part (a zero gradient when no
            # row is dropped): a replicated model then trains the same parameters at every step
            embedding = torch.where(null_mask.view(batch, 1), null, embedding.to(null.dtype))
        f_proc = self.mlp(embedding.to(self.null_embedding.dtype))
        return self.spatial(f_proc[:, :, None, None])

    def forward(self, feats: torch.Tensor, embedding: torch.Tensor | None = None,
                null_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, _, h, w = feats.shape
        f_spatial = self.condition(embedding, b, null_mask).to(feats.dtype).expand(-1, -1, h, w)
        return self.fusion(torch.cat([feats, f_spatial], dim=1))

    def folded_copy(self, embedding: torch.Tensor | None = None) -> "DomainAdaptiveModule":
        """A copy whose condition is computed once for ``embedding`` (or the null embedding).

        For a model run with one fixed condition (the bundled default, or one domain's model)
        the MLP and spatial convs reduce to one vector; the copy drops them, which is what runs
        at inference and what its parameter count measures.
        """
        with torch.no_grad():
            emb = None if embedding is None else embedding.reshape(1, -1)
            cond = self.condition(emb, 1).detach().clone()
        folded = copy.deepcopy(self)
        del folded.mlp, folded.spatial, folded.null_embedding
        folded.folded = cond
        return folded
