"""The recorder's per-step state: theta_t, the gradient and theta_{t-1} - theta_t, and their norms.

Two interchangeable implementations, both fed each step with the recorded tensors (the local
shards under FSDP2) and their gradients, both returning the squared L2 norms
``(|theta_t|^2, |g_t|^2, |theta_{t-1} - theta_t|^2)`` summed over the tensors (float32, shape (3,);
the last is 0 at the first step) and the count sketch of theta_t:

- :class:`FlatState`: one flat float32 copy per step. Small models are limited by the per-call
  overhead of tensor operations, not by arithmetic, and a flat buffer makes a step about six
  calls whatever the number of tensors. 24 bytes per element (and 8 for the sketch operator).
- :class:`TensorState`: per-tensor fused ``_foreach`` calls and one copy of theta_{t-1} in the
  parameters' dtype, for models too large for three flat copies or spread over devices.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from trajscope.functional.sketch import Sketcher


def _dense(g: Tensor) -> Tensor:
    return g if g.layout == torch.strided else g.to_dense()


class FlatState:
    """Two alternating (3, N) float32 buffers: row 0 theta_t, row 1 the gradient (0 where a tensor
    has none), row 2 theta_{t-1} - theta_t. One step: a foreach copy of the tensors, one of the
    gradients, a subtraction and one norm over the three rows; the sketch is one sparse (CSR)
    matrix-vector product with row 0."""

    def __init__(self, shapes: list[torch.Size], device, layout: list[tuple[str, int, int]],
                 sketcher: Sketcher | None):
        self.numel = sum(math.prod(s) for s in shapes)
        self._z = [torch.zeros(3, self.numel, device=device) for _ in range(2)]
        self._views = []  # per buffer: (views of row 0 shaped like the tensors, the same of row 1)
        for z in self._z:
            rows = []
            for r in (0, 1):
                parts = torch.split(z[r], [math.prod(s) for s in shapes]) if shapes else []
                rows.append([v.view(s) for v, s in zip(parts, shapes)])
            self._views.append(rows)
        self._cur = 0
        self._sketcher = sketcher
        self._matrix = sketcher.layout_matrix(layout, device) if sketcher is not None else None

    @torch.no_grad()
    def prime(self, tensors: list[Tensor]) -> None:
        """Take ``tensors`` as theta_{t-1} of the next :meth:`update` (a recorder that starts from
        a restored state without recording it, e.g. on resume)."""
        tv, _ = self._views[self._cur]
        if tv:
            torch._foreach_copy_(tv, [t.detach() for t in tensors])

    @property
    def theta(self) -> Tensor:
        """(N,) float32: the tensors of the last :meth:`update`, concatenated (row-major each)."""
        return self._z[self._cur][0]

    def update(self, tensors: list[Tensor], grads: list[Tensor | None], first: bool) -> Tensor:
        """(3,) squared norms (see the module docstring); call under ``torch.no_grad()``."""
        self._cur ^= 1
        z, prev = self._z[self._cur], self._z[self._cur ^ 1][0]
        tv, gv = self._views[self._cur]
        if tv:
            torch._foreach_copy_(tv, tensors)
        present = [i for i, g in enumerate(grads) if g is not None]
        if len(present) < len(grads):
            z[1].zero_()
        if present:
            src = grads if len(present) == len(grads) else [grads[i] for i in present]
            dst = gv if len(present) == len(grads) else [gv[i] for i in present]
            try:
                torch._foreach_copy_(dst, src)
            except RuntimeError:  # e.g. a sparse gradient (an Embedding with sparse=True)
                torch._foreach_copy_(dst, [_dense(g) for g in src])
        if first:
            z[2].zero_()
        else:
            torch.sub(prev, z[0], out=z[2])
        return torch.linalg.vector_norm(z, dim=1).square_()

    def sketch(self, tensors: list[Tensor], out: Tensor | None = None) -> Tensor:
        """(k,) sketch of theta_t (``tensors`` unused: row 0 already holds them); one CSR product."""
        return torch.mv(self._matrix, self.theta) if out is None else torch.mv(self._matrix, self.theta, out=out)


class TensorState:
    """Per-tensor state: a copy of theta_{t-1} in the tensors' own dtype (one copy per element)."""

    def __init__(self, tensors: list[Tensor], layout: list[tuple[str, int, int]], sketcher: Sketcher | None,
                 device):
        self._prev = [t.detach().clone() for t in tensors]
        self._layout = layout
        self._sketcher = sketcher
        self._device = device

    @torch.no_grad()
    def prime(self, tensors: list[Tensor]) -> None:
        """Take ``tensors`` as theta_{t-1} of the next :meth:`update`."""
        if self._prev:
            torch._foreach_copy_(self._prev, [t.detach() for t in tensors])

    def _sq(self, ts: list[Tensor]) -> Tensor:
        """Sum of squared L2 norms, float32 on the state's device (0 for no tensors)."""
        ts = [t for t in ts if t.numel()]
        if not ts:
            return torch.zeros((), device=self._device)
        norms = torch.stack([n.float().to(self._device) for n in torch._foreach_norm(ts)])
        return norms.square().sum()

    @torch.no_grad()
    def update(self, tensors: list[Tensor], grads: list[Tensor | None], first: bool) -> Tensor:
        cur = [t.detach() for t in tensors]
        if not first and cur:  # theta_{t-1} - theta_t, in place (refilled below)
            torch._foreach_sub_(self._prev, cur)
        out = torch.stack([self._sq(cur), self._sq([_dense(g) for g in grads if g is not None]),
                           torch.zeros((), device=self._device) if first else self._sq(self._prev)])
        if cur:
            torch._foreach_copy_(self._prev, cur)
        return out

    def sketch(self, tensors: list[Tensor], out: Tensor | None = None) -> Tensor:
        sk = self._sketcher
        acc = torch.zeros(sk.k, dtype=sk.dtype, device=self._device) if out is None else out.zero_()
        for (name, offset, _), t in zip(self._layout, tensors):
            if t.numel():
                sk.sketch_shard(name, t.detach().to(self._device), offset, out=acc)
        return acc
