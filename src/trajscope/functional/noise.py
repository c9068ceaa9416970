"""Gradient noise: per-sample gradients, the simple noise scale, gradient signal-to-noise ratios, and
the overlap of the gradient with the top Hessian eigenspace.

Conventions. Parameters are those with ``requires_grad``, in ``model.named_parameters()`` order.
``loss_fn(model(x), y)`` is the *mean* loss over a batch; the per-sample gradient g_i is the gradient
of ``loss_fn`` on the batch of one example i (so the batch gradient is the mean of the g_i). Per-sample
gradients are computed with ``torch.func.vmap(grad(functional_call))``, ``chunk_size`` examples at a
time (a loop of the same gradient where the loss cannot be vmapped, e.g. ``F.one_hot``'s checks of
its input; attention runs on its math backend, the same function). Modes: ``train=False``
(default) evaluates the model in eval mode, because with BatchNorm in train mode examples are
coupled through the batch statistics and per-example gradients are not defined; ``train=True``
evaluates train mode on batches of *one* example (each example normalized with its own statistics;
running statistics are never updated). Moments are accumulated in float64.

Estimators (B examples, g_bar their mean gradient, S = sum_i |g_i - g_bar|^2 / (B - 1)):

- ``trace_cov`` = S, unbiased for tr(Sigma), Sigma the covariance of one example's gradient;
- ``grad_sq_norm`` = |g_bar|^2 - S / B = sum_{i != j} <g_i, g_j> / (B (B - 1)), unbiased for |G|^2
  (G the expected gradient), since E|g_bar|^2 = |G|^2 + tr(Sigma) / B. It can be <= 0 when noise
  dominates;
- ``b_simple`` = trace_cov / grad_sq_norm, the simple noise scale of McCandlish et al. (2018),
  B_simple = tr(Sigma) / |G|^2 (a ratio of unbiased estimates, not itself unbiased; negative or
  infinite when the estimate of |G|^2 is <= 0). ``b_simple_biased`` = S / |g_bar|^2.

Signal-to-noise (Liu et al. 2020, "gradient signal to noise ratio"): ``kind="parameter"`` gives, per
group, the mean over its scalar parameters j of r_j = g_bar_j^2 / s_j^2 (s_j^2 the unbiased variance
over examples; parameters with s_j^2 = 0 are left out); ``kind="group"`` gives
|g_bar_group|^2 / tr(S_group), the group's squared mean-gradient norm over its summed variances.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable, Iterator, Mapping, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from trajscope.functional.hvp import trainable_parameters

LossFn = Callable[[Tensor, Tensor], Tensor]


def stat_free_buffers(model: nn.Module, train: bool) -> dict[str, Tensor | None]:
    """Buffers for ``functional_call``: in train mode the running statistics of norm layers are
    replaced by None (batch statistics, no update); in eval mode every buffer as it is."""
    from torch.nn.modules.batchnorm import _NormBase

    out: dict[str, Tensor | None] = dict(model.named_buffers())
    if train:
        for prefix, m in model.named_modules():
            if isinstance(m, _NormBase) and m.track_running_stats:
                for b in ("running_mean", "running_var", "num_batches_tracked"):
                    out[f"{prefix}.{b}" if prefix else b] = None
    return out


@contextlib.contextmanager
def mode(model: nn.Module, train: bool) -> Iterator[None]:
    """Set ``model.train(train)``; restore every module's ``training`` flag on exit."""
    flags = [(m, m.training) for m in model.modules()]
    model.train(train)
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _per_sample_fn(model: nn.Module, loss_fn: LossFn, train: bool):
    """``(params, x (m, ...), y (m,)) -> {name: (m, *shape)}``: vmap over examples of the gradient of
    the loss on one example; where the loss cannot be vmapped (data-dependent code such as
    ``F.one_hot``'s checks), a loop of the same function over the examples."""
    buffers = stat_free_buffers(model, train)

    def loss_one(params: dict, xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(model, {**params, **buffers}, (xi.unsqueeze(0),), strict=False)
        return loss_fn(out, yi.unsqueeze(0))

    batched, one = vmap(grad(loss_one), in_dims=(None, 0, 0)), grad(loss_one)

    def fn(params: dict, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        try:
            with sdpa_kernel([SDPBackend.MATH]):  # the fused CPU attention has no vmap rule
                return batched(params, x, y)
        except RuntimeError as e:
            if "vmap" not in str(e):
                raise
        rows = [one(params, x[i], y[i]) for i in range(len(x))]
        return {n: torch.stack([r[n] for r in rows]) for n in rows[0]}

    return fn


def _chunks(model, loss_fn, x, y, chunk_size: int, train: bool) -> Iterable[dict[str, Tensor]]:
    """Per-sample gradients ``{name: (m, *shape)}`` for successive chunks of m <= chunk_size examples."""
    params = {n: p.detach() for n, p in trainable_parameters(model)}
    fn = _per_sample_fn(model, loss_fn, train)
    with mode(model, train):
        for a in range(0, len(x), chunk_size):
            yield fn(params, x[a:a + chunk_size], y[a:a + chunk_size])


def per_sample_grads(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, *, chunk_size: int = 64,
                     train: bool = False) -> dict[str, Tensor]:
    """Per-sample gradients ``{name: (B, *param.shape)}`` of ``loss_fn`` on each example (module doc)."""
    parts = list(_chunks(model, loss_fn, x, y, chunk_size, train))
    return {n: torch.cat([c[n] for c in parts]) for n in parts[0]}


class GradientMoments(NamedTuple):
    """First and second moments of the per-sample gradients over ``n`` examples, per parameter tensor:
    ``total[name]`` = sum_i g_i and ``total_sq[name]`` = sum_i g_i^2 (elementwise), float64."""

    n: int
    total: dict[str, Tensor]
    total_sq: dict[str, Tensor]

    def mean(self, name: str) -> Tensor:
        return self.total[name] / self.n

    def variance(self, name: str) -> Tensor:
        """Unbiased elementwise variance s_j^2 over examples (shaped like the parameter)."""
        m = self.total[name] / self.n
        return ((self.total_sq[name] - self.n * m * m) / (self.n - 1)).clamp_min(0.0)


def gradient_moments(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, *, chunk_size: int = 64,
                     train: bool = False) -> GradientMoments:
    """:class:`GradientMoments` of the per-sample gradients on (x, y) without storing them all
    (memory O(chunk_size * P)). Needs at least 2 examples."""
    if len(x) < 2:
        raise ValueError(f"gradient moments need at least 2 examples, got {len(x)}")
    total: dict[str, Tensor] = {}
    total_sq: dict[str, Tensor] = {}
    for g in _chunks(model, loss_fn, x, y, chunk_size, train):
        for n, t in g.items():
            t = t.to(torch.float64)
            total[n] = total.get(n, 0) + t.sum(0)
            total_sq[n] = total_sq.get(n, 0) + (t * t).sum(0)
    return GradientMoments(len(x), total, total_sq)


class NoiseScale(NamedTuple):
    """See the module docstring; all floats (squared-gradient units: loss^2 / param^2)."""

    b_simple: float
    trace_cov: float
    grad_sq_norm: float
    b_simple_biased: float


def noise_scale(moments: GradientMoments, names: Iterable[str] | None = None) -> NoiseScale:
    """B_simple = tr(Sigma) / |G|^2 with the unbiased estimates of the module docstring, over the
    parameter tensors ``names`` (default all)."""
    names = list(moments.total) if names is None else list(names)
    B = moments.n
    trace = math.fsum(float(moments.variance(n).sum()) for n in names)
    mean_sq = math.fsum(float(moments.mean(n).pow(2).sum()) for n in names)
    g2 = mean_sq - trace / B
    return NoiseScale(_ratio(trace, g2), trace, g2, _ratio(trace, mean_sq))


def _ratio(a: float, b: float) -> float:
    return a / b if b != 0 else math.copysign(math.inf, a) if a else math.nan


def gradient_snr(moments: GradientMoments, groups: Mapping[str, Iterable[str]] | None = None,
                 kind: str = "parameter") -> dict[str, float]:
    """Signal-to-noise ratio per group (module docstring): ``{group: value}``. ``groups`` maps a group
    name to parameter-tensor names; default: ``"all"`` plus one group per tensor."""
    if kind not in ("parameter", "group"):
        raise ValueError(f"kind must be 'parameter' or 'group', got {kind!r}")
    if groups is None:
        groups = {"all": list(moments.total), **{n: [n] for n in moments.total}}
    out = {}
    for gname, names in groups.items():
        means = torch.cat([moments.mean(n).reshape(-1) for n in names])
        var = torch.cat([moments.variance(n).reshape(-1) for n in names])
        if kind == "group":
            out[gname] = _ratio(float(means.pow(2).sum()), float(var.sum()))
        else:
            keep = var > 0
            out[gname] = float((means[keep].pow(2) / var[keep]).mean()) if keep.any() else math.nan
    return out


def top_subspace_overlap(g: Tensor, vectors: Tensor) -> float:
    """|P g|^2 / |g|^2 with P the orthogonal projector onto the span of the rows of ``vectors``
    (k, P) (e.g. the top-k Hessian eigenvectors; re-orthonormalized by QR, so they need not be
    exactly orthonormal). ``g`` (P,). In [0, 1]; NaN for g = 0 (Gur-Ari et al. 2018)."""
    Q, _ = torch.linalg.qr(vectors.to(torch.float64).T)  # (P, k)
    g = g.to(torch.float64).reshape(-1)
    denom = float(g @ g)
    return float((Q.T @ g).pow(2).sum()) / denom if denom > 0 else math.nan


def batch_gradient(model: nn.Module, loss_fn: LossFn, batch: tuple[Tensor, Tensor],
                   train: bool = True) -> Tensor:
    """The flat (P,) gradient of the mean loss on ``batch`` (trainable parameters, in order), in the
    given mode with no side effect (running statistics not updated, modes restored)."""
    named = trainable_parameters(model)
    params = {n: p.detach() for n, p in named}
    buffers = stat_free_buffers(model, train)
    x, y = batch

    def f(p):
        return loss_fn(functional_call(model, {**p, **buffers}, (x,), strict=False), y)

    with mode(model, train):
        g = grad(f)(params)
    return torch.cat([g[n].reshape(-1) for n, _ in named])


def gradient_top_overlap(model: nn.Module, loss_fn: LossFn, batch: tuple[Tensor, Tensor], k: int, *,
                         train: bool = True, **lanczos) -> tuple[float, object]:
    """(overlap of the batch gradient with the top-k Hessian eigenspace of the same batch, the
    :class:`~trajscope.functional.lanczos.Eigen` used). ``lanczos``: options of
    :func:`~trajscope.functional.hessian.top_hessian_eigenvalues` (tol, max_iter, v0, generator)."""
    from trajscope.functional.hessian import top_hessian_eigenvalues

    eig = top_hessian_eigenvalues(model, loss_fn, batch, k, train=train, **lanczos)
    return top_subspace_overlap(batch_gradient(model, loss_fn, batch, train), eig.vectors), eig
