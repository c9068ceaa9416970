"""The recorder's per-step state: theta_t, the gradient and theta_{t-1} - theta_t, and their norms.

Two interchangeable implementations, both fed each step (:meth:`push`) with the recorded tensors
(the local shards under FSDP2) and their gradients, and both giving at :meth:`process`, for each
step pushed since the last call, the squared L2 norms ``(|theta_t|^2, |g_t|^2, |theta_{t-1} -
theta_t|^2)`` summed over the tensors (float32, shape (n, 3); the last is 0 at a first step) and
the count sketch of theta_t ((n, k)):

- :class:`FlatState`: flat float32 rows, ``batch`` steps of them. On small models every tensor
  call right after a training step costs 4-10x its tight-loop time (the step evicted the caches;
  a 16-element sum: ~50 us, against ~8 us a second time), so a step only copies the parameters
  and gradients into the next row (one ``_foreach_copy_`` each), and the differences, norms and
  sketches of ``batch`` steps are one call each, every ``batch`` steps.
- :class:`TensorState`: per-tensor fused ``_foreach`` calls and one copy of theta_{t-1} in the
  parameters' dtype, for models too large for flat copies or spread over devices; it computes
  each step at once.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from trajscope.functional.sketch import Sketcher


def _dense(g: Tensor) -> Tensor:
    return g if g.layout == torch.strided else g.to_dense()


def batch_rows(numel: int, max_batch: int = 16, budget: int = 1 << 21) -> int:
    """Steps per :class:`FlatState` batch: up to ``max_batch``, and ``batch * numel <= budget``
    (about ``20 * budget`` bytes of rows and operator), at least 1."""
    return max(1, min(max_batch, budget // max(numel, 1)))


def _block_diagonal(m: Tensor, copies: int, stride: int):
    """(D, parts): D is the CSR matrix of ``copies`` diagonal blocks m, block i reading the
    columns ``i * stride ..`` (the rows of a buffer with row stride ``stride``), so that one
    product sketches that many rows, each as ``torch.mv(m, row)`` computes it (same values);
    ``parts`` gives the matrices of fewer blocks (:func:`_first_blocks`, same index tensors)."""
    crow, col, val = m.crow_indices().long(), m.col_indices().long(), m.values()
    nnz, rows = col.numel(), m.shape[0]
    crow_b = torch.cat([(crow[:-1].unsqueeze(0) + nnz * torch.arange(copies).unsqueeze(1)).reshape(-1),
                        torch.tensor([copies * nnz])])
    col_b = (col.unsqueeze(0) + stride * torch.arange(copies).unsqueeze(1)).reshape(-1)
    if copies * max(nnz, stride) < 2 ** 31:
        crow_b, col_b = crow_b.to(torch.int32), col_b.to(torch.int32)
    val_b = val.repeat(copies)
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        whole = torch.sparse_csr_tensor(crow_b, col_b, val_b, size=(copies * rows, copies * stride),
                                        check_invariants=False)
    return whole, (crow_b, col_b, val_b, rows, nnz, stride)


def _first_blocks(parts, n: int) -> Tensor:
    """The CSR matrix of the first ``n`` blocks of :func:`_block_diagonal` (views of its indices)."""
    crow_b, col_b, val_b, rows, nnz, stride = parts
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow_b[:n * rows + 1], col_b[:n * nnz], val_b[:n * nnz],
                                       size=(n * rows, n * stride), check_invariants=False)


class FlatState:
    """One (B + 1, 3, N) float32 buffer for ``batch`` = B steps: row i holds theta of the i-th
    step pushed, its gradient (0 where a tensor has none) and theta_{i-1} - theta_i (filled by
    :meth:`process`); row 0 theta of the step before. A step is one foreach copy of the tensors
    and one of the gradients; :meth:`process` of n steps is a subtraction, one norm over their
    3n rows and one sparse (CSR, block-diagonal) matrix-vector product for all n sketches.
    (20B + 12) bytes per element with the sketch operator."""

    def __init__(self, shapes: list[torch.Size], device, layout: list[tuple[str, int, int]],
                 sketcher: Sketcher | None, batch: int = 1):
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        n, self.batch = sum(math.prod(s) for s in shapes), batch
        self.numel = n
        self._w = torch.zeros(batch + 1, 3, n, device=device)
        # per step row: views of theta and of the gradient shaped like the tensors (unbind makes
        # each tensor's views of all rows in one call)
        cols = [(sum(math.prod(s) for s in shapes[:j]), shape) for j, shape in enumerate(shapes)]
        per_tensor = [[self._w[:, r, o:o + math.prod(sh)].view(batch + 1, *sh).unbind(0) for o, sh in cols]
                      for r in (0, 1)]
        self._views = [([v[i] for v in per_tensor[0]], [v[i] for v in per_tensor[1]]) for i in range(batch + 1)]
        self._n = 0  # steps pushed since the last process
        self._first: list[bool] = []
        self._sketcher = sketcher
        self._matrices: dict[int, Tensor] = {}  # n -> the operator of n rows
        self._parts = None
        if sketcher is not None:
            whole, self._parts = _block_diagonal(sketcher.layout_matrix(layout, device), batch, 3 * n)
            self._matrices[batch] = whole

    @torch.no_grad()
    def prime(self, tensors: list[Tensor]) -> None:
        """Take ``tensors`` as theta_{t-1} of the next :meth:`push` (a recorder that starts from
        a restored state without recording it, e.g. on resume); only with no step pending."""
        if self._views[0][0]:
            torch._foreach_copy_(self._views[0][0], [t.detach() for t in tensors])

    @property
    def full(self) -> bool:
        """True when :meth:`process` must run before the next :meth:`push`."""
        return self._n == self.batch

    def thetas(self, index: list[int]) -> Tensor:
        """(m, N) float32 on the CPU, a copy: theta (the tensors concatenated, row-major each) of
        the steps pushed ``index[j]``-th (0-based) before the last :meth:`process`; call it before
        the next :meth:`push`."""
        rows = torch.tensor(index, device=self._w.device) + 1
        return self._w[:, 0].index_select(0, rows).cpu()

    def push(self, tensors: list[Tensor], grads: list[Tensor | None], first: bool) -> tuple[int, bool]:
        """Copy one step's tensors and gradients in; return (its row, whether any tensor had a
        gradient). Call under ``torch.no_grad()``."""
        self._n += 1
        row = self._n
        self._first.append(first)
        tv, gv = self._views[row]
        if not tv:
            return row, False
        torch._foreach_copy_(tv, tensors)
        try:  # the usual case: every tensor has a dense gradient
            torch._foreach_copy_(gv, grads)
            return row, True
        except (TypeError, RuntimeError):  # a None (TypeError), a sparse gradient: copy them one way or another
            pass
        present = [i for i, g in enumerate(grads) if g is not None]
        if len(present) < len(grads):
            self._w[row, 1].zero_()
        if present:
            src = [_dense(grads[i]) for i in present]
            torch._foreach_copy_([gv[i] for i in present], src)
        return row, bool(present)

    def process(self, want_sketch: bool) -> tuple[Tensor, Tensor | None]:
        """((n, 3) squared norms, (n, k) sketches or None) of the n steps pushed since the last
        call, in order; then the last one becomes theta_{t-1} of the next push."""
        n, w = self._n, self._w
        if n == 0:
            return torch.zeros(0, 3, device=w.device), None
        torch.sub(w[0:n, 0], w[1:n + 1, 0], out=w[1:n + 1, 2])
        norms = torch.linalg.vector_norm(w[1:n + 1], dim=2).square_()  # (n, 3)
        if any(self._first):
            norms[torch.tensor(self._first), 2] = 0.0
        sk = None
        if want_sketch and self._parts is not None:
            m = self._matrices.get(n)
            if m is None:
                m = self._matrices[n] = _first_blocks(self._parts, n)
            sk = torch.mv(m, w[1:n + 1].view(-1)).view(n, self._sketcher.k)
        w[0, 0].copy_(w[n, 0])
        self._n, self._first = 0, []
        return norms, sk


class TensorState:
    """Per-tensor state: a copy of theta_{t-1} in the tensors' own dtype (one copy per element);
    each :meth:`push` computes its step at once (:attr:`full` after every push)."""

    batch = 1

    def __init__(self, tensors: list[Tensor], layout: list[tuple[str, int, int]], sketcher: Sketcher | None,
                 device):
        self._prev = [t.detach().clone() for t in tensors]
        self._layout = layout
        self._sketcher = sketcher
        self._device = device
        self._done: list[tuple[Tensor, list[Tensor]]] = []  # (squared norms (3,), tensors) per pushed step

    @torch.no_grad()
    def prime(self, tensors: list[Tensor]) -> None:
        """Take ``tensors`` as theta_{t-1} of the next :meth:`push`."""
        if self._prev:
            torch._foreach_copy_(self._prev, [t.detach() for t in tensors])

    @property
    def full(self) -> bool:
        return bool(self._done)

    def _sq(self, ts: list[Tensor]) -> Tensor:
        """Sum of squared L2 norms, float32 on the state's device (0 for no tensors)."""
        ts = [t for t in ts if t.numel()]
        if not ts:
            return torch.zeros((), device=self._device)
        norms = torch.stack([n.float().to(self._device) for n in torch._foreach_norm(ts)])
        return norms.square().sum()

    @torch.no_grad()
    def push(self, tensors: list[Tensor], grads: list[Tensor | None], first: bool) -> tuple[None, bool]:
        cur = [t.detach() for t in tensors]
        if not first and cur:  # theta_{t-1} - theta_t, in place (refilled below)
            torch._foreach_sub_(self._prev, cur)
        out = torch.stack([self._sq(cur), self._sq([_dense(g) for g in grads if g is not None]),
                           torch.zeros((), device=self._device) if first else self._sq(self._prev)])
        if cur:
            torch._foreach_copy_(self._prev, cur)
        self._done.append((out, cur))
        return None, any(g is not None for g in grads)

    @torch.no_grad()
    def process(self, want_sketch: bool) -> tuple[Tensor, Tensor | None]:
        """As :meth:`FlatState.process` (the sketch of the tensors as they are now, which are
        those of the last push: call it before the next optimizer step)."""
        done, self._done = self._done, []
        if not done:
            return torch.zeros(0, 3, device=self._device), None
        norms = torch.stack([sq for sq, _ in done])
        if not (want_sketch and self._sketcher is not None):
            return norms, None
        return norms, torch.stack([self._sketch(ts) for _, ts in done])

    def _sketch(self, tensors: list[Tensor]) -> Tensor:
        sk = self._sketcher
        acc = torch.zeros(sk.k, dtype=sk.dtype, device=self._device)
        for (name, offset, _), t in zip(self._layout, tensors):
            if t.numel():
                sk.sketch_shard(name, t.detach().to(self._device), offset, out=acc)
        return acc
