"""Passes over the snapshots of a run that never hold more than a bounded block in memory.

:func:`snapshot_grams` (the exact trajectory map): the group's vector is cut into column blocks of
``c`` elements; for each block, the slice of every chosen snapshot is read (T x c float32, the
only large buffer; ``c`` is chosen so that it fits ``budget_bytes``, so memory does not grow with T
beyond the T x T results), and the Gram blocks are accumulated with ``torch.mm`` in float32 into
float64 matrices.  Every byte of every snapshot is read once per pass, and the Gram products are the
whole cost.  The rows are the *displacements* ``theta_i - theta_0`` (plus theta_0 itself as row 0)
and the *updates* ``theta_{i+w} - theta_i``, formed in float32 from the snapshots before any product,
so that small differences of large vectors keep their precision (a Gram matrix of theta followed by
``<a-b, c-d> = <a,c> - <a,d> - <b,c> + <b,d>`` would cancel catastrophically).

:func:`streamed_statistics` reads each snapshot once, in step order, and computes per-step numbers
in float64 (norms, distances and cosines to init, update norms, sign flips, quantiles, kurtosis).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from trajscope.functional.gram import gram_accumulate_
from trajscope.measures.groups import Group
from trajscope.measures.trajectory import Trajectory, progress

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
DEFAULT_BUDGET = 512 << 20  # bytes of the column-block buffers


def block_columns(n_rows: int, n_buffers: int, budget_bytes: int, itemsize: int = 4) -> int:
    """Columns per block so that ``n_buffers`` buffers of (n_rows, c) fit the budget (>= 1024)."""
    return max(1024, int(budget_bytes // (itemsize * max(n_rows, 1) * max(n_buffers, 1))))


def snapshot_grams(traj: Trajectory, group: Group, steps: np.ndarray, windows: Sequence[int] = (1,),
                   ext: bool = True, budget_bytes: int = DEFAULT_BUDGET, block: int = 512,
                   dtype: torch.dtype = torch.float32, device=None, show: bool = False) -> dict:
    """Exact Gram matrices of ``group`` at snapshot ``steps`` (n,), float64, in one pass.

    Returns ``{"ext": (n, n)}`` if ``ext`` -- the Gram of the rows ``[theta_0, theta_1 - theta_0, ...,
    theta_{n-1} - theta_0]`` (theta_0 = the first of ``steps``) -- and ``{("updates", w): (n-w, n-w)}``
    for each window w in ``windows`` (0 < w < n): the Gram of ``theta_{i+w} - theta_i``, i = 0..n-1-w.
    Products in ``dtype`` on ``device`` (default CPU), accumulated in float64.
    """
    n = len(steps)
    windows = sorted({int(w) for w in windows if 0 < int(w) < n})
    itemsize = torch.finfo(dtype).bits // 8
    cols = block_columns(n, 1 + bool(windows), budget_bytes, itemsize)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    out: dict = {}
    if ext:
        out["ext"] = torch.zeros(n, n, dtype=torch.float64, device=dev)
    for w in windows:
        out[("updates", w)] = torch.zeros(n - w, n - w, dtype=torch.float64, device=dev)
    blocks = traj.column_blocks(group, cols)
    width = max((sum(p[4] for p in b) for b in blocks), default=0)
    X = torch.empty(n, width, dtype=dtype)  # (n, c): one column block of every snapshot
    U = torch.empty(n, width, dtype=dtype, device=dev) if windows else None
    for pieces in progress(blocks, len(blocks), f"gram {group.name}", show):
        c = sum(p[4] for p in pieces)
        Xc = X[:, :c]
        for i, step in enumerate(steps):
            traj.read_pieces(int(step), pieces, Xc[i])
        Xd = Xc.to(dev) if dev.type != "cpu" else Xc
        for w in windows:
            Uc = U[:n - w, :c]
            torch.sub(Xd[w:], Xd[:n - w], out=Uc)  # (n-w, c) updates
            gram_accumulate_(out[("updates", w)], Uc, block=block)
        if ext:
            Xd[1:] -= Xd[0]  # (n-1, c) displacements, in place
            gram_accumulate_(out["ext"], Xd, block=block)
    return out


def _weight_stats(x: Tensor, x0: Tensor, quantiles: Sequence[float]) -> dict[str, float | np.ndarray]:
    """Sign flips vs init, |w| quantiles and excess kurtosis of one group vector (float64)."""
    flips = float(((torch.sign(x) * torch.sign(x0)) < 0).to(torch.float64).mean()) if len(x) else np.nan
    a = x.abs().numpy()
    q = np.quantile(a, quantiles) if len(a) else np.full(len(quantiles), np.nan)
    d = x - x.mean()
    m2 = float((d * d).mean()) if len(x) else np.nan
    m4 = float((d * d * d * d).mean()) if len(x) else np.nan
    kurt = m4 / (m2 * m2) - 3.0 if m2 and m2 > 0 else np.nan
    return {"sign_flip_fraction": flips, "abs_quantiles": q, "kurtosis": kurt}


def _grad_norms(traj: Trajectory, groups: Sequence[Group], steps: np.ndarray) -> dict[str, np.ndarray]:
    """Per group and step: the L2 norm of the recorded gradient, from ``grads`` snapshots where the
    run has them, else (group ``all`` only) the per-step scalar ``grad_norm``; NaN where unrecorded."""
    out = {g.name: np.full(len(steps), np.nan) for g in groups}
    grad_steps = set(traj.run.snapshot_steps("grads"))
    scal = traj.run.scalars(["grad_norm"], wide=True)
    scal = scal["grad_norm"] if "grad_norm" in scal else None
    for i, step in enumerate(steps.tolist()):
        grads = traj.run.load_snapshot(step, "grads") if step in grad_steps else None
        for g in groups:
            if grads is not None and all(n in grads for n in g.tensors):
                sq = sum(float(grads[n].double().pow(2).sum()) for n in g.tensors)
                out[g.name][i] = sq ** 0.5
            elif g.is_all and scal is not None and step in scal.index:
                out[g.name][i] = float(scal.loc[step])
    return out


def streamed_statistics(traj: Trajectory, groups: Sequence[Group], steps: np.ndarray, weights: bool = True,
                        quantiles: Sequence[float] = QUANTILES, show: bool = False) -> dict[str, dict]:
    """Per group, arrays over ``steps`` (n,) from one ordered pass over the snapshots (float64):

    ``norm`` |x_i|; ``dot0`` <x_i, x_0>; ``dist0`` |x_i - x_0|; ``update_norm`` |x_i - x_{i-1}| (NaN at
    i=0); ``update_dot`` <x_i - x_{i-1}, x_{i-1} - x_{i-2}> (NaN for i<2); with ``weights`` also
    ``sign_flip_fraction``, ``abs_quantiles`` (n, q), ``kurtosis`` and ``grad_norm``.
    """
    n = len(steps)
    keys = ["norm", "dot0", "dist0", "update_norm", "update_dot"]
    out = {g.name: {k: np.full(n, np.nan) for k in keys} for g in groups}
    if weights:
        for g in groups:
            out[g.name].update(sign_flip_fraction=np.full(n, np.nan), kurtosis=np.full(n, np.nan),
                               abs_quantiles=np.full((n, len(quantiles)), np.nan))
    first: dict[str, Tensor] = {}
    prev: dict[str, Tensor] = {}
    prev_u: dict[str, Tensor] = {}
    it = traj.vectors(steps, groups, dtype=torch.float64)
    for i, (step, vecs) in enumerate(progress(it, n, "statistics", show)):
        for g in groups:
            x, o = vecs[g.name], out[g.name]
            x0 = first.setdefault(g.name, x)
            o["norm"][i] = float(x.norm())
            o["dot0"][i] = float(x @ x0)
            o["dist0"][i] = float((x - x0).norm())
            if i >= 1:
                u = x - prev[g.name]
                o["update_norm"][i] = float(u.norm())
                if i >= 2:
                    o["update_dot"][i] = float(u @ prev_u[g.name])
                prev_u[g.name] = u
            prev[g.name] = x
            if weights:
                ws = _weight_stats(x, x0, quantiles)
                o["sign_flip_fraction"][i], o["kurtosis"][i] = ws["sign_flip_fraction"], ws["kurtosis"]
                o["abs_quantiles"][i] = ws["abs_quantiles"]
    if weights:
        for name, gn in _grad_norms(traj, groups, steps).items():
            out[name]["grad_norm"] = gn
    return out


def vector_statistics(X: Tensor) -> dict[str, np.ndarray]:
    """The inner-product statistics of :func:`streamed_statistics` (norm, dot0, dist0, update_norm,
    update_dot) for rows X (n, d) held in memory (e.g. sketches), vectorized, float64."""
    X = X.to(torch.float64)
    n = X.shape[0]
    D = X - X[:1]
    U = X[1:] - X[:-1]  # (n-1, d)
    nan = torch.full((1,), float("nan"), dtype=torch.float64)
    update_norm = torch.cat([nan, U.norm(dim=1)])
    update_dot = torch.cat([nan, nan, (U[1:] * U[:-1]).sum(1)])
    return {"norm": X.norm(dim=1).numpy(), "dot0": (X @ X[0]).numpy(), "dist0": D.norm(dim=1).numpy(),
            "update_norm": update_norm[:n].numpy(), "update_dot": update_dot[:n].numpy()}
