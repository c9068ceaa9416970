"""Hessian-vector products by finite differences of gradients, kinks frozen at the base point.

``H v ~ (g(theta + h v) - g(theta)) / h`` (``scheme="forward"``: one gradient per product, the base
gradient g(theta) once per operator) or ``(g(theta + h v) - g(theta - h v)) / (2 h)`` (``"central"``:
two gradients per product, error O(h^2) instead of O(h)). A gradient (one forward and one backward
pass) costs less than a double-backward product (on small CPU models about 2.5x less; on a wide MLP
8 against 14 matrix products), at the price of the truncation and rounding error of the difference.

Kinks: on a piecewise-linear network (ReLU) the difference of two gradients jumps wherever a unit
changes sides between theta and theta + h v, and those jumps do not shrink with h (the error of a
plain difference was > 1 on mnist1d-cnn at every h). Double backward differentiates the active
piece instead. Here the same is done by running every gradient with the pieces of theta: a
:class:`torch.overrides.TorchFunctionMode` records, in the base pass, the sign mask of every
``relu`` / ``leaky_relu`` / ``hardtanh`` (``relu6``) call and the argmax indices of every
``max_pool1d/2d/3d`` call, and replays them, in call order, in the perturbed passes (``relu(z) ->
z * mask``): the function differentiated is then smooth along the difference, and its Hessian at
theta is the one double backward gives. Calls to other non-smooth functions (``abs``, ``clamp``,
``maximum``, ``sort``, adaptive max pooling, ...; :data:`NON_SMOOTH`) are not frozen: the operator
reports them in ``unsupported`` and ``method="auto"`` falls back to double backward. Dropout draws
the same masks in every pass (the random state is reset to the base pass's before each).

Step: ``h = rel_step * max(|theta|, 1) / |v|``, ``rel_step`` by default :func:`default_step` of the
dtype (measured, see there). Call the operator inside
:func:`~trajscope.functional.hvp.measurement_state` (the curvature operator does, with
``method="finite-difference"``, ``"central-difference"`` or ``"auto"``); the parameters must not
change while it is used (the base pass is cached).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

SCHEMES = ("forward", "central")

_RELU = {F.relu, F.relu_, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_}
_LEAKY = {F.leaky_relu, F.leaky_relu_, torch._C._nn.leaky_relu, torch._C._nn.leaky_relu_}
_HARDTANH = {F.hardtanh, F.hardtanh_, F.relu6, torch._C._nn.hardtanh, torch._C._nn.hardtanh_}
_MAXPOOL = {F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3}
NON_SMOOTH = frozenset({
    "abs", "absolute", "abs_", "clamp", "clamp_", "clamp_min", "clamp_max", "clip", "clip_", "maximum",
    "minimum", "fmax", "fmin", "max", "min", "amax", "amin", "sort", "topk", "kthvalue", "median",
    "nanmedian", "sign", "sgn", "floor", "ceil", "round", "trunc", "frac", "fmod", "remainder",
    "hardshrink", "softshrink", "hardswish", "hardsigmoid", "threshold", "threshold_", "prelu", "rrelu",
    "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d", "fractional_max_pool2d",
    "fractional_max_pool3d", "lp_pool1d", "lp_pool2d", "max_unpool1d", "max_unpool2d", "max_unpool3d",
    "cummax", "cummin", "logcumsumexp_", "heaviside",
})


class FreezePieces(TorchFunctionMode):
    """Record (``pieces is None``) or replay the active pieces of piecewise-linear calls, in call
    order. ``unsupported``: names of non-smooth functions seen that are not frozen."""

    def __init__(self, pieces: list | None = None):
        super().__init__()
        self.recording = pieces is None
        self.pieces: list = [] if pieces is None else pieces
        self.i = 0
        self.unsupported: set[str] = set()

    def _piece(self, make):
        if self.recording:
            self.pieces.append(make())
            return self.pieces[-1]
        if self.i >= len(self.pieces):
            raise RuntimeError("the perturbed forward pass made more piecewise calls than the base pass")
        self.i += 1
        return self.pieces[self.i - 1]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RELU:
            z = args[0]
            return _apply(z, z * self._piece(lambda: (z.detach() > 0).to(z.dtype)), func in (F.relu_, torch.relu_, Tensor.relu_)
                          or kwargs.get("inplace", args[1] if len(args) > 1 else False))
        if func in _LEAKY:
            z = args[0]
            slope = kwargs.get("negative_slope", args[1] if len(args) > 1 else 0.01)
            scale = self._piece(lambda: torch.where(z.detach() > 0, 1.0, slope).to(z.dtype))
            return _apply(z, z * scale, kwargs.get("inplace", args[2] if len(args) > 2 else False)
                          or func in (F.leaky_relu_, torch._C._nn.leaky_relu_))
        if func in _HARDTANH:
            return self._hardtanh(func, args, kwargs)
        if func in _MAXPOOL:
            return self._max_pool(func, args, kwargs)
        name = getattr(func, "__name__", "")
        if name in NON_SMOOTH:
            self.unsupported.add(name)
        return func(*args, **kwargs)

    def _hardtanh(self, func, args, kwargs):
        z = args[0]
        if func is F.relu6:
            lo, hi, inplace = 0.0, 6.0, kwargs.get("inplace", args[1] if len(args) > 1 else False)
        else:
            lo = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
            hi = kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)
            inplace = kwargs.get("inplace", args[3] if len(args) > 3 else False) or func in (
                F.hardtanh_, torch._C._nn.hardtanh_)

        def make():
            d = z.detach()
            inside = (d > lo) & (d < hi)
            return inside, torch.where(d >= hi, hi, lo).to(z.dtype)
        inside, const = self._piece(make)
        return _apply(z, torch.where(inside, z, const), inplace)

    def _max_pool(self, func, args, kwargs):
        z = args[0]
        want = kwargs.pop("return_indices", args[6] if len(args) > 6 else False)
        args = args[:6]
        idx = self._piece(lambda: func(z.detach(), *args[1:], **kwargs, return_indices=True)[1])
        d = _MAXPOOL[func]
        flat = z.flatten(-d)  # (..., prod(spatial in))
        out = flat.gather(-1, idx.flatten(-d)).view_as(idx)
        return (out, idx) if want else out


def _apply(z: Tensor, out: Tensor, inplace) -> Tensor:
    return z.copy_(out) if inplace else out


def default_step(scheme: str, dtype: torch.dtype) -> float:
    """The relative step: ``sqrt(eps) / 32`` (forward; 1.1e-5 in float32) or ``eps ** (1/3) / 50``
    (central; 9.9e-5). Measured on mnist1d-mlp and mnist1d-cnn (init, 100 and 400 SGD steps, train and
    eval mode): the top eigenvalue's error is smallest near these (forward 1e-4: up to 6e-3,
    3e-6: up to 1.6e-3, rounding; 1e-5: <= 3.6e-4), not at the textbook sqrt(eps) * |theta|, because
    the loss turns on a scale much smaller than |theta| (BatchNorm, cross-entropy)."""
    eps = torch.finfo(dtype).eps
    return eps ** 0.5 / 32 if scheme == "forward" else eps ** (1 / 3) / 50


class FiniteDifferenceHVP:
    """v -> H v by differences of gradients on one batch ``(x, y)``, pieces frozen at theta.

    ``forward_fn(params: dict, x) -> outputs`` evaluates the model with the given parameters (the
    curvature operator passes its ``functional_call``); ``params`` the trainable (name, tensor)
    pairs; vectors are flat (P,), in their order. Gradients are those of
    ``loss_fn(forward_fn(params, x), y)``. After :meth:`prepare`, ``unsupported`` names the
    non-smooth functions the forward pass called that are not frozen (an empty set: the products
    are those of double backward, up to the difference error).
    """

    def __init__(self, forward_fn: Callable[[dict, Tensor], Tensor], loss_fn, x: Tensor, y: Tensor,
                 params: list[tuple[str, Tensor]], scheme: str = "forward", rel_step: float | None = None):
        if scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
        self.forward_fn, self.loss_fn, self.x, self.y, self.scheme = forward_fn, loss_fn, x, y, scheme
        self.names = [n for n, _ in params]
        self.shapes = [p.shape for _, p in params]
        self.sizes = [p.numel() for _, p in params]
        self.theta = torch.cat([p.detach().reshape(-1) for _, p in params])  # (P,)
        self.rel_step = default_step(scheme, self.theta.dtype) if rel_step is None else float(rel_step)
        self.theta_norm = float(self.theta.norm())
        self.unsupported: set[str] = set()
        self._pieces: list | None = None
        self._base: Tensor | None = None
        self._rng: tuple | None = None

    def _gradient(self, flat: Tensor, mode: FreezePieces) -> Tensor:
        """The gradient (P,) at the flat parameter vector ``flat`` under ``mode``."""
        leaf = flat.detach().requires_grad_()
        views = [t.view(s) for t, s in zip(leaf.split(self.sizes), self.shapes)]
        if self._rng is not None:  # the same dropout masks in every pass
            torch.set_rng_state(self._rng[0])
            if self._rng[1] is not None:
                torch.cuda.set_rng_state(self._rng[1], self.x.device)
        with torch.enable_grad(), mode:
            out = self.forward_fn(dict(zip(self.names, views)), self.x)
        loss = self.loss_fn(out, self.y)
        return torch.autograd.grad(loss, leaf, allow_unused=True, materialize_grads=True)[0]

    def prepare(self) -> None:
        """The base pass: record the pieces (and, for ``"forward"``, the gradient at theta)."""
        if self._pieces is not None:
            return
        self._rng = (torch.get_rng_state(), torch.cuda.get_rng_state(self.x.device) if self.x.is_cuda else None)
        mode = FreezePieces()
        base = self._gradient(self.theta, mode)
        self._pieces, self.unsupported = mode.pieces, mode.unsupported
        self._base = base if self.scheme == "forward" else None

    def __call__(self, v: Tensor) -> Tensor:
        """H v for a flat (P,) ``v``."""
        self.prepare()
        v_norm = float(v.norm())
        if v_norm == 0.0:
            return torch.zeros_like(self.theta)
        h = self.rel_step * max(self.theta_norm, 1.0) / v_norm
        plus = self._gradient(self.theta + h * v, FreezePieces(self._pieces))
        if self.scheme == "forward":
            return (plus - self._base) / h
        minus = self._gradient(self.theta - h * v, FreezePieces(self._pieces))
        return (plus - minus) / (2 * h)
