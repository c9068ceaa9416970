"""Curvature-vector products of a model's loss: Hessian (H v) and Gauss-Newton (G v = J^T H_L J v).

Which parameters: every parameter with ``requires_grad`` in ``model.parameters()`` order; a vector
is flat, shape (P,), the parameters' values concatenated in that order (:func:`flatten`,
:func:`unflatten` convert to and from a list of tensors shaped like the parameters).

Which loss: ``loss_fn(model(x), y)`` must be the *mean* over its batch. ``data`` is one batch
``(x, y)`` or a re-iterable of batches (a list, a DataLoader); over several batches the loss is the
mean over the whole set, ``sum_b n_b * loss_b / N`` (n_b = ``len(x_b)``, N = sum n_b), so the product
is ``sum_b n_b * H_b v / N``.

Modes and side effects (BatchNorm): ``train=True`` (default) evaluates the model in train mode, so
BatchNorm normalizes with the statistics of the batch, the function the optimizer steps on; the
running statistics are not updated (they are replaced by ``None`` inside the call) and, as a
guarantee for any custom module, every buffer and every module's ``training`` flag are restored
afterwards: a measurement leaves the model exactly as it found it. ``train=False`` uses eval mode
(running statistics), ``train=None`` the modes the modules are in. Nothing switches modes silently.
``scaled_dot_product_attention`` runs with its math backend during a measurement, because the fused
CPU kernel has no second derivative (same function, other kernel).

Methods: ``"double-backward"`` (default; for one fixed batch the gradient graph is built once and
reused by every product, so the operator is valid only while the parameters do not change),
``"forward-over-reverse"`` (``torch.func.jvp`` of ``torch.func.grad`` over ``functional_call``;
recomputes the forward pass per product), and on one batch of the Hessian the difference of
gradients with the pieces of ReLU-type functions frozen at theta (:mod:`.fd_hvp`):
``"finite-difference"`` (forward difference, one gradient per product, relative error of the top
eigenvalue 2e-5-4e-4 in float32 on the mnist1d models; see :mod:`.fd_hvp`),
``"central-difference"`` (two gradients per product, 2e-6-3e-4). ``"auto"``: ``"finite-difference"`` where it applies (one batch,
the Hessian, no non-smooth function it cannot freeze in the forward pass), else double backward.
An explicit difference method on a model with such a function raises ValueError.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules.batchnorm import _NormBase

from trajscope.functional.fd_hvp import FiniteDifferenceHVP

METHODS = ("double-backward", "forward-over-reverse", "finite-difference", "central-difference", "auto")
DIFFERENCE = {"finite-difference": "forward", "central-difference": "central"}
CURVATURES = ("hessian", "gauss-newton")
Batch = tuple[Tensor, Tensor]


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) for every parameter with requires_grad, in ``named_parameters`` order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate tensors into one flat (P,) vector."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vec: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a flat (P,) vector into views shaped like ``like``."""
    return [c.view_as(t) for c, t in zip(vec.split([t.numel() for t in like]), like)]


@contextlib.contextmanager
def measurement_state(model: nn.Module, train: bool | None = True) -> Iterator[None]:
    """Set ``model.train(train)`` (unless None); on exit restore every module's ``training`` flag and
    every buffer (the same tensor object, with its saved values)."""
    flags = [(m, m.training) for m in model.modules()]
    saved = [(m, n, b, b.detach().clone()) for m in model.modules() for n, b in m._buffers.items()
             if b is not None]
    try:
        if train is not None:
            model.train(train)
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        with torch.no_grad():
            for m, n, b, old in saved:
                b.copy_(old)
                m._buffers[n] = b
        for m, flag in flags:
            m.training = flag


def _stat_buffers(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(qualified name, module, buffer name) of the running statistics of norm layers in train mode."""
    out = []
    for prefix, m in model.named_modules():
        if isinstance(m, _NormBase) and m.training and m.track_running_stats:
            for b in ("running_mean", "running_var", "num_batches_tracked"):
                if getattr(m, b, None) is not None:
                    out.append((f"{prefix}.{b}" if prefix else b, m, b))
    return out


def _stat_overrides(model: nn.Module) -> dict[str, None]:
    """Running-statistics buffers of norm layers in train mode, mapped to None (no update)."""
    return {q: None for q, _, _ in _stat_buffers(model)}


@contextlib.contextmanager
def _without(buffers: list[tuple[nn.Module, str]]) -> Iterator[None]:
    """The (module, buffer name) pairs set to None inside (BatchNorm then neither reads nor updates
    its running statistics in train mode), the same tensors put back on exit."""
    saved = [(m, n, m._buffers[n]) for m, n in buffers]
    try:
        for m, n, _ in saved:
            m._buffers[n] = None
        yield
    finally:
        for m, n, b in saved:
            m._buffers[n] = b


def _batches(data) -> tuple[list[Batch] | Iterable[Batch], bool]:
    """(batches, single): one (x, y) pair is a single batch; otherwise a re-iterable of pairs."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
        return [tuple(data)], True
    if iter(data) is data:
        raise TypeError("data must be one (x, y) batch or a re-iterable of batches, not an iterator")
    return data, False


class CurvatureOperator:
    """The linear map v -> C v, C the Hessian or Gauss-Newton matrix of the mean loss on ``data``.

    ``op(v)`` takes and returns flat (P,) vectors in the parameters' dtype and device. Call it
    inside ``with measurement_state(model, train):`` (the functions of :mod:`.hessian` do) or use
    :meth:`matvec`, which enters that state for one product. ``n_matvec`` counts products.

    ``base=(loss, gradient)``: the mean loss and the flat (P,) gradient at the current parameters on
    the one batch, if the caller has them (the training step's, before the optimizer step): the
    difference methods then skip their base backward pass (``loss`` None: taken on trust; else the
    gradient is used only if the base forward pass gives the same loss). Other methods ignore it.
    The difference methods write the perturbed points into the parameters themselves and restore
    them bit for bit after each gradient (:class:`~trajscope.functional.fd_hvp.FiniteDifferenceHVP`
    with ``inplace=True``).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], data,
                 method: str = "double-backward", curvature: str = "hessian",
                 base: tuple[float | None, Tensor] | None = None):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
        self.model, self.loss_fn, self.method, self.curvature = model, loss_fn, method, curvature
        self.data, self.single = _batches(data)
        named = trainable_parameters(model)
        if not named:
            raise ValueError("the model has no parameter with requires_grad")
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.dim = sum(p.numel() for p in self.params)
        self.dtype, self.device = self.params[0].dtype, self.params[0].device
        self.n_matvec = 0
        self._cache: tuple | None = None
        if method in DIFFERENCE and (curvature != "hessian" or not self.single):
            raise ValueError(f"method {method!r} needs curvature='hessian' and one (x, y) batch")
        if method == "auto":
            method = "finite-difference" if curvature == "hessian" and self.single else "double-backward"
        self.resolved = method  # the method the products use ("auto" resolved, see _difference)
        self._fd: FiniteDifferenceHVP | None = None
        self.base = base

    def __call__(self, v: Tensor) -> Tensor:
        self.n_matvec += 1
        v = v.to(dtype=self.dtype, device=self.device)
        if self.resolved in DIFFERENCE and self._difference() is not None:
            return self._fd(v)
        vs = unflatten(v, self.params)
        if self.single:
            x, y = self.data[0]
            return flatten(self._product(x, y, vs, cache=self.resolved == "double-backward"))
        total, n = torch.zeros(self.dim, dtype=self.dtype, device=self.device), 0
        for x, y in self.data:
            total.add_(flatten(self._product(x, y, vs, cache=False)), alpha=len(x))
            n += len(x)
        return total / n

    def matvec(self, v: Tensor, train: bool | None = True) -> Tensor:
        """One product inside :func:`measurement_state` (a convenience for single products)."""
        with measurement_state(self.model, train):
            self._cache = self._fd = None
            try:
                return self(v)
            finally:
                self._cache = self._fd = None

    def flat_params(self) -> Tensor:
        return flatten([p.detach() for p in self.params])

    def unflatten(self, v: Tensor) -> list[Tensor]:
        return unflatten(v, self.params)

    def _difference(self) -> FiniteDifferenceHVP | None:
        """The difference operator (its base pass run once), or None after "auto" fell back to
        double backward because the forward pass calls a non-smooth function it cannot freeze."""
        if self._fd is None:
            x, y = self.data[0]
            stats = [(m, b) for _, m, b in _stat_buffers(self.model)]

            def forward(q: dict, x_: Tensor) -> Tensor:  # q: the model's own parameters (in place)
                with _without(stats):
                    return self.model(x_)
            fd = FiniteDifferenceHVP(forward, self.loss_fn, x, y, list(zip(self.names, self.params)),
                                     DIFFERENCE[self.resolved], inplace=True,
                                     base_loss=None if self.base is None else self.base[0],
                                     base_gradient=None if self.base is None else self.base[1])
            fd.prepare()
            if fd.unsupported:
                if self.method != "auto":
                    raise ValueError(f"method {self.method!r}: the forward pass calls non-smooth "
                                     f"{', '.join(sorted(fd.unsupported))} (use 'double-backward')")
                self.resolved = "double-backward"
                return None
            self._fd = fd
        return self._fd

    # ---- one batch -----------------------------------------------------------------------------

    def _forward(self, params: dict, x: Tensor) -> Tensor:
        return functional_call(self.model, {**params, **_stat_overrides(self.model)}, (x,), strict=False)

    def _product(self, x: Tensor, y: Tensor, vs: list[Tensor], cache: bool) -> list[Tensor]:
        if self.resolved == "forward-over-reverse":
            return self._product_func(x, y, vs)
        if self._cache is None or not cache:
            graph = self._graph(x, y)
            if not cache:
                return self._product_graph(graph, vs, retain=False)
            self._cache = graph
        return self._product_graph(self._cache, vs, retain=True)

    def _grad(self, outputs, inputs, grad_outputs=None, **kw) -> list[Tensor]:
        """autograd.grad that skips outputs without a graph and gives zeros for unused inputs."""
        if grad_outputs is not None:
            pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o.requires_grad]
            outputs, grad_outputs = [o for o, _ in pairs], [g for _, g in pairs]
        if not outputs:
            return [torch.zeros_like(i) for i in inputs]
        return list(torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True,
                                        materialize_grads=True, **kw))

    def _graph(self, x: Tensor, y: Tensor) -> tuple:
        """Autograd graph for double backward: (g,) for the Hessian, (out, dL/dout, u, J^T u) for GN."""
        out = self._forward(dict(zip(self.names, self.params)), x)
        if self.curvature == "hessian":
            return (self._grad([self.loss_fn(out, y)], self.params, create_graph=True),)
        gz = torch.autograd.grad(self.loss_fn(out, y), out, create_graph=True)[0]  # (B, C)
        u = torch.zeros_like(out, requires_grad=True)  # dummy: J v = d(J^T u)/du . v
        jtu = self._grad([out], self.params, [u], create_graph=True)
        return out, gz, u, jtu

    def _product_graph(self, graph: tuple, vs: list[Tensor], retain: bool) -> list[Tensor]:
        if self.curvature == "hessian":
            return self._grad(graph[0], self.params, vs, retain_graph=retain)
        out, gz, u, jtu = graph
        jv = self._grad(jtu, [u], vs, retain_graph=True)[0]  # (B, C)
        hjv = torch.autograd.grad(gz, out, jv, retain_graph=True)[0]  # H_L J v, (B, C)
        return self._grad([out], self.params, [hjv], retain_graph=retain)

    def _product_func(self, x: Tensor, y: Tensor, vs: list[Tensor]) -> list[Tensor]:
        with warnings.catch_warnings():  # torch.func's jvp calls the deprecated torch.jit.script
            warnings.filterwarnings("ignore", message=".*torch.jit.script", category=DeprecationWarning)
            return self._product_func_raw(x, y, vs)

    def _product_func_raw(self, x: Tensor, y: Tensor, vs: list[Tensor]) -> list[Tensor]:
        p = {n: t.detach() for n, t in zip(self.names, self.params)}
        v = dict(zip(self.names, vs))
        if self.curvature == "hessian":
            f = lambda q: self.loss_fn(self._forward(q, x), y)  # noqa: E731
            return list(jvp(grad(f), (p,), (v,))[1].values())
        out_fn = lambda q: self._forward(q, x)  # noqa: E731
        out, jv = jvp(out_fn, (p,), (v,))
        hjv = jvp(grad(lambda z: self.loss_fn(z, y)), (out.detach(),), (jv,))[1]
        return list(vjp(out_fn, p)[1](hjv)[0].values())
