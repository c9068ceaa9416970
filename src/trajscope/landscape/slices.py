"""Loss slices of a recorded run: a 2-D plane (random or PCA) and a 1-D line, stored in the run.

The model and data are rebuilt from the run's config (its workload, options and seed) and the
parameters read from its snapshots, so a slice needs parameter snapshots of every trainable tensor.

- ``plane="random"``: two standard Gaussian directions (drawn from ``seed``), filter-normalized
  against the origin's weights (:mod:`~trajscope.landscape.directions`; ``ignore="biasbn"``: biases
  and BatchNorm parameters are held at their origin values); ``span`` s gives alpha, beta in [-s, s]
  (default 1, in units of the filter-normalized directions).
- ``plane="pca"``: the top two principal axes of the trajectory of snapshots
  (:func:`~trajscope.measures.pca.trajectory_pca`, group ``all``, exact; unit vectors); default span
  the box around the projected trajectory, widened by 25% of its size on each side.

The origin is the snapshot at ``step`` (default the last one). Every snapshot step is projected onto
the plane by least squares (``coords`` (T, 2), relative to the origin). ``data="batch"``: the first
``batch_size`` training examples; ``data="train"``: the whole training set in batches of
``batch_size``. Loss: the workload's loss, mean over the examples; accuracy: fraction correct;
BatchNorm in train mode on each batch's statistics (:mod:`~trajscope.landscape.grid`).

The result is saved as ``landscape-<plane>`` (``landscape-line`` for :func:`line_slice`) with tensors
``losses``, ``accuracies`` (A, B) (row i: alphas[i]), ``alphas`` (A,), ``betas`` (B,),
``coord_steps`` (T,), ``coords`` (T, 2) (lines: ``losses``, ``accuracies``, ``alphas``).
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import torch

from trajscope import workloads
from trajscope.errors import UsageError
from trajscope.landscape.directions import plane_coordinates, random_direction
from trajscope.landscape.grid import evaluate_points, grid_coefficients
from trajscope.measures.trajectory import Trajectory

PLANES = ("random", "pca")
DATA = ("batch", "train")


def _setup(traj: Trajectory, data: str, batch_size: int):
    """(model, workload, batches) rebuilt from the run's config."""
    if data not in DATA:
        raise UsageError(f"data must be one of {DATA}, got {data!r}")
    cfg = traj.run.config
    if "workload" not in cfg:
        raise UsageError(f"run {traj.id} was not made from a trajscope workload; evaluate your own model "
                         "with trajscope.landscape.evaluate_points")
    wl = workloads.get(cfg["workload"])
    options = cfg.get("workload_options", {})
    with torch.random.fork_rng():  # the initial weights are overwritten; leave the caller's RNG alone
        model = wl.make_model(options)
    d = wl.make_data(traj.run.seed, options)
    if data == "batch":
        batches = [(d.x_train[:batch_size], d.y_train[:batch_size])]
    else:
        batches = [(d.x_train[a:a + batch_size], d.y_train[a:a + batch_size])
                   for a in range(0, len(d.x_train), batch_size)]
    return model, wl, batches


def _origin(traj: Trajectory, model, step: int | None) -> tuple[int, dict[str, torch.Tensor]]:
    traj.require_snapshots("a loss landscape")
    steps = traj.snapshot_steps
    step = int(steps[-1]) if step is None else int(step)
    if step not in steps:
        raise UsageError(f"run {traj.id} has no snapshot at step {step}")
    snap = traj.snapshot(step)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in snap]
    if missing:
        raise UsageError(f"the snapshots of run {traj.id} lack {missing[0]!r} (and {len(missing) - 1} more); "
                         "a landscape needs every parameter")
    return step, {n: snap[n].to(torch.float32) for n, p in model.named_parameters() if p.requires_grad}


def _directions(traj, plane, origin, seed, ignore):
    """(two directions, extra JSON)."""
    if plane == "random":
        g = torch.Generator().manual_seed(int(seed))
        return [random_direction(origin, g, ignore) for _ in range(2)], {"ignore": ignore}
    from trajscope.measures.pca import pca_directions, trajectory_pca

    pca = trajectory_pca(traj, "all", exact=True, n_components=2)
    return pca_directions(traj, pca, "all", 2), {
        "explained_variance_ratio": [float(v) for v in pca.explained_variance_ratio[:2]]}


def _axes(plane, span, steps, coords) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    if span is None and plane == "pca":
        lo = torch.minimum(coords.min(0).values, torch.zeros(2, dtype=torch.float64))
        hi = torch.maximum(coords.max(0).values, torch.zeros(2, dtype=torch.float64))
        pad = 0.25 * (hi - lo).clamp_min(1e-6)
        box = [float(lo[0] - pad[0]), float(hi[0] + pad[0]), float(lo[1] - pad[1]), float(hi[1] + pad[1])]
    elif span is None or np.isscalar(span):
        s = 1.0 if span is None else float(span)
        box = [-s, s, -s, s]
    else:
        box = [float(v) for v in span]
        if len(box) != 4:
            raise UsageError("span is a number s (the square [-s, s]^2) or (alpha0, alpha1, beta0, beta1)")
    a = torch.linspace(box[0], box[1], steps, dtype=torch.float64)
    b = torch.linspace(box[2], box[3], steps, dtype=torch.float64)
    return a, b, box


def _save(traj: Trajectory, name: str, summary: dict, tensors: dict) -> None:
    from trajscope.store import Run

    run = Run.open(traj.run.path, write=True)
    try:
        run.save_result(name, summary, tensors)
    finally:
        run.close()


def landscape(ref: "str | os.PathLike", root: "str | os.PathLike | None" = None, plane: str = "random",
              steps: int = 51, span: Any = None, data: str = "batch", batch_size: int = 1000, seed: int = 0,
              progress: bool = True, *, step: int | None = None, ignore: str | None = "biasbn",
              chunk_size: int = 8, strategy: str = "auto", save: bool = True) -> dict[str, Any]:
    """Evaluate a ``steps`` x ``steps`` plane of the run ``ref`` (module docstring); store it as
    ``landscape-<plane>`` (unless ``save=False``) and return its JSON summary."""
    if plane not in PLANES:
        raise UsageError(f"plane must be one of {PLANES}, got {plane!r}")
    if steps < 2:
        raise UsageError(f"steps must be >= 2, got {steps}")
    t0 = time.perf_counter()
    with Trajectory.open(ref, root) as traj:
        model, wl, batches = _setup(traj, data, batch_size)
        center, origin = _origin(traj, model, step)
        dirs, extra = _directions(traj, plane, origin, seed, ignore)
        coord_steps = traj.snapshot_steps.copy()
        coords = plane_coordinates((traj.snapshot(int(s)) for s in coord_steps), origin, dirs)
        alphas, betas, box = _axes(plane, span, steps, coords)
        coeffs = torch.cat([grid_coefficients(alphas, betas), torch.zeros(1, 2, dtype=torch.float64)])
        stats: dict = {}
        losses, accs = evaluate_points(model, wl.loss_fn, batches, origin, dirs, coeffs, chunk_size=chunk_size,
                                       strategy=strategy, progress=progress, stats=stats)
        summary = {"run_id": traj.id, "result": f"landscape-{plane}", "plane": plane, "center_step": center,
                   "steps": steps, "span": box, "data": data, "n_examples": sum(len(x) for x, _ in batches),
                   "batch_size": batch_size, "seed": seed, "loss_center": float(losses[-1]),
                   "accuracy_center": float(accs[-1]), "loss_min": float(losses[:-1].min()),
                   "loss_max": float(losses[:-1].max()), "points": len(coeffs),
                   "trajectory_points": len(coord_steps), "strategy": stats["strategy"], **extra}
        summary["wall_s"] = time.perf_counter() - t0
        if save:
            _save(traj, summary["result"], summary, {
                "losses": losses[:-1].view(steps, steps), "accuracies": accs[:-1].view(steps, steps),
                "alphas": alphas, "betas": betas, "coord_steps": torch.as_tensor(coord_steps),
                "coords": coords})
    return summary


def _barrier(alphas: torch.Tensor, losses: torch.Tensor, l0: float, l1: float) -> float | None:
    """max over grid alphas in [0, 1] of L(alpha) - ((1 - alpha) L(0) + alpha L(1)) (Frankle et al.
    2020's loss barrier on the segment); None if no grid point lies in [0, 1]."""
    inside = (alphas >= 0) & (alphas <= 1)
    if not inside.any():
        return None
    a = alphas[inside]
    return float((losses[inside] - ((1 - a) * l0 + a * l1)).max())


def line_slice(ref: "str | os.PathLike", root: "str | os.PathLike | None" = None, start: int | None = None,
               end: int | None = None, steps: int = 51, span: tuple[float, float] = (-0.5, 1.5),
               data: str = "batch", batch_size: int = 1000, progress: bool = True, *,
               chunk_size: int = 8, strategy: str = "auto", save: bool = True) -> dict[str, Any]:
    """Loss along theta(alpha) = theta_start + alpha (theta_end - theta_start), alpha over ``span``
    (``steps`` points; default start: the first snapshot, the init; end: the last). Stored as
    ``landscape-line``; returns its JSON summary (losses at alpha = 0 and 1 included)."""
    t0 = time.perf_counter()
    with Trajectory.open(ref, root) as traj:
        model, wl, batches = _setup(traj, data, batch_size)
        s0 = int(traj.snapshot_steps[0]) if start is None and traj.has_snapshots else start
        s1, theta1 = _origin(traj, model, end)
        s0, theta0 = _origin(traj, model, s0)
        direction = {n: theta1[n] - theta0[n] for n in theta0}
        alphas = torch.linspace(float(span[0]), float(span[1]), steps, dtype=torch.float64)
        coeffs = torch.cat([alphas, torch.tensor([0.0, 1.0], dtype=torch.float64)])[:, None]
        losses, accs = evaluate_points(model, wl.loss_fn, batches, theta0, [direction], coeffs,
                                       chunk_size=chunk_size, strategy=strategy, progress=progress)
        summary = {"run_id": traj.id, "result": "landscape-line", "start_step": s0, "end_step": s1,
                   "steps": steps, "span": [float(span[0]), float(span[1])], "data": data,
                   "n_examples": sum(len(x) for x, _ in batches), "loss_start": float(losses[-2]),
                   "loss_end": float(losses[-1]), "loss_max": float(losses[:-2].max()),
                   "barrier": _barrier(alphas, losses[:-2], float(losses[-2]), float(losses[-1]))}
        summary["wall_s"] = time.perf_counter() - t0
        if save:
            _save(traj, "landscape-line", summary, {"losses": losses[:-2], "accuracies": accs[:-2],
                                                    "alphas": alphas})
    return summary
