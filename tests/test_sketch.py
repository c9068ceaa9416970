"""Tests of the count sketch (trajscope.functional.sketch)."""

from __future__ import annotations

import hashlib
import math
import random

import numpy as np
import pytest
import torch

from trajscope.functional import (
    Sketcher,
    cosine_error_bound,
    inner_error_bound,
    norm_error_bound,
    sketch_cosine,
    sketch_cosine_matrix,
    sketch_distance,
    sketch_gram,
    sketch_indices,
    sketch_inner,
    sketch_norm,
)

MASK = (1 << 64) - 1


# ----------------------------------------------------------------------------- reference
def ref_bucket_sign(seed: int, name: str, i: int, k: int) -> tuple[int, int]:
    """Pure-Python, exact unsigned 64-bit splitmix64 (the specification of the hash)."""

    def mix(z: int) -> int:
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        return z ^ (z >> 31)

    h = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")
    key = mix(mix(seed & MASK) ^ h)
    z = mix((key + (i + 1) * 0x9E3779B97F4A7C15) & MASK)
    return ((z >> 32) * k) >> 32, -1 if z & 1 else 1


def ref_sketch(named, seed: int, k: int) -> np.ndarray:
    """Element-by-element loop over the logical (row-major) flat index."""
    out = np.zeros(k)
    for name, t in named:
        flat = t.detach().double().contiguous().reshape(-1).numpy()
        b, s = sketch_indices(seed, name, 0, flat.size, k)
        for i in range(flat.size):
            out[int(b[i])] += float(s[i]) * flat[i]
    return out


def dense_matrix(named, seed: int, k: int) -> torch.Tensor:
    """Explicit k x P matrix (tiny P only) of the concatenation in the given order."""
    cols = []
    for name, t in named:
        b, s = sketch_indices(seed, name, 0, t.numel(), k)
        m = torch.zeros(k, t.numel(), dtype=torch.float64)
        m[b, torch.arange(t.numel())] = s.double()
        cols.append(m)
    return torch.cat(cols, 1)


def tiny_params(gen: torch.Generator):
    return [("conv.weight", torch.randn(4, 3, 2, 2, generator=gen)),
            ("conv.bias", torch.randn(4, generator=gen)),
            ("fc.weight", torch.randn(5, 7, generator=gen)),
            ("fc.bias", torch.randn(5, generator=gen))]


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("k", [1024, 1000, 7, 1])
@pytest.mark.parametrize("seed,name,offset", [(0, "w", 0), (12345, "layer1.0.conv.weight", 2**40 + 3),
                                              (-1, "émbed", 2**62), (2**64 + 5, "x", 17)])
def test_hash_matches_python_reference(k, seed, name, offset):
    b, s = sketch_indices(seed, name, offset, 64, k)
    ref = [ref_bucket_sign(seed, name, offset + i, k) for i in range(64)]
    assert b.dtype == torch.int64 and s.dtype == torch.float32
    assert b.tolist() == [r[0] for r in ref]
    assert s.tolist() == [float(r[1]) for r in ref]


def test_hash_golden_values():
    # Pins the hash: stored sketches must stay comparable across versions and processes.
    b, s = sketch_indices(0, "w", 0, 6, 1024)
    gb, gs = zip(*[ref_bucket_sign(0, "w", i, 1024) for i in range(6)])
    assert b.tolist() == list(gb) and s.tolist() == list(map(float, gs))
    assert b.tolist() == [586, 773, 938, 449, 736, 735]
    assert s.tolist() == [1.0, -1.0, -1.0, -1.0, -1.0, 1.0]


@pytest.mark.parametrize("cache", [True, False])
def test_matches_slow_reference_and_dense_matrix(cache):
    gen = torch.Generator().manual_seed(0)
    named = tiny_params(gen)
    k = 16
    sk = Sketcher(k=k, seed=3, dtype=torch.float64, cache=cache)
    got = sk.sketch(named)
    ref = ref_sketch(named, 3, k)
    dense = dense_matrix(named, 3, k) @ torch.cat([t.double().reshape(-1) for _, t in named])
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dense.numpy(), ref, rtol=1e-12, atol=1e-12)
    got32 = Sketcher(k=k, seed=3, cache=cache).sketch(named)
    assert got32.dtype == torch.float32 and got32.shape == (k,)
    np.testing.assert_allclose(got32.numpy(), ref, rtol=1e-5, atol=1e-5)


def test_cache_off_chunked_equals_cached():
    gen = torch.Generator().manual_seed(1)
    named = [("a", torch.randn(1000, generator=gen)), ("b", torch.randn(40_000, generator=gen)),
             ("c", torch.randn(33, generator=gen)), ("d", torch.randn(70_000, generator=gen))]
    cached = Sketcher(seed=5)
    fly = Sketcher(seed=5, cache=False)
    fly.chunk = 97  # many chunk boundaries, odd size
    ref = cached.sketch(named)
    torch.testing.assert_close(fly.sketch(named), ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(cached.sketch(named), ref, rtol=0, atol=0)  # cached path, 2nd call
    assert cached.cache_nbytes >= 8 * sum(t.numel() for _, t in named)
    cached.clear_cache()
    assert cached.cache_nbytes == 0
    torch.testing.assert_close(cached.sketch(named), ref, rtol=0, atol=0)


# ----------------------------------------------------------------------------- invariances
def test_linearity():
    gen = torch.Generator().manual_seed(2)
    x, y = tiny_params(gen), tiny_params(gen)
    sk = Sketcher(seed=7, dtype=torch.float64)
    a, b = 2.5, -0.75
    comb = [(n, a * tx.double() + b * ty.double()) for (n, tx), (_, ty) in zip(x, y)]
    torch.testing.assert_close(sk.sketch(comb), a * sk.sketch(x) + b * sk.sketch(y), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cache", [True, False])
def test_order_shards_and_layout_independence(cache):
    gen = torch.Generator().manual_seed(3)
    named = tiny_params(gen) + [("big", torch.randn(50, 900, generator=gen))]
    sk = Sketcher(seed=11, dtype=torch.float64, cache=cache)
    whole = sk.sketch(named)
    # order
    shuffled = named[:]
    random.Random(0).shuffle(shuffled)
    torch.testing.assert_close(sk.sketch(shuffled), whole, rtol=1e-12, atol=1e-12)
    # shards: each tensor split into 1-3 contiguous pieces of its flat view, summed
    acc = torch.zeros(sk.k, dtype=torch.float64)
    rng = random.Random(1)
    for name, t in named:
        flat = t.reshape(-1)
        cuts = sorted(rng.sample(range(1, flat.numel()), min(2, flat.numel() - 1)))
        for lo, hi in zip([0] + cuts, cuts + [flat.numel()]):
            sk.sketch_shard(name, flat[lo:hi], lo, out=acc)
    torch.testing.assert_close(acc, whole, rtol=1e-12, atol=1e-12)
    # a shard's sketch without out is just that shard's contribution
    name, t = named[-1]
    flat = t.reshape(-1)
    parts = sk.sketch_shard(name, flat[:1234], 0) + sk.sketch_shard(name, flat[1234:], 1234)
    torch.testing.assert_close(parts, sk.sketch([(name, t)]), rtol=1e-12, atol=1e-12)
    # non-contiguous storage: sketched by the logical flat index
    w = torch.randn(30, 20, generator=gen, dtype=torch.float64)
    wt = w.t()
    assert not wt.is_contiguous()
    torch.testing.assert_close(sk.sketch([("w", wt)]), sk.sketch([("w", wt.contiguous())]), rtol=0, atol=0)
    assert not torch.allclose(sk.sketch([("w", wt)]), sk.sketch([("w", w)]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_flat_layout_index_and_csr_operator_equal_the_sketch(dtype):
    """A flat buffer of slices (whole tensors and shards at global offsets, in any order), sketched
    by one scatter (layout_index) or one CSR product (layout_matrix), against the dense matrix."""
    gen = torch.Generator().manual_seed(13)
    named = tiny_params(gen) + [("big", torch.randn(40, 50, generator=gen))]
    sk = Sketcher(k=64, seed=5, dtype=dtype)
    big = named[-1][1].reshape(-1)
    # "big" as two shards at their global offsets, placed in reverse order, between whole tensors
    layout = [(n, 0, t.numel()) for n, t in named[:2]] + [("big", 1500, 500), ("big", 0, 1500)] + \
             [(n, 0, t.numel()) for n, t in named[2:4]]
    pieces = {n: t.reshape(-1) for n, t in named}
    flat = torch.cat([pieces[n][o:o + m] for n, o, m in layout]).to(dtype)
    ref = dense_matrix(named, seed=5, k=64) @ torch.cat([t.reshape(-1).double() for _, t in named])
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    by_index = sk.sketch_folded(flat, sk.layout_index(layout))
    by_matrix = torch.mv(sk.layout_matrix(layout), flat)
    assert by_index.dtype == by_matrix.dtype == dtype and by_matrix.shape == (64,)
    torch.testing.assert_close(by_index.double(), ref, **tol)
    torch.testing.assert_close(by_matrix.double(), ref, **tol)
    torch.testing.assert_close(by_matrix, sk.sketch(named), **tol)
    # each shard alone: the shard's contribution, as sketch_shard says
    sub = [("big", 0, 1500)]
    torch.testing.assert_close(torch.mv(sk.layout_matrix(sub), big[:1500].to(dtype)),
                               sk.sketch_shard("big", big[:1500], 0), **tol)


def test_names_and_seeds_matter():
    x = torch.randn(5000, generator=torch.Generator().manual_seed(4))
    s0 = Sketcher(seed=0).sketch([("a", x)])
    others = [Sketcher(seed=0).sketch([("b", x)]), Sketcher(seed=1).sketch([("a", x)])]
    for o in others:
        # Independent sketches of the same vector: cosine ~ N(0, ~1/k), |cos| < 6/sqrt(k) = 0.19.
        assert abs(float(sketch_cosine(s0, o))) < 0.19
    # renaming / reseeding changes where the SAME element goes
    b0, _ = sketch_indices(0, "a", 0, 10_000, 1024)
    for b1, _ in [sketch_indices(0, "b", 0, 10_000, 1024), sketch_indices(1, "a", 0, 10_000, 1024)]:
        agree = (b0 == b1).float().mean().item()  # ~ 1/k = 0.001
        assert agree < 0.005


def test_dtypes_grad_out_and_edge_cases():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(300, 7, generator=gen, requires_grad=True)
    sk = Sketcher(k=64, seed=2)
    s = sk.sketch([("x", x)])
    assert s.dtype == torch.float32 and not s.requires_grad and s.shape == (64,)
    for dt in (torch.float16, torch.bfloat16, torch.float64):
        xd = x.detach().to(dt)
        torch.testing.assert_close(sk.sketch([("x", xd), ("b", xd[0])]),
                                   sk.sketch([("x", xd.float()), ("b", xd[0].float())]), rtol=1e-6, atol=1e-5)
    s64 = Sketcher(k=64, seed=2, dtype=torch.float64).sketch([("x", x.double())])
    assert s64.dtype == torch.float64
    # out: sketch overwrites, sketch_shard adds
    out = torch.full((64,), 3.0)
    r = sk.sketch([("x", x)], out=out)
    assert r is out
    torch.testing.assert_close(out, s)
    sk.sketch_shard("x", x, 0, out=out)
    torch.testing.assert_close(out, 2 * s)
    # zero, empty, duplicates
    assert torch.equal(sk.sketch([("x", torch.zeros(100))]), torch.zeros(64))
    assert torch.equal(sk.sketch([]), torch.zeros(64))
    with pytest.raises(ValueError):
        sk.sketch([("x", x), ("x", x)])
    with pytest.raises(ValueError):
        Sketcher(k=64, cache=False).sketch([("x", x), ("x", x)])
    assert float(sketch_cosine(s, torch.zeros(64))) == 0.0


def test_helpers_batched():
    gen = torch.Generator().manual_seed(6)
    S = torch.randn(5, 64, generator=gen)
    G, C = sketch_gram(S), sketch_cosine_matrix(S)
    assert G.shape == C.shape == (5, 5)
    for i in range(5):
        for j in range(5):
            torch.testing.assert_close(G[i, j], sketch_inner(S[i], S[j]))
            torch.testing.assert_close(C[i, j], sketch_cosine(S[i], S[j]))
    torch.testing.assert_close(torch.diagonal(C), torch.ones(5))
    torch.testing.assert_close(sketch_norm(S), G.diagonal().sqrt())
    torch.testing.assert_close(sketch_distance(S[:, None], S[None]),
                               (G.diagonal()[:, None] + G.diagonal()[None] - 2 * G).clamp_min(0).sqrt(),
                               rtol=1e-4, atol=1e-3)
    assert sketch_cosine_matrix(torch.randn(3, 5, 64)).shape == (3, 5, 5)
    x = torch.randn(10_000, generator=gen)
    s = Sketcher().sketch([("x", x)])
    assert abs(float(sketch_cosine(s, s)) - 1.0) < 1e-6
    assert abs(float(sketch_cosine(s, -3 * s)) + 1.0) < 1e-6


# ----------------------------------------------------------------------------- hash quality
N = 1 << 20
SIX_SIGMA = 6.0  # deterministic hash; under ideal hashing a 6-sigma excursion has p ~ 1e-9


@pytest.mark.parametrize("seed,name,offset,k", [(0, "w", 0, 1024), (99, "layer3.weight", 2**40, 1000),
                                                (-7, "b", 123_457, 2), (3, "z", 0, 3)])
def test_bucket_uniformity_and_sign_balance(seed, name, offset, k):
    b, s = sketch_indices(seed, name, offset, N, k)
    assert int(b.min()) >= 0 and int(b.max()) < k and set(s.unique().tolist()) <= {-1.0, 1.0}
    # Pearson chi-square of bucket counts: chi2_{k-1}, mean k-1, std sqrt(2(k-1)).
    counts = torch.bincount(b, minlength=k).double()
    chi2 = float(((counts - N / k) ** 2 / (N / k)).sum())
    assert abs(chi2 - (k - 1)) < SIX_SIGMA * math.sqrt(2 * (k - 1)) + (SIX_SIGMA if k < 10 else 0)
    # Signs: sum ~ N(0, N).
    assert abs(float(s.sum())) < SIX_SIGMA * math.sqrt(N)
    # Sign independent of bucket: sum_b T_b^2 / n_b ~ chi2_k (T_b = sign sum in bucket b).
    T = torch.zeros(k, dtype=torch.float64).index_add_(0, b, s.double())
    stat = float((T**2 / counts).sum())
    assert abs(stat - k) < SIX_SIGMA * math.sqrt(2 * k) + (SIX_SIGMA if k < 10 else 0)
    # Neighbouring indices independent: collisions ~ Bin(N-1, 1/k); sign products ~ N(0, N).
    coll = float((b[1:] == b[:-1]).double().sum())
    p = 1.0 / k
    assert abs(coll - (N - 1) * p) < SIX_SIGMA * math.sqrt((N - 1) * p * (1 - p))
    assert abs(float((s[1:] * s[:-1]).sum())) < SIX_SIGMA * math.sqrt(N)


# ----------------------------------------------------------------------------- statistics
P_STAT, K_STAT, TRIALS = 20_000, 1024, 200
COSINES = (0.0, 0.5, 0.95)


@pytest.fixture(scope="module")
def trials():
    """Fixed x, y pairs with known cosine, sketched with TRIALS independent seeds (float64)."""
    gen = torch.Generator().manual_seed(7)
    pairs = []
    for c in COSINES:
        u, v = torch.randn(2, P_STAT, generator=gen, dtype=torch.float64)
        u = u / u.norm()
        v = v - (v @ u) * u
        v = v / v.norm()
        pairs.append((3.0 * u, c * u + math.sqrt(1 - c * c) * v))  # |x| = 3, |y| = 1
    sk = {}
    for seed in range(TRIALS):
        sketcher = Sketcher(k=K_STAT, seed=seed, dtype=torch.float64)
        for c, (x, y) in zip(COSINES, pairs):
            sk.setdefault(c, []).append((sketcher.sketch([("w", x)]), sketcher.sketch([("w", y)])))
    return {c: (x, y, torch.stack([a for a, _ in sk[c]]), torch.stack([b for _, b in sk[c]]))
            for c, (x, y) in zip(COSINES, pairs)}


def binom_slack(delta: float, n: int) -> float:
    return 3.0 * math.sqrt(delta * (1 - delta) / n)


@pytest.mark.parametrize("c", COSINES)
def test_inner_product_unbiased_with_predicted_variance(trials, c):
    x, y, A, B = trials[c]
    exact = float(x @ y)
    assert abs(exact - 3.0 * c) < 1e-9
    err = sketch_inner(A, B) - exact  # (TRIALS,)
    var = (float(x @ x) * float(y @ y) + exact**2 - 2 * float((x**2 * y**2).sum())) / K_STAT
    assert var <= 2 * float(x @ x) * float(y @ y) / K_STAT
    # Unbiased: mean error ~ N(0, var/n), 4 sigma.
    assert abs(float(err.mean())) < 4 * math.sqrt(var / TRIALS)
    # Mean squared error (mean known = 0) of n near-Gaussian errors has relative std sqrt(2/n) = 10%;
    # 30% = 3 sigma.
    assert abs(float((err**2).mean()) / var - 1) < 0.30
    for delta in (0.05, 0.2):
        bound = inner_error_bound(3.0, 1.0, K_STAT, delta)
        assert bound == pytest.approx(math.sqrt(2 / (K_STAT * delta)) * 3.0)
        assert float((err.abs() > bound).double().mean()) <= delta + binom_slack(delta, TRIALS)


@pytest.mark.parametrize("c", COSINES)
def test_norm_and_cosine_accuracy(trials, c):
    x, y, A, B = trials[c]
    rel = sketch_norm(A) / x.norm() - 1  # (TRIALS,)
    # Relative norm std ~ sqrt(1/(2k)) (delta method on Var|Sx|^2 = 2|x|^4/k); sample std of n=200
    # has relative std ~5%, delta-method error O(1/sqrt(k)): allow 30%.
    assert abs(float(rel.std()) / math.sqrt(1 / (2 * K_STAT)) - 1) < 0.30
    cos = sketch_cosine(A, B)
    dev = cos - c
    # Cosine std ~ (1 - c^2)/sqrt(k) (delta method, dense vectors); same tolerance.  For c = 0.95
    # the std is 0.003, so also compare against an absolute floor.
    assert abs(float(dev.std()) - (1 - c * c) / math.sqrt(K_STAT)) < 0.30 * (1 - c * c) / math.sqrt(K_STAT)
    assert abs(float(dev.mean())) < 4 * (1 - c * c) / math.sqrt(K_STAT * TRIALS) + 1e-3
    for delta in (0.05, 0.2):
        limit = delta + binom_slack(delta, TRIALS)
        assert float((rel.abs() > norm_error_bound(K_STAT, delta)).double().mean()) <= limit
        assert float((dev.abs() > cosine_error_bound(K_STAT, delta)).double().mean()) <= limit
    # distance by linearity: |S(x - y)| == sketch_distance, relative accuracy like a norm
    d = sketch_distance(A, B) / (x - y).norm() - 1
    assert float(d.abs().max()) < norm_error_bound(K_STAT, 1.0 / TRIALS)


def test_bound_functions():
    assert inner_error_bound(2.0, 3.0, 1024, 0.1) == pytest.approx(6 * math.sqrt(2 / 102.4))
    assert norm_error_bound(1024, 0.1) == pytest.approx(1 - math.sqrt(1 - math.sqrt(2 / 102.4)))
    e = math.sqrt(6 / 102.4)
    assert cosine_error_bound(1024, 0.1) == pytest.approx(2 * e / (1 - e))
    assert cosine_error_bound(4, 0.01) == 2.0 and norm_error_bound(1, 0.01) == 1.0
    b = inner_error_bound
    assert b(1, 1, 1024, 0.01) > b(1, 1, 1024, 0.1) > b(1, 1, 4096, 0.1)
    with pytest.raises(ValueError):
        inner_error_bound(1, 1, 1024, 0.0)
