"""Trajectory measures on synthetic trajectories written to a store, against closed forms; errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from trajscope.errors import CorruptRunError, UsageError
from trajscope.functional.sketch import Sketcher
from trajscope.measures import (MDSResult, NeedsSnapshotsError, Trajectory, TrajectoryMap, TrajectoryPCA,
                                analyze, early_statistics, mds, path_statistics, trajectory_map,
                                trajectory_pca)
from trajscope.measures.streaming import snapshot_grams
from trajscope.store import Run

SHAPES = {"a.weight": (6, 50), "a.bias": (6,), "b.weight": (2, 7)}  # P = 320 unless resized


def write_run(root, X: np.ndarray, steps=None, snapshots=True, sketch=True, shapes=None, seed=0) -> str:
    """A run whose trajectory is the rows of X (T, P) at ``steps``, split into named tensors;
    ``snapshots``: True (every step), False, or the steps that get one (all get a sketch)."""
    shapes = shapes or {"w": (X.shape[1],)}
    steps = list(range(len(X))) if steps is None else [int(s) for s in steps]
    sk = Sketcher(1024, 0)
    with Run.create(root, config={"synthetic": seed, "T": len(X)}, seed=seed) as run:
        for step, x in zip(steps, X):
            named, off = {}, 0
            for name, shape in shapes.items():
                size = int(np.prod(shape))
                named[name] = torch.tensor(x[off:off + size], dtype=torch.float32).reshape(shape)
                off += size
            if snapshots is True or (snapshots and step in snapshots):
                run.save_snapshot(step, named)
            if sketch:
                run.log_sketch(step, sk.sketch(named.items()), k=1024, seed=0)
            run.log_scalars(step, {"grad_norm": float(step)})
        return str(run.path)


def rng(seed=0):
    return np.random.default_rng(seed)


# ----------------------------------------------------------------------------- closed forms
def test_straight_line(tmp_path):
    steps = [0, 1, 2, 3, 5, 8, 13, 21, 34]  # uneven, like dense-early then log-spaced snapshots
    theta0, v = rng().normal(size=320), rng(1).normal(size=320)
    X = np.stack([theta0 + s * v for s in steps])
    traj = Trajectory.open(write_run(tmp_path, X, steps, shapes=SHAPES))
    assert mds(traj, "all", "updates").mds == pytest.approx(1.0, abs=1e-6)
    assert mds(traj, "all", "updates", window=3).mds == pytest.approx(1.0, abs=1e-6)
    assert mds(traj, "all", "displacement").mds == pytest.approx(1.0, abs=1e-6)
    path = path_statistics(traj)
    np.testing.assert_allclose(path.straightness[1:], 1.0, atol=1e-6)
    np.testing.assert_allclose(path.update_cosine[2:], 1.0, atol=1e-6)
    np.testing.assert_allclose(path.distance_from_init, np.array(steps) * np.linalg.norm(v), rtol=1e-5)
    pca = trajectory_pca(traj)
    assert pca.components_90 == pca.components_99 == 1
    assert pca.effective_dim == pytest.approx(1.0, abs=1e-6)
    assert pca.explained_variance_ratio[0] == pytest.approx(1.0, abs=1e-6)
    expected = (np.array(steps) - np.mean(steps)) * np.linalg.norm(v)  # positions along the line
    at = np.isin(pca.coord_steps, steps)
    np.testing.assert_allclose(pca.coords[at, 0], expected, rtol=1e-4, atol=1e-3)
    # the theta map is the closed-form cosine of theta_0 + s v
    C = trajectory_map(traj, "all", "theta").cosine
    U = X / np.linalg.norm(X, axis=1, keepdims=True)
    np.testing.assert_allclose(C, U @ U.T, atol=1e-6)


def test_isotropic_random_walk(tmp_path):
    n, P = 25, 20_000
    X = np.cumsum(rng(2).normal(size=(n, P)), axis=0) + 3.0 * rng(3).normal(size=P)
    traj = Trajectory.open(write_run(tmp_path, X))
    tol = 6 / math.sqrt(P)  # ~ six standard deviations of one sampled cosine
    # independent updates: every cosine between updates ~ 0, so MDS ~ 0 and straightness ~ 1/sqrt(n-1)
    upd = trajectory_map(traj, "all", "updates").cosine
    assert np.abs(upd[~np.eye(n - 1, dtype=bool)]).max() < tol
    assert abs(mds(traj, "all", "updates").mds) < tol / 5
    path = path_statistics(traj)
    assert path.straightness[-1] == pytest.approx(1 / math.sqrt(n - 1), rel=0.05)
    assert np.nanmax(np.abs(path.update_cosine)) < tol
    # displacements: E cos(D_i, D_j) = sqrt(min(i, j) / max(i, j))
    disp = trajectory_map(traj, "all", "displacement").cosine
    i = np.arange(1, n)
    expected = np.sqrt(np.minimum.outer(i, i) / np.maximum.outer(i, i))
    assert np.abs(disp - expected).max() < 0.05
    # PCA spectrum: the expected centered Gram of a walk is H K H with K[i, j] = min(i, j)
    t = np.arange(n)
    H = np.eye(n) - 1.0 / n
    lam = np.linalg.eigvalsh(H @ np.minimum.outer(t, t) @ H)[::-1]
    evr = lam / lam.sum()
    pca = trajectory_pca(traj)
    np.testing.assert_allclose(pca.explained_variance_ratio[:5], evr[:5], atol=0.02)
    assert pca.explained_variance_ratio[0] == pytest.approx(0.61, abs=0.03)  # ~6/pi^2 for long walks


def test_planar_circle(tmp_path):
    n = 16
    phi = 2 * np.pi * np.arange(n) / n
    e = np.linalg.qr(rng(4).normal(size=(320, 2)))[0]  # two orthonormal directions
    X = 5.0 + 2.0 * (np.cos(phi)[:, None] * e[:, 0] + np.sin(phi)[:, None] * e[:, 1])
    traj = Trajectory.open(write_run(tmp_path, X, shapes=SHAPES))
    pca = trajectory_pca(traj)
    assert pca.components_90 == pca.components_99 == 2
    assert pca.effective_dim == pytest.approx(2.0, abs=1e-5)
    np.testing.assert_allclose(pca.explained_variance_ratio[:2], [0.5, 0.5], atol=1e-6)
    assert pca.explained_variance_ratio[2:].sum() < 1e-6
    radius = np.hypot(pca.coords[:, 0], pca.coords[:, 1])
    np.testing.assert_allclose(radius, 2.0, rtol=1e-4)
    # successive chords turn by 2 pi / n; chord i and j differ by 2 pi (i - j) / n
    path = path_statistics(traj)
    np.testing.assert_allclose(path.update_cosine[2:], math.cos(2 * math.pi / n), atol=1e-5)
    k = np.arange(n - 1)
    C = np.cos(2 * np.pi * np.subtract.outer(k, k) / n)
    assert mds(traj, "all", "updates").mds == pytest.approx(C[~np.eye(n - 1, dtype=bool)].mean(), abs=1e-5)
    chord = 2 * 2.0 * math.sin(math.pi / n)
    assert path.straightness[-1] == pytest.approx(2 * 2.0 * math.sin(math.pi * (n - 1) / n) / ((n - 1) * chord))


def test_pca_coordinates_between_snapshots_come_from_sketches(tmp_path):
    steps, snaps = np.arange(40), [0, 1, 2, 4, 8, 16, 32, 39]
    theta0, v = rng(10).normal(size=320), rng(11).normal(size=320)
    X = theta0 + steps[:, None] * v
    traj = Trajectory.open(write_run(tmp_path, X, steps, snapshots=snaps, shapes=SHAPES))
    pca = trajectory_pca(traj)
    assert pca.coord_steps.tolist() == steps.tolist()
    assert pca.coord_from_sketch.tolist() == [int(s not in snaps) for s in steps]
    expected = (steps - np.mean(snaps)) * np.linalg.norm(v)
    np.testing.assert_allclose(pca.coords[:, 0], expected, rtol=0.15, atol=1e-3 * np.abs(expected).max())
    assert pca.sketch_coord_error < 0.1 and pca.sketch is not None


def test_column_blocks_and_float64_give_the_same_grams(tmp_path):
    X = rng(5).normal(size=(7, 320))
    traj = Trajectory.open(write_run(tmp_path, X, shapes=SHAPES))
    g = traj.groups("all")[0]
    steps = traj.snapshot_steps
    assert len(traj.column_blocks(g, 32)) > 5  # rows of a.weight split, tensors crossed
    small = snapshot_grams(traj, g, steps, [1, 2], budget_bytes=1, block=2)
    big = snapshot_grams(traj, g, steps, [1, 2], dtype=torch.float64)
    for key in big:
        torch.testing.assert_close(small[key], big[key], rtol=1e-5, atol=1e-4)
    D = X - X[0]
    np.testing.assert_allclose(big["ext"][1:, 1:].numpy(), D[1:] @ D[1:].T, rtol=1e-6, atol=1e-6)
    U = X[2:] - X[:-2]
    np.testing.assert_allclose(big[("updates", 2)].numpy(), U @ U.T, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- errors
def test_corrupt_or_missing_snapshot_gives_the_store_error(tmp_path):
    path = write_run(tmp_path, rng(6).normal(size=(5, 320)), shapes=SHAPES)
    traj = Trajectory.open(path)
    victim = traj.snapshot_path(3)
    victim.write_bytes(victim.read_bytes()[:40])
    for measure in (lambda: mds(Trajectory.open(path)), lambda: early_statistics(Trajectory.open(path))):
        with pytest.raises(CorruptRunError, match=r"snapshot file .*000000003.* is corrupt") as e:
            measure()
        assert "\n" not in str(e.value)
    victim.unlink()
    with pytest.raises(CorruptRunError, match=r"snapshot file .*000000003.* is missing"):
        analyze(path, progress=False)


def test_sketch_only_run(tmp_path):
    X = np.cumsum(rng(7).normal(size=(30, 320)), axis=0)
    path = write_run(tmp_path, X, snapshots=False, shapes=SHAPES)
    traj = Trajectory.open(path)
    with pytest.raises(NeedsSnapshotsError, match="needs parameter snapshots") as e:
        early_statistics(traj)
    assert "\n" not in str(e.value) and e.value.exit_code == 2
    for bad in (lambda: analyze(path, groups=["layers"], progress=False),
                lambda: mds(traj, "all", exact=True)):
        with pytest.raises(NeedsSnapshotsError, match="only sketches"):
            bad()
    summary = analyze(path, progress=False)
    g = summary["groups"]["all"]
    assert g["source"] == "sketches" and g["sign_flip_fraction_final"] is None
    assert g["n_points"] == 30 and 0 < g["mds_displacement"] <= 1
    assert summary["sketch"]["sketch_k"] == 1024


def test_bad_group_specs_are_one_line_usage_errors(tmp_path):
    traj = Trajectory.open(write_run(tmp_path, rng(8).normal(size=(4, 320)), shapes=SHAPES))
    for spec in ("nothing.*", "qkv", "=a.*", "x="):
        with pytest.raises(UsageError) as e:
            traj.groups(spec)
        assert "\n" not in str(e.value)
    with pytest.raises(UsageError, match="sketches hold only the whole"):
        mds(traj, "a.*", exact=False)
    assert [g.name for g in traj.groups(["layers", "tensors"])] == ["a", "b", "a.bias", "a.weight", "b.weight"]
    assert traj.groups("ab=a.bias,b.*")[0].tensors == ("a.bias", "b.weight")
    with pytest.raises(UsageError, match="two different groups"):
        traj.groups(["x=a.*", "x=b.*"])


# ----------------------------------------------------------------------------- results
def test_results_round_trip_through_the_run(tmp_path):
    path = write_run(tmp_path, rng(9).normal(size=(6, 320)).cumsum(0), shapes=SHAPES)
    summary = analyze(path, groups=["all", "a.*"], progress=False)
    json.dumps(summary, allow_nan=False)  # plain JSON
    from trajscope.measures import summary_lines

    assert len(summary_lines(summary)) == 4
    run = Run.open(path)
    assert set(summary["results"]) <= set(run.result_names())
    m = trajectory_map(Trajectory(run), "a.*", "displacement")
    loaded = TrajectoryMap.load(run, m.name)
    np.testing.assert_array_equal(loaded.cosine, m.cosine)
    assert loaded.to_frame().shape == (25, 5)
    r = MDSResult.load(run, "mds.updates:all")
    assert r.mds == pytest.approx(summary["groups"]["all"]["mds_updates"])
    assert r.to_frame().columns.tolist() == ["start_step", "end_step", "mds_window"]
    pca = TrajectoryPCA.load(run, "pca:all")
    assert pca.to_frame().shape[0] == 6 and pca.components_90 == summary["groups"]["all"]["pca_components_90"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_snapshots_of_other_dtypes_are_read_and_cast(tmp_path, dtype):
    X = rng(13).normal(size=(4, 60))
    with Run.create(tmp_path, config={"dtype": str(dtype)}) as run:
        for step, x in enumerate(X):
            w = torch.tensor(x).reshape(6, 10).to(dtype)
            run.save_snapshot(step, {"w": w, "s": torch.tensor(1.5, dtype=dtype)})
    traj = Trajectory.open(run.path)
    cast = np.stack([np.append(traj.vector(s, traj.group("all")).numpy(), []) for s in range(4)])
    assert cast.shape == (4, 61)
    G = snapshot_grams(traj, traj.group("all"), traj.snapshot_steps, [1], budget_bytes=1)
    U = np.diff(cast, axis=0)
    np.testing.assert_allclose(G[("updates", 1)].numpy(), U @ U.T, rtol=1e-5, atol=1e-5)


def test_column_blocks_are_packed_and_cover_every_element(tmp_path):
    traj = Trajectory.open(write_run(tmp_path, rng(12).normal(size=(2, 320)), shapes=SHAPES))
    g = traj.groups("all")[0]  # a.bias (6), a.weight (6 x 50), b.weight (2 x 7)
    for max_elems in (1, 7, 40, 56, 320, 10_000):
        blocks = traj.column_blocks(g, max_elems)
        sizes = [sum(p[4] for p in b) for b in blocks]
        assert sum(sizes) == 320
        assert all(s <= max(max_elems, 50) for s in sizes)  # a row of 50 is never split
        first_rows = [b[0][4] // (b[0][2] - b[0][1]) for b in blocks]  # one row of each block's first piece
        assert all(s + r > max_elems for s, r in zip(sizes[:-1], first_rows[1:]))  # packed: no room left
        for b in blocks:
            assert [p[3] for p in b] == list(np.cumsum([0] + [p[4] for p in b])[:-1])
