"""Magnitude pruning masks and the rewind-point perturbations of Frankle, Schwab and Morcos (2020).

Conventions: a mask is a bool tensor of the weight's shape, True where the weight survives. Which
tensors are prunable is :func:`prunable_names`: every parameter with two or more dimensions (the
weights of convolutions and linear layers, the read-out included); biases and normalization
parameters are never pruned. Pruning is *global*: one magnitude threshold over every prunable
tensor together, so layers lose different fractions.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import Tensor


def prunable_names(named: Iterable[tuple[str, Tensor]]) -> list[str]:
    """Names of the tensors with ndim >= 2, in the order given."""
    return [n for n, t in named if t.ndim >= 2]


def global_magnitude_masks(weights: Mapping[str, Tensor], masks: Mapping[str, Tensor] | None = None,
                           fraction: float = 0.2) -> dict[str, Tensor]:
    """Prune ``round(fraction * n_alive)`` more weights: the smallest |w| among the surviving ones
    (``masks`` True; all of them if ``masks`` is None) over every tensor of ``weights`` together.

    Returns new bool masks (a pruned weight stays pruned). Ties in |w| are broken by position (the
    tensors in the order of ``weights``, each flattened row-major), so exactly that many are removed.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    names = list(weights)
    alive = [masks[n].bool().ravel() if masks is not None else torch.ones(weights[n].numel(), dtype=torch.bool)
             for n in names]
    mags = torch.cat([weights[n].detach().abs().ravel().double() for n in names])
    keep = torch.cat(alive)
    idx = torch.nonzero(keep).ravel()
    k = int(round(fraction * idx.numel()))
    if k > 0:
        # stable sort: equal magnitudes are removed in position order
        order = torch.sort(mags[idx], stable=True).indices
        keep = keep.clone()
        keep[idx[order[:k]]] = False
    out, i = {}, 0
    for n in names:
        m = weights[n].numel()
        out[n] = keep[i:i + m].view(weights[n].shape).clone()
        i += m
    return out


def sparsity(masks: Mapping[str, Tensor]) -> float:
    """Fraction of the masked weights that are pruned (0 dense, 1 empty)."""
    total = sum(m.numel() for m in masks.values())
    alive = sum(int(m.sum()) for m in masks.values())
    return 1.0 - alive / total if total else 0.0


def sign_reinit(w: Tensor, fresh: Tensor) -> Tensor:
    """Magnitudes of ``fresh`` (a new draw from the init distribution) with the signs of ``w``
    (a weight that is exactly 0 takes the + sign)."""
    return torch.where(w >= 0, 1.0, -1.0).to(w.dtype) * fresh.abs()


def permute_within(w: Tensor, generator: torch.Generator) -> Tensor:
    """The values of ``w`` at a uniformly random permutation of its positions (within the tensor)."""
    perm = torch.randperm(w.numel(), generator=generator)
    return w.ravel()[perm].view(w.shape).clone()


def add_scaled_noise(w: Tensor, std: float, scale: float, generator: torch.Generator) -> Tensor:
    """``w + scale * std * eps`` with eps standard normal; ``std`` is the layer's init std."""
    eps = torch.randn(w.shape, generator=generator, dtype=torch.float64).to(w.dtype)
    return w + scale * std * eps
