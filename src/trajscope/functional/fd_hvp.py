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

import contextlib
import math
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

SCHEMES = ("forward", "central")
BASE_LOSS_RTOL = 1e-5  # float32 losses of the same function and batch agree to a few ulps

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

    def __init__(self, pieces: list | None = None, stack: list | None = None):
        super().__init__()
        self.recording = pieces is None
        self.pieces: list = [] if pieces is None else pieces
        self.i = 0
        self.unsupported: set[str] = set()
        self.stack = stack  # recording: the modules running (outermost first), see _module_stack
        self.owners: list[tuple] = []  # recording with a stack: the module stack of each piece

    def _piece(self, make):
        if self.recording:
            self.pieces.append(make())
            if self.stack is not None:
                self.owners.append(tuple(self.stack))
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


@contextlib.contextmanager
def _module_stack() -> Iterator[list]:
    """A list that holds, while inside, the modules whose forward is running, outermost first
    (global forward hooks; used in the base pass only)."""
    stack: list = []

    def leave(module, args, out) -> None:  # returns None: the output is kept
        stack.pop()
    pre = nn.modules.module.register_module_forward_pre_hook(lambda m, args: stack.append(m) and None)
    post = nn.modules.module.register_module_forward_hook(leave)
    try:
        yield stack
    finally:
        pre.remove()
        post.remove()


def _scopes(owners: list[tuple]) -> list[nn.Module] | None:
    """The outermost of the innermost modules that made the piecewise calls (``owners``: each
    call's module stack), or None if a call was made outside every module."""
    inner: dict[int, tuple] = {}
    for stack in owners:
        if not stack:
            return None
        inner[id(stack[-1])] = stack
    return [st[-1] for st in inner.values() if not any(id(a) in inner for a in st[:-1])]


@contextlib.contextmanager
def _scoped(modules: list[nn.Module], mode: FreezePieces) -> Iterator[None]:
    """Run ``mode`` only inside the forward of each of ``modules`` (an instance-level ``forward``
    that enters it), not around every call of the whole pass: a TorchFunctionMode costs a Python
    dispatch per torch call (8% of a gradient on the mnist1d CNN), here only for the few calls
    inside the activation modules."""
    saved = [(m, m.__dict__.get("forward")) for m in modules]

    def under(f):
        def forward(*args, **kwargs):
            with mode:
                return f(*args, **kwargs)
        return forward
    try:  # through __dict__: nn.Module.__setattr__ / __delattr__ cost ~40 us a call here
        for m, _ in saved:
            m.__dict__["forward"] = under(m.forward)
        yield
    finally:
        for m, own in saved:
            if own is None:
                del m.__dict__["forward"]
            else:
                m.__dict__["forward"] = own


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

    ``forward_fn(params: dict, x) -> outputs`` evaluates the model with the given parameters (e.g.
    a ``functional_call``); ``params`` the trainable (name, tensor) pairs; vectors are flat (P,), in
    their order. Gradients are those of ``loss_fn(forward_fn(params, x), y)``.

    ``inplace=True``: the tensors of ``params`` are the model's own parameters, which ``forward_fn``
    reads itself (the curvature operator calls the model as it is, about 5% cheaper per gradient
    than ``functional_call`` on the mnist1d CNN): each perturbed gradient writes its point into
    them (under ``no_grad``) and copies theta back afterwards, bit for bit, also on an exception
    (their version counters move: do not call it while a graph that saved them waits for its
    backward pass).

    ``base_gradient`` (P,): g(theta), if the caller has it (e.g. the training step's gradient on
    the same batch and parameters); the base pass then runs the forward pass only (to record the
    pieces), not the backward pass. It must be that gradient: any difference is divided by h.
    ``base_loss``: the loss that gradient is of; if the base pass's loss differs from it (relative
    ``BASE_LOSS_RTOL``: another batch, parameters or loss), the gradient is computed here instead.

    After :meth:`prepare`, ``unsupported`` names the non-smooth functions the forward pass called
    that are not frozen (an empty set: the products are those of double backward, up to the
    difference error).
    """

    def __init__(self, forward_fn: Callable[[dict, Tensor], Tensor], loss_fn, x: Tensor, y: Tensor,
                 params: list[tuple[str, Tensor]], scheme: str = "forward", rel_step: float | None = None,
                 inplace: bool = False, base_gradient: Tensor | None = None, base_loss: float | None = None):
        if scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
        self.forward_fn, self.loss_fn, self.x, self.y, self.scheme = forward_fn, loss_fn, x, y, scheme
        self.inplace, self.tensors, self.base_loss = inplace, [p for _, p in params], base_loss
        self.names = [n for n, _ in params]
        self.shapes = [p.shape for _, p in params]
        self.sizes = [p.numel() for _, p in params]
        self.theta = torch.cat([p.detach().reshape(-1) for _, p in params])  # (P,)
        self.rel_step = default_step(scheme, self.theta.dtype) if rel_step is None else float(rel_step)
        self.theta_norm = float(self.theta.norm())
        self.unsupported: set[str] = set()
        self._pieces: list | None = None
        self._base: Tensor | None = None
        if base_gradient is not None:
            if base_gradient.shape != self.theta.shape:
                raise ValueError(f"base_gradient has shape {tuple(base_gradient.shape)}, expected "
                                 f"{tuple(self.theta.shape)}")
            self._base = base_gradient.detach().to(self.theta)
        self._rng: tuple | None = None
        self._scope: list[nn.Module] | None = None  # modules to run the replay in (None: all of it)
        self._point = torch.empty_like(self.theta)  # theta + h v, reused by every product
        self._theta_views: list[Tensor] | None = None
        self._point_views: list[Tensor] | None = None

    def _reset_rng(self) -> None:
        if self._rng is not None:  # the same dropout masks in every pass
            torch.set_rng_state(self._rng[0])
            if self._rng[1] is not None:
                torch.cuda.set_rng_state(self._rng[1], self.x.device)

    def _replay(self, flat: Tensor) -> Tensor:
        """The gradient at ``flat`` with the pieces of theta; every recorded piece must be used."""
        mode = FreezePieces(self._pieces)
        frozen = mode if self._scope is None else _scoped(self._scope, mode)
        g = self._gradient(flat, frozen)
        if mode.i != len(self._pieces):
            raise RuntimeError("the perturbed forward pass made fewer piecewise calls than the base pass")
        return g

    def _gradient(self, flat: Tensor | None, mode, backward: bool = True) -> Tensor | None:
        """The gradient (P,) at the flat parameter vector ``flat`` (None: theta) inside the context
        ``mode``; ``backward=False``: the forward pass only (returns the loss, a 0-dim tensor)."""
        self._reset_rng()
        if self.inplace:
            return self._gradient_inplace(flat, mode, backward)
        leaf = (self.theta if flat is None else flat).detach().requires_grad_(backward)
        views = [t.view(s) for t, s in zip(leaf.split(self.sizes), self.shapes)]
        with torch.enable_grad() if backward else torch.no_grad(), mode:
            out = self.forward_fn(dict(zip(self.names, views)), self.x)
        if not backward:
            with torch.no_grad():
                return self.loss_fn(out, self.y)
        loss = self.loss_fn(out, self.y)
        return torch.autograd.grad(loss, leaf, allow_unused=True, materialize_grads=True)[0]

    def _views(self, flat: Tensor) -> list[Tensor]:
        return [t.view(s) for t, s in zip(flat.split(self.sizes), self.shapes)]

    def _write(self, flat: Tensor) -> None:
        """Write ``flat`` (theta or the point buffer, whose views are made once) into the parameters."""
        if self._theta_views is None:
            self._theta_views, self._point_views = self._views(self.theta), self._views(self._point)
        views = self._theta_views if flat is self.theta else (
            self._point_views if flat is self._point else self._views(flat))
        with torch.no_grad():  # one fused call: small ops cost ~20-80 us each on this CPU
            torch._foreach_copy_(self.tensors, views)

    def _gradient_inplace(self, flat: Tensor | None, mode, backward: bool) -> Tensor | None:
        try:
            if flat is not None:
                self._write(flat)
            with torch.enable_grad() if backward else torch.no_grad(), mode:
                out = self.forward_fn(dict(zip(self.names, self.tensors)), self.x)
            if not backward:
                with torch.no_grad():
                    return self.loss_fn(out, self.y)
            grads = torch.autograd.grad(self.loss_fn(out, self.y), self.tensors, allow_unused=True,
                                        materialize_grads=True)
        finally:
            if flat is not None:
                self._write(self.theta)  # bit-exact: theta is a copy of the values found
        return torch.cat([g.reshape(-1) for g in grads])

    def prepare(self) -> None:
        """The base pass: record the pieces (and, for ``"forward"``, the gradient at theta, unless
        ``base_gradient`` was given: then the forward pass only)."""
        if self._pieces is not None:
            return
        self._rng = (torch.get_rng_state(), torch.cuda.get_rng_state(self.x.device) if self.x.is_cuda else None)
        need = self.scheme == "forward" and self._base is None
        with _module_stack() as stack:
            mode = FreezePieces(stack=stack)
            base = self._gradient(None, mode, backward=need)
        self._pieces, self.unsupported = mode.pieces, mode.unsupported
        self._scope = _scopes(mode.owners)
        if need:
            self._base = base
        elif self._base is not None and self.base_loss is not None and not math.isclose(
                float(base), self.base_loss, rel_tol=BASE_LOSS_RTOL, abs_tol=1e-30):
            # the given gradient belongs to another batch, loss or point: compute it here
            self._base = self._replay(self.theta)

    def __call__(self, v: Tensor) -> Tensor:
        """H v for a flat (P,) ``v``."""
        self.prepare()
        v_norm = float(v.norm())
        if v_norm == 0.0:
            return torch.zeros_like(self.theta)
        h = self.rel_step * max(self.theta_norm, 1.0) / v_norm
        plus = self._replay(torch.add(self.theta, v, alpha=h, out=self._point))
        if self.scheme == "forward":
            return plus.sub_(self._base).div_(h)
        minus = self._replay(torch.add(self.theta, v, alpha=-h, out=self._point))
        return plus.sub_(minus).div_(2 * h)
