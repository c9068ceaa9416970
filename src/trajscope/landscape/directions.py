"""Directions in parameter space for loss slices, and the projection of a trajectory onto a plane.

A direction is a dict ``{parameter name: tensor shaped like the parameter}``; a name it lacks counts
as a zero entry.

Filter normalization (Li et al. 2018, "Visualizing the loss landscape of neural nets"): for every
tensor with two or more dimensions, each *filter* d[i] (the slice along dim 0: an output row of a
Linear weight, an output channel of a Conv kernel) is rescaled so that |d[i]| = |w[i]|, w the weights
at the plane's origin. Tensors with fewer than two dimensions (biases, BatchNorm's weight and bias):
``ignore="biasbn"`` (default, as in Li et al.'s plots) sets them to zero, so the slice keeps them at
their origin values; ``ignore=None`` rescales each such tensor as a whole, |d| = |w|. A filter whose
weights are all zero gets a zero direction.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch
from torch import Tensor

Direction = dict[str, Tensor]
IGNORE = ("biasbn", None)


def filter_normalize(direction: Mapping[str, Tensor], weights: Mapping[str, Tensor],
                     ignore: str | None = "biasbn") -> Direction:
    """The filter-normalized copy of ``direction`` against ``weights`` (module docstring)."""
    if ignore not in IGNORE:
        raise ValueError(f"ignore must be 'biasbn' or None, got {ignore!r}")
    out: Direction = {}
    for name, d in direction.items():
        w = weights[name].to(d.dtype)
        if d.dim() < 2:
            out[name] = torch.zeros_like(d) if ignore == "biasbn" else _rescale(d, w)
            continue
        dn = d.flatten(1).norm(dim=1)  # (filters,)
        wn = w.flatten(1).norm(dim=1)
        scale = torch.where(dn > 0, wn / dn.clamp_min(torch.finfo(d.dtype).tiny), torch.zeros_like(dn))
        out[name] = d * scale.view(-1, *([1] * (d.dim() - 1)))
    return out


def _rescale(d: Tensor, w: Tensor) -> Tensor:
    dn = float(d.norm())
    return d * (float(w.norm()) / dn) if dn > 0 else torch.zeros_like(d)


def random_direction(weights: Mapping[str, Tensor], generator: torch.Generator | None = None,
                     ignore: str | None = "biasbn", normalize: bool = True) -> Direction:
    """A standard Gaussian direction shaped like ``weights`` (drawn tensor by tensor, in the mapping's
    order, from ``generator``), filter-normalized against them unless ``normalize=False``."""
    d = {n: torch.randn(w.shape, generator=generator, dtype=w.dtype) for n, w in weights.items()}
    return filter_normalize(d, weights, ignore) if normalize else d


def flat(direction: Mapping[str, Tensor], names: Sequence[str]) -> Tensor:
    """The direction's entries for ``names`` as one flat float64 vector (missing names: zeros need the
    shape, so every name must be present)."""
    return torch.cat([direction[n].reshape(-1).to(torch.float64) for n in names])


def plane_coordinates(points: Iterable[Mapping[str, Tensor]], origin: Mapping[str, Tensor],
                      directions: Sequence[Mapping[str, Tensor]]) -> Tensor:
    """Least-squares coordinates (T, k) float64 of each point in the affine plane origin + span(dirs):
    c = argmin |theta - origin - sum_j c_j d_j|, solved by the k x k normal equations (exact for any
    linearly independent directions, orthonormal or not). Names: those of ``origin``; a name missing
    from a direction is a zero entry there."""
    names = list(origin)
    D = torch.stack([torch.cat([d[n].reshape(-1).to(torch.float64) if n in d else
                                torch.zeros(origin[n].numel(), dtype=torch.float64) for n in names])
                     for d in directions])  # (k, P)
    gram = D @ D.T
    o = flat(origin, names)
    rows = [D @ (flat(p, names) - o) for p in points]  # each (k,)
    if not rows:
        return torch.zeros(0, len(directions), dtype=torch.float64)
    return torch.linalg.solve(gram, torch.stack(rows).T).T
