"""Curvature of a model's loss: Hessian-vector products, top eigenvalues, trace, spectral density,
preconditioned sharpness for Adam, and the stability threshold of an optimizer.

Conventions (see :mod:`trajscope.functional.hvp` for details): parameters are those with
``requires_grad``, in ``model.parameters()`` order, and a flat vector has shape (P,);
``loss_fn(model(x), y)`` is the mean over a batch, and over a loader (a re-iterable of (x, y)) the
loss is the mean over all its examples; ``train=True`` measures in train mode (BatchNorm on batch
statistics) without any side effect on the model (running statistics and every module's
``training`` flag are restored), ``train=False`` in eval mode, ``None`` in the modes as they are.
``method``: ``"double-backward"`` (default), ``"forward-over-reverse"``, or on one batch of the
Hessian ``"finite-difference"`` / ``"central-difference"`` (differences of gradients with ReLU-type
kinks frozen, :mod:`trajscope.functional.fd_hvp`; top-eigenvalue error up to ~4e-4 / ~3e-4 in
float32 on the mnist1d models) and ``"auto"`` (forward differences where they apply, else double
backward); ``curvature``:
``"hessian"`` or ``"gauss-newton"`` (G = J^T H_L J, J the Jacobian of the outputs, H_L the Hessian of
the loss in the outputs). Eigenvalues are the algebraically largest (the sharpness), not the
largest in magnitude.

>>> import torch
>>> model = torch.nn.Linear(3, 1, bias=False)
>>> x, y = torch.eye(3) * torch.tensor([[1.0], [2.0], [3.0]]), torch.zeros(3, 1)
>>> mse = lambda out, y: 0.5 * ((out - y) ** 2).sum(-1).mean()   # H = x^T x / 3 = diag(1, 4, 9) / 3
>>> round(float(top_hessian_eigenvalues(model, mse, (x, y), tol=1e-6).values[0]), 4)
3.0
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from trajscope.functional.hvp import CurvatureOperator, flatten, measurement_state, trainable_parameters
from trajscope.functional.lanczos import (Eigen, SpectralDensity, TraceEstimate, gaussian, hutchinson_trace,
                                          spectral_density, top_eigenvalues)

LossFn = Callable[[Tensor, Tensor], Tensor]


def _measure(model, loss_fn, data, method, curvature, train, precondition, fn, base=None):
    """Build the operator (optionally d^{-1/2} C d^{-1/2}) in the measurement state and apply fn."""
    with measurement_state(model, train):
        op = CurvatureOperator(model, loss_fn, data, method=method, curvature=curvature, base=base)
        matvec = op
        if precondition is not None:
            s = precondition.to(op.dtype).rsqrt()
            if s.shape != (op.dim,):
                raise ValueError(f"precondition has shape {tuple(s.shape)}, expected ({op.dim},)")
            matvec = lambda v: s * op(s * v)  # noqa: E731
        return fn(matvec, op)


def hessian_vector_product(model: nn.Module, loss_fn: LossFn, data, v: Tensor | Sequence[Tensor], *,
                           method: str = "double-backward", curvature: str = "hessian",
                           train: bool | None = True) -> Tensor | list[Tensor]:
    """C v for a flat (P,) ``v`` (returns flat) or a list shaped like the parameters (returns a list)."""
    def fn(matvec, op):
        flat = v if isinstance(v, Tensor) else flatten(list(v))
        out = matvec(flat)
        return out if isinstance(v, Tensor) else op.unflatten(out)
    return _measure(model, loss_fn, data, method, curvature, train, None, fn)


def top_hessian_eigenvalues(model: nn.Module, loss_fn: LossFn, data, k: int = 1, *, tol: float = 1e-3,
                            max_iter: int = 100, v0: Tensor | None = None,
                            generator: torch.Generator | None = None, method: str = "double-backward",
                            curvature: str = "hessian", train: bool | None = True,
                            precondition: Tensor | None = None,
                            subset_start: int | str | None = "auto", value_tol: float | None = None,
                            base: tuple[float | None, Tensor] | None = None) -> Eigen:
    """The k largest eigenvalues (float64, largest first) and unit eigenvectors ((k, P) flat; use
    ``unflatten(vec, params)`` for tensors shaped like the parameters) by Lanczos with full
    reorthogonalization; ``tol`` bounds each pair's relative residual (see
    :func:`~trajscope.functional.lanczos.top_eigenvalues`). ``v0`` (P,) warm-starts the run.

    ``precondition`` (P,) positive: the eigenpairs of D^{-1/2} C D^{-1/2}, D = diag(precondition),
    whose eigenvalues are those of D^{-1} C (see :func:`preconditioned_sharpness`).

    ``subset_start``: without ``v0``, the start vector can come from a cheap first run on a random
    subset of m examples (:func:`subset_start_vector`); the answer and its stopping rule are those
    of the full data either way, only the number of full-data products drops (on a 1,000-example
    batch, typically from 7-8 to 5 for tol 1e-2). An int m, None (a random start), or
    ``"auto"``: m = 128 when ``data`` is one batch of at least 512 examples, else a random start.

    ``base=(loss, gradient)``: the loss and flat gradient at the current parameters on the one
    batch, if the caller has them (:class:`~trajscope.functional.hvp.CurvatureOperator`): the
    difference methods then save one backward pass.
    """
    def fn(matvec, op):
        start = v0
        m = _subset_size(subset_start, op) if v0 is None else None
        if m is not None:
            start = subset_start_vector(model, loss_fn, op, m, k, generator, precondition)
        return top_eigenvalues(matvec, op.dim, k=k, tol=tol, max_iter=max_iter, v0=start,
                               generator=generator, dtype=op.dtype, device=op.device, value_tol=value_tol)
    return _measure(model, loss_fn, data, method, curvature, train, precondition, fn, base)


SUBSET_AUTO, SUBSET_AUTO_MIN_BATCH, SUBSET_STEPS, SUBSET_MIX = 128, 512, 4, 0.1


def _subset_size(subset_start, op: CurvatureOperator) -> int | None:
    if subset_start is None:
        return None
    if subset_start == "auto":
        return SUBSET_AUTO if op.single and len(op.data[0][0]) >= SUBSET_AUTO_MIN_BATCH else None
    if isinstance(subset_start, bool) or not isinstance(subset_start, int) or subset_start < 1:
        raise ValueError(f"subset_start must be a positive int, None or 'auto', got {subset_start!r}")
    return subset_start


def subset_start_vector(model: nn.Module, loss_fn: LossFn, op: CurvatureOperator, m: int, k: int,
                        generator: torch.Generator | None, precondition: Tensor | None = None) -> Tensor:
    """A start vector (P,) for Lanczos on ``op``: the top-k Ritz vectors of the same curvature on m
    random examples of its (first) batch, after ``SUBSET_STEPS + 2k`` Lanczos steps there (each
    product costs about m / batch of a full one), combined with random weights, plus a random
    Gaussian part of relative norm ``SUBSET_MIX`` (0.1). Why the random part: should the subset's
    top direction miss the full data's (near-degenerate eigenvalues), the full run still starts
    with a component along every eigenvector, as from a random start. Call it inside
    :func:`~trajscope.functional.hvp.measurement_state` (same mode as ``op``)."""
    x, y = op.data[0] if op.single else next(iter(op.data))
    idx = torch.randperm(len(x), generator=generator)[:m].to(x.device)
    sub = CurvatureOperator(model, loss_fn, (x[idx], y[idx]), method=op.method, curvature=op.curvature)
    matvec = sub
    if precondition is not None:
        s = precondition.to(op.dtype).rsqrt()
        matvec = lambda v: s * sub(s * v)  # noqa: E731
    eig = top_eigenvalues(matvec, op.dim, k=k, tol=1e-6, max_iter=min(SUBSET_STEPS + 2 * k, op.dim),
                          generator=generator, dtype=op.dtype, device=op.device)
    w = torch.randn(len(eig.vectors), generator=generator, dtype=torch.float64).to(eig.vectors)
    v = w @ eig.vectors
    r = gaussian(op.dim, generator, op.dtype, op.device)
    return v / v.norm() + SUBSET_MIX * r / r.norm()


def hessian_trace(model: nn.Module, loss_fn: LossFn, data, *, rtol: float = 1e-2, max_samples: int = 1000,
                  min_samples: int = 10, deflate: int = 0, generator: torch.Generator | None = None,
                  method: str = "double-backward", curvature: str = "hessian",
                  train: bool | None = True) -> TraceEstimate:
    """Hutchinson estimate of tr(C) with Rademacher probes: stops when stderr / |mean| < ``rtol`` or
    after ``max_samples``; ``deflate=m`` removes an m-step Krylov subspace first (its trace is exact)
    to cut the variance. Returns (mean, stderr, n, n_matvec)."""
    def fn(matvec, op):
        return hutchinson_trace(matvec, op.dim, rtol=rtol, max_samples=max_samples, min_samples=min_samples,
                                deflate=deflate, generator=generator, dtype=op.dtype, device=op.device)
    return _measure(model, loss_fn, data, method, curvature, train, None, fn)


def hessian_spectral_density(model: nn.Module, loss_fn: LossFn, data, *, n_probes: int = 4, steps: int = 64,
                             generator: torch.Generator | None = None, method: str = "double-backward",
                             curvature: str = "hessian", train: bool | None = True) -> SpectralDensity:
    """SLQ nodes and weights (n_probes, steps) of C's spectral density; evaluate a Gaussian-broadened
    density with ``.density(grid, sigma)`` (it integrates to 1: the eigenvalue distribution / P)."""
    def fn(matvec, op):
        return spectral_density(matvec, op.dim, n_probes=n_probes, steps=steps, generator=generator,
                                dtype=op.dtype, device=op.device)
    return _measure(model, loss_fn, data, method, curvature, train, None, fn)


# ---- optimizers: Adam's preconditioner and stability thresholds ------------------------------------


def _group_of(optimizer: torch.optim.Optimizer, p: Tensor) -> dict:
    for group in optimizer.param_groups:
        if any(q is p for q in group["params"]):
            return group
    raise ValueError("a trainable parameter of the model is not in the optimizer")


def adam_preconditioner(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> Tensor:
    """Adam's diagonal P = sqrt(v_hat) + eps as a flat (P,) vector over ``params``.

    v = ``optimizer.state[p]["exp_avg_sq"]`` (``"max_exp_avg_sq"`` with amsgrad), v_hat = v / (1 -
    beta2 ** step) with ``step`` = ``state[p]["step"]`` and beta2, eps from p's param group: exactly
    the denominator of torch's Adam/AdamW update. Cohen et al. (2022) also fold Adam's first-moment
    bias correction (1 - beta1 ** step) into P; it is omitted here (within 1% of 1 after 44 steps
    with beta1 = 0.9).
    """
    parts = []
    for p in params:
        group, state = _group_of(optimizer, p), optimizer.state.get(p, {})
        key = "max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq"
        if key not in state or "step" not in state:
            raise ValueError(f"no Adam state ({key!r}) for a parameter: take an optimizer step first")
        step, beta2 = float(state["step"]), float(group["betas"][1])
        v_hat = state[key].detach() / (1.0 - beta2 ** step)
        parts.append((v_hat.sqrt() + float(group["eps"])).reshape(-1))
    return torch.cat(parts)


def is_adam(optimizer) -> bool:
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))


def preconditioned_sharpness(model: nn.Module, loss_fn: LossFn, data, optimizer: torch.optim.Optimizer, *,
                             tol: float = 1e-3, max_iter: int = 100, v0: Tensor | None = None,
                             **kwargs) -> Eigen:
    """Top eigenpair of P^{-1/2} H P^{-1/2}, P = :func:`adam_preconditioner` (eigenvalues = those of
    P^{-1} H): the quantity Cohen et al. (2022, "Adaptive gradient methods at the edge of
    stability") compare with Adam's threshold (2 + 2 beta1) / (eta (1 - beta1)) = 38 / eta for beta1 =
    0.9. ``kwargs`` go to :func:`top_hessian_eigenvalues`."""
    params = [p for _, p in trainable_parameters(model)]
    pre = adam_preconditioner(optimizer, params)
    return top_hessian_eigenvalues(model, loss_fn, data, 1, tol=tol, max_iter=max_iter, v0=v0,
                                   precondition=pre, **kwargs)


def _one(groups: list[dict], key: str, default=None):
    values = {repr(g.get(key, default)) for g in groups}
    if len(values) > 1:
        raise ValueError(f"param groups differ in {key!r}: no single stability threshold")
    return groups[0].get(key, default)


def stability_threshold(optimizer: torch.optim.Optimizer) -> float:
    """The largest curvature lambda at which the optimizer is stable on the quadratic lambda x^2 / 2.

    - SGD: 2 / eta; heavy-ball momentum beta with dampening d: (2 + 2 beta) / (eta (1 - d)).
    - SGD with Nesterov (torch's form, d = 0): (2 + 2 beta) / (eta (1 + 2 beta)), the exact linear
      stability limit of that update (smaller than heavy ball's by the factor 1 + 2 beta).
    - Adam/AdamW: (2 + 2 beta1) / (eta (1 - beta1)) (= 38 / eta for beta1 = 0.9), to be compared
      with the *preconditioned* sharpness (Cohen et al. 2022, arXiv:2207.14484): heavy ball on
      P^{-1} H with step eta (1 - beta1). Weight decay is left out (SGD's L2 term adds wd to every
      eigenvalue of the loss Hessian measured here).

    ``eta`` is the current ``lr``; all param groups must agree. Other optimizers: ValueError.
    """
    groups = optimizer.param_groups
    lr = float(_one(groups, "lr"))
    if isinstance(optimizer, torch.optim.SGD):
        beta = float(_one(groups, "momentum", 0.0))
        damp = float(_one(groups, "dampening", 0.0))
        if _one(groups, "nesterov", False):
            return (2.0 + 2.0 * beta) / (lr * (1.0 + 2.0 * beta))
        return (2.0 + 2.0 * beta) / (lr * (1.0 - damp))
    if is_adam(optimizer):
        beta1 = float(_one(groups, "betas")[0])
        return (2.0 + 2.0 * beta1) / (lr * (1.0 - beta1))
    raise ValueError(f"no stability threshold known for {type(optimizer).__name__}")
