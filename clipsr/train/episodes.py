"""Meta-learning episodes (first-order, Reptile) and the fast-adaptation inner loop they rehearse.

An episode takes a pseudo-domain (a group of source images), runs a few inner steps on the
adaptation parameters only, then moves those parameters a fraction ``meta_lr`` of the way
towards the adapted values. Interleaved with ordinary training, this pulls the source model
towards a point from which a few steps on a new domain's exemplars go far (Nichol et al., 2018).
With several workers the episode deltas are averaged, so replicas stay identical.
"""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


def as_laid_out(grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``grad`` in ``param``'s memory layout. oneDNN's bf16 convolutions return a weight's gradient
    channels-last while the weight is contiguous; a fused Adam reads both as the same memory, so
    without this each element of a weight moves by another element's gradient (CPU, torch 2.14)."""
    if grad.stride() == param.stride():
        return grad
    return torch.empty_like(param).copy_(grad)


def inner_loop(
    model: nn.Module,
    params: list[nn.Parameter],
    batches: Iterable[Batch],
    lr: float,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer | None = None,
) -> list[float]:
    """Adam steps on ``params`` only (or steps of ``optimizer``, built over them); returns each loss.

    Gradients come from ``torch.autograd.grad`` rather than ``.backward()``, so nothing else's
    ``.grad`` is touched (and a DistributedDataParallel wrapper's hooks stay out of it).
    """
    opt = optimizer if optimizer is not None else torch.optim.Adam(params, lr=lr)
    losses = []
    for lr_img, hr_img, emb in batches:
        loss = loss_fn(model(lr_img, emb), hr_img)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for p, g in zip(params, grads):
            p.grad = None if g is None else as_laid_out(g.detach(), p)
        opt.step()
        losses.append(float(loss.detach()))
    for p in params:
        p.grad = None
    return losses


def reptile_episode(
    model: nn.Module,
    params: list[nn.Parameter],
    batches: Iterable[Batch],
    inner_lr: float,
    meta_lr: float,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> float:
    """One first-order meta-update of ``params``; returns the mean inner loss."""
    start = [p.detach().clone() for p in params]
    losses = inner_loop(model, params, batches, inner_lr, loss_fn)
    with torch.no_grad():
        deltas = [p - s for p, s in zip(params, start)]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flat = torch.cat([d.reshape(-1) for d in deltas])
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
            deltas = list(torch.split(flat, [d.numel() for d in deltas]))
        for p, s, d in zip(params, start, deltas):
            p.copy_(s + meta_lr * d.reshape(p.shape))
    return float(np.mean(losses))


def kmeans(x: np.ndarray, k: int, seed: int, iters: int = 50) -> np.ndarray:
    """Cluster labels of rows of ``x`` (Lloyd's algorithm, k-means++ start, cosine-ready inputs)."""
    n = len(x)
    k = min(k, n)
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(n)]]
    for _ in range(1, k):
        d2 = np.min([((x - c) ** 2).sum(1) for c in centres], axis=0)
        centres.append(x[rng.choice(n, p=d2 / d2.sum()) if d2.sum() > 0 else rng.integers(n)])
    c = np.stack(centres)
    labels = np.zeros(n, dtype=int)
    for _ in range(iters):
        labels = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
        new = np.stack([x[labels == j].mean(0) if (labels == j).any() else c[j] for j in range(k)])
        if np.allclose(new, c):
            break
        c = new
    return labels
