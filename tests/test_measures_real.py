"""Every measure and variant on small real runs against a brute-force numpy implementation; the
sketched measures against the exact ones within the sketch's stated error bounds."""

from __future__ import annotations

import numpy as np
import pytest

from trajscope.config import RecordConfig, RunConfig
from trajscope.functional.sketch import cosine_error_bound, norm_error_bound
from trajscope.measures import (Trajectory, analyze, early_statistics, mds, path_statistics,
                                pca_directions, trajectory_map, trajectory_pca)
from trajscope.train import Trainer

STEPS = 14


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    cfg = RunConfig.for_workload("digits-mlp", steps=STEPS, lr=0.01, batch_size=32,
                                 record=RecordConfig(checkpoint_every=0, grads=True))
    out = Trainer(cfg, root=tmp_path_factory.mktemp("runs"), progress=False).fit()
    traj = Trajectory.open(out["path"])
    yield traj
    traj.close()


def load_all(traj: Trajectory, tensors) -> np.ndarray:
    """Brute force: every snapshot of the tensors, concatenated, (T, P) float64."""
    return np.stack([np.concatenate([traj.snapshot(s)[n].double().numpy().ravel() for n in tensors])
                     for s in traj.snapshot_steps])


def cos_map(V: np.ndarray) -> np.ndarray:
    U = V / np.linalg.norm(V, axis=1, keepdims=True)
    return U @ U.T


def ref_mds(C: np.ndarray) -> float:
    n = len(C)
    return float(sum(C[i, j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1)))


def variant_vectors(X: np.ndarray, variant: str, window: int) -> np.ndarray:
    if variant == "theta":
        return X
    if variant == "displacement":
        return X[1:] - X[0]
    return X[window:] - X[:-window]


@pytest.mark.parametrize("spec", ["all", "0.*", "2.bias"])
@pytest.mark.parametrize("variant,window", [("theta", 1), ("displacement", 1), ("updates", 1), ("updates", 3)])
def test_maps_and_mds_match_brute_force(digits, spec, variant, window):
    g = digits.groups(spec)[0]
    V = variant_vectors(load_all(digits, g.tensors), variant, window)
    C = cos_map(V)
    m = trajectory_map(digits, g, variant, window)
    np.testing.assert_allclose(m.cosine, C, atol=2e-6)
    np.testing.assert_allclose(m.norms, np.linalg.norm(V, axis=1), rtol=1e-5)
    r = mds(digits, g, variant, window, width=4, stride=3)
    assert r.mds == pytest.approx(ref_mds(C), abs=2e-6)
    assert r.mds_with_diagonal == pytest.approx(C.mean(), abs=2e-6)
    starts = list(range(0, len(V) - 3, 3))
    starts += [len(V) - 4] if starts[-1] != len(V) - 4 else []
    np.testing.assert_allclose(r.mds_window, [ref_mds(C[a:a + 4, a:a + 4]) for a in starts], atol=2e-6)
    steps = digits.snapshot_steps
    ends = steps[1:] if variant == "displacement" else steps[window:] if variant == "updates" else steps
    assert r.window_end_step.tolist() == [ends[a + 3] for a in starts]


@pytest.mark.parametrize("spec", ["all", "2.*"])
def test_path_and_early_statistics_match_brute_force(digits, spec):
    g = digits.groups(spec)[0]
    X = load_all(digits, g.tensors)
    x0, dist = X[0], np.linalg.norm(X - X[0], axis=1)
    U = np.diff(X, axis=0)
    un = np.linalg.norm(U, axis=1)
    p = path_statistics(digits, g)
    np.testing.assert_allclose(p.distance_from_init, dist, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(p.cosine_to_init, X @ x0 / np.linalg.norm(X, axis=1) / np.linalg.norm(x0), atol=1e-12)
    np.testing.assert_allclose(p.update_norm[1:], un, rtol=1e-9)
    np.testing.assert_allclose(p.update_cosine[2:], (U[1:] * U[:-1]).sum(1) / (un[1:] * un[:-1]), atol=1e-9)
    np.testing.assert_allclose(p.straightness[1:], dist[1:] / np.cumsum(un), rtol=1e-9)
    e = early_statistics(digits, g)
    np.testing.assert_allclose(e.relative_distance_from_init, dist / np.linalg.norm(x0), rtol=1e-9)
    np.testing.assert_allclose(e.sign_flip_fraction, (np.sign(X) * np.sign(x0) < 0).mean(1))
    np.testing.assert_allclose(e.abs_quantiles, np.quantile(np.abs(X), e.quantiles, axis=1).T, rtol=1e-6)
    d = X - X.mean(1, keepdims=True)
    kurt = (d ** 4).mean(1) / (d ** 2).mean(1) ** 2 - 3
    np.testing.assert_allclose(e.kurtosis, kurt, rtol=1e-9)
    grads = np.array([np.sqrt(sum((digits.run.load_snapshot(int(s), "grads")[n].double() ** 2).sum().item()
                                  for n in g.tensors)) for s in digits.snapshot_steps[1:]])
    np.testing.assert_allclose(e.grad_norm[1:], grads, rtol=1e-6)
    assert e.to_frame().columns.tolist()[-5:] == ["abs_q10", "abs_q25", "abs_q50", "abs_q75", "abs_q90"]


@pytest.mark.parametrize("spec", ["all", "0.weight"])
def test_pca_matches_brute_force(digits, spec):
    g = digits.groups(spec)[0]
    X = load_all(digits, g.tensors)
    Xc = X - X.mean(0)
    _, s, Vt = np.linalg.svd(Xc, full_matrices=False)
    lam = s ** 2
    evr = lam / lam.sum()
    pca = trajectory_pca(digits, g, n_components=3)
    np.testing.assert_allclose(pca.explained_variance_ratio[:6], evr[:6], atol=1e-6)
    assert pca.components_90 == np.searchsorted(np.cumsum(evr), 0.9) + 1
    assert pca.components_99 == np.searchsorted(np.cumsum(evr), 0.99) + 1
    assert pca.effective_dim == pytest.approx(lam.sum() ** 2 / (lam ** 2).sum(), rel=1e-5)
    at = np.isin(pca.coord_steps, digits.snapshot_steps) & (pca.coord_from_sketch == 0)
    np.testing.assert_allclose(np.abs(pca.coords[at]), np.abs(Xc @ Vt[:3].T), rtol=1e-3, atol=1e-5)
    axes = pca_directions(digits, pca, g, n=2)  # named tensors shaped like the parameters
    A = np.stack([np.concatenate([a[n].double().numpy().ravel() for n in g.tensors]) for a in axes], 1)
    np.testing.assert_allclose(A.T @ A, np.eye(2), atol=1e-4)
    np.testing.assert_allclose(Xc @ A, pca.coords[at][:, :2], rtol=1e-3, atol=1e-4)


def test_sketched_measures_within_the_stated_error_bounds(digits):
    """Same run, same steps: sketched map, MDS and distances against the exact ones.

    Each sketched cosine is within ``cosine_error_bound(k, delta)`` of the exact one with probability
    >= 1 - delta (informative only for k * delta > 54, so delta = 0.1 at k = 1024), and each norm
    within a relative ``norm_error_bound(k, delta)`` (delta = 0.05: about 4.7 typical errors); MDS is
    a mean of map entries, so it is within the entry bound whenever they all are.  The Chebyshev
    bounds are loose, so the typical error is also held to a few times its std (~1/sqrt(k))."""
    k, delta = digits.sketch_k, 0.1
    steps = digits.snapshot_steps
    cb, nb = cosine_error_bound(k, delta), norm_error_bound(k, 0.05)
    for variant in ("theta", "displacement", "updates"):
        ex = trajectory_map(digits, "all", variant, exact=True)
        sk = trajectory_map(digits, "all", variant, exact=False, steps=steps)
        assert sk.source == "sketches" and sk.sketch["cosine_error_bound"] == pytest.approx(cb)
        err = np.abs(sk.cosine - ex.cosine)
        assert (err > cb).mean() <= delta and err.max() < cb
        assert np.sqrt((err ** 2).mean()) < 3 / np.sqrt(k)
        assert np.abs(sk.norms / ex.norms - 1).max() < nb
        m_ex, m_sk = mds(digits, "all", variant, exact=True), mds(digits, "all", variant, exact=False, steps=steps)
        assert abs(m_sk.mds - m_ex.mds) < min(cb, 3 / np.sqrt(k))
    p_ex, p_sk = path_statistics(digits, exact=True), path_statistics(digits, exact=False, steps=steps)
    rel = np.abs(p_sk.distance_from_init[1:] / p_ex.distance_from_init[1:] - 1)
    assert rel.max() < nb
    assert np.abs(p_sk.update_norm[1:] / p_ex.update_norm[1:] - 1).max() < nb
    pca = trajectory_pca(digits)  # exact PCA, every sketched step projected through the sketch
    assert pca.sketch_coord_error < 0.2  # RMS error in units of the top axis's std


def test_qkv_groups_of_the_transformer(tmp_path):
    cfg = RunConfig.for_workload("modadd-transformer", steps=4, record=RecordConfig(checkpoint_every=0),
                                 workload_options={"p": 13, "d_model": 8, "n_heads": 2, "d_mlp": 16})
    out = Trainer(cfg, root=tmp_path, progress=False).fit()
    traj = Trajectory.open(out["path"])
    groups = traj.groups("qkv")
    assert [(g.name, g.tensors) for g in groups] == [
        (f"blocks.0.attn.{x}", (f"blocks.0.attn.{x}_proj.weight",)) for x in "qkv"]
    summary = analyze(traj.run.path, groups=["qkv"], progress=False, save=False)
    for g in groups:
        V = np.diff(load_all(traj, g.tensors), axis=0)
        assert summary["groups"][g.name]["mds_updates"] == pytest.approx(ref_mds(cos_map(V)), abs=2e-6)


def test_analyze_summary_and_stored_results(digits):
    summary = analyze(digits.run.path, groups=["all", "layers"], progress=False, window=2)
    assert set(summary["groups"]) == {"all", "0", "2"}
    for g in summary["groups"].values():
        for key in ("mds", "mds_window", "effective_dim", "pca_components_90", "distance_from_init_final",
                    "sign_flip_fraction_final"):
            assert g[key] is not None
        assert len(g["mds_window"]["mds_window"]) == len(g["mds_window"]["end_step"]) > 1
    X = load_all(digits, digits.groups("all")[0].tensors)
    assert summary["groups"]["all"]["mds"] == pytest.approx(ref_mds(cos_map(X)), abs=2e-6)
    assert summary["groups"]["all"]["mds_updates"] == pytest.approx(ref_mds(cos_map(X[2:] - X[:-2])), abs=2e-6)
    from trajscope.store import Run

    run = Run.open(digits.run.path)
    stored, _ = run.load_result("analyze")
    assert stored == summary and set(summary["results"]) <= set(run.result_names())
