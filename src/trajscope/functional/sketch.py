"""Count sketch of named tensors: a fixed random linear map R^P -> R^k, O(P) per call.

Element ``i`` (flat, row-major index within the FULL tensor) of the tensor named ``name`` goes to ONE
bucket ``h(seed, name, i)`` in ``[0, k)`` with sign ``s(seed, name, i)`` in ``{-1, +1}``, and
``sketch[b] = sum_{h(.)=b} s * x``.  ``(h, s)`` come from splitmix64 of ``key(seed, name) + (i+1)*gamma``,
with ``key`` from blake2b of the name (stable across processes), so the sketch ignores memory layout,
parameter order and sharding: summing ``sketch_shard`` over the contiguous shards of a tensor equals
its sketch.  No ``P x k`` matrix is ever built.

Accuracy (for ``h`` uniform pairwise independent, ``s`` 4-wise independent, as the hash is modelled):
``E<Sx,Sy> = <x,y>`` and, writing ``<Sx,Sy> = sum_{i,j} s_i s_j x_i y_j [h_i = h_j]``, only the terms
``(l,m) in {(i,j),(j,i)}`` survive in the second moment of the ``i != j`` part, giving

    Var<Sx,Sy> = (|x|^2 |y|^2 + <x,y>^2 - 2 sum_i x_i^2 y_i^2) / k  <=  2 |x|^2 |y|^2 / k.

Hence the squared norm has relative std ``<= sqrt(2/k)`` and the norm ``~ sqrt(1/(2k))`` (2.2% at
k=1024); a cosine ``c`` has std ``~ (1 - c^2)/sqrt(k)`` (delta method, dense vectors).  Rigorous
tail bounds (Chebyshev): :func:`inner_error_bound`, :func:`norm_error_bound`, :func:`cosine_error_bound`.
"""

from __future__ import annotations

import hashlib
import math
from typing import Iterable

import torch
from torch import Tensor

__all__ = ["Sketcher", "sketch_indices", "sketch_inner", "sketch_norm", "sketch_cosine",
           "sketch_distance", "sketch_gram", "sketch_cosine_matrix", "inner_error_bound",
           "norm_error_bound", "cosine_error_bound"]

_MASK = (1 << 64) - 1
_GAMMA, _M1, _M2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _s64(u: int) -> int:
    """Unsigned 64-bit int -> the int64 with the same bits."""
    u &= _MASK
    return u - (1 << 64) if u >> 63 else u


def _mix_py(z: int) -> int:
    """splitmix64 finalizer on Python ints (exact unsigned arithmetic)."""
    z = ((z ^ (z >> 30)) * _M1) & _MASK
    z = ((z ^ (z >> 27)) * _M2) & _MASK
    return z ^ (z >> 31)


def _key(seed: int, name: str) -> int:
    """64-bit stream key of (seed, name); blake2b, not Python's salted ``hash``."""
    h = int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "little")
    return _mix_py(_mix_py(seed & _MASK) ^ h)


def _xor_srl_(z: Tensor, s: int) -> Tensor:
    """In place ``z ^= z >>> s`` (logical shift emulated on int64: arithmetic shift, then mask)."""
    return z.bitwise_xor_((z >> s).bitwise_and_((1 << (64 - s)) - 1))


def _chunk(device) -> int:
    """Hash chunk: on CPU below ATen's parallel grain (32768) so each op runs serially (parallel
    int64 ops were 10-100x slower on an oversubscribed 2-core box); large on accelerators."""
    return 1 << 15 if torch.device(device or "cpu").type == "cpu" else 1 << 22


def _folded(key: int, offset: int, numel: int, k: int, device=None, out: Tensor | None = None,
            chunk: int | None = None) -> Tensor:
    """int64 (numel,): ``bucket + k * (sign < 0)`` in ``[0, 2k)`` for elements offset..offset+numel-1.

    splitmix64 on int64 tensors: multiplication and addition wrap mod 2^64 (two's complement),
    which is exactly unsigned arithmetic; the bucket uses the top 32 bits (``(hi * k) >> 32``,
    unbiased to < k / 2^32) and the sign bit 0.  Computed in chunks (~7 ns/element on one core).
    """
    if out is None:
        out = torch.empty(numel, dtype=torch.int64, device=device)
    device, chunk = out.device, chunk or _chunk(out.device)
    for a in range(0, numel, chunk):
        z = torch.arange(offset + a, offset + min(a + chunk, numel), dtype=torch.int64, device=device)
        z.mul_(_s64(_GAMMA)).add_(_s64(key + _GAMMA))
        _xor_srl_(z, 30).mul_(_s64(_M1))
        _xor_srl_(z, 27).mul_(_s64(_M2))
        _xor_srl_(z, 31)
        o = out[a:a + z.numel()]
        torch.bitwise_and(z, 1, out=o).mul_(k)
        o.add_(z.bitwise_right_shift_(32).bitwise_and_(0xFFFFFFFF).mul_(k).bitwise_right_shift_(32))
    return out


def sketch_indices(seed: int, name: str, offset: int, numel: int, k: int,
                   device=None) -> tuple[Tensor, Tensor]:
    """(bucket int64 (numel,) in [0, k), sign float32 (numel,) in {-1, +1}) of flat elements
    ``offset .. offset+numel-1`` of tensor ``name``."""
    f = _folded(_key(seed, name), offset, numel, k, device)
    neg = f >= k
    return f - neg * k, 1.0 - 2.0 * neg.float()


class Sketcher:
    """k-dim count sketch of named tensors (see module docstring for the operator and its accuracy).

    Results have shape ``(k,)`` and dtype ``dtype`` (float32 by default): inputs of any dtype
    (float16/bfloat16/float64/int) are cast to ``dtype`` and summed in it; pass
    ``dtype=torch.float64`` for double-precision accumulation.  Inputs are detached; tensors of
    one call must share a device.  Names must be unique (equal names get equal hashes).

    ``cache=True`` keeps, per group of (name, numel) given to :meth:`sketch` and per
    (name, offset, numel) shard, an int64 tensor of ``bucket + k*(sign<0)``: **8 bytes per
    element** (+4 for a reused concatenation buffer of the tensors under ``cat_max`` elements), see
    :attr:`cache_nbytes` / :meth:`clear_cache`.  A call is then one ``scatter_add_`` into a 2k
    buffer, ~1 ns/element (folding the sign into the index beats a float32 sign vector: 8 instead
    of 12 bytes and no multiply; int32 indices need ``index_add_``, ~2x slower).  ``cache=False``
    hashes on the fly in chunks of ``chunk`` elements (bounded memory, ~7 ns/element).
    Not thread-safe.
    """

    chunk: int | None = None  # elements per hash chunk; None: see _chunk
    cat_max: int = 1 << 15  # smaller tensors are concatenated (ATen copies them serially)

    def __init__(self, k: int = 1024, seed: int = 0, dtype: torch.dtype = torch.float32,
                 cache: bool = True):
        if not 1 <= k < 2 ** 31:
            raise ValueError(f"k must be in [1, 2^31), got {k}")
        self.k, self.seed, self.dtype, self.cache = int(k), int(seed), dtype, cache
        self._groups: dict = {}  # (device, ((name, numel), ...)) -> (index, small part, big part)
        self._shards: dict = {}  # (device, name, offset, numel) -> index
        self._keys: dict[str, int] = {}

    def _name_key(self, name: str) -> int:
        key = self._keys.get(name)
        if key is None:
            key = self._keys[name] = _key(self.seed, name)
        return key

    @property
    def cache_nbytes(self) -> int:
        """Bytes held by the index cache (and concatenation buffers)."""
        ts = list(self._shards.values())
        ts += [t for idx, (_, buf, _), _ in self._groups.values() for t in (idx, buf) if t is not None]
        return sum(t.numel() * t.element_size() for t in ts)

    def clear_cache(self) -> None:
        self._groups.clear()
        self._shards.clear()

    def _finish(self, work: Tensor, out: Tensor | None, add: bool) -> Tensor:
        k = self.k
        if out is None:
            return work[:k] - work[k:]
        if add:
            return out.add_(work[:k]).sub_(work[k:])
        return torch.sub(work[:k], work[k:], out=out)

    def _scatter_fly(self, work: Tensor, name: str, flat: Tensor, offset: int) -> None:
        key, n, chunk = self._name_key(name), flat.numel(), self.chunk or _chunk(flat.device)
        idx = torch.empty(min(n, chunk), dtype=torch.int64, device=flat.device)
        for a in range(0, n, chunk):
            part = flat[a:a + chunk]
            i = _folded(key, offset + a, part.numel(), self.k, out=idx[:part.numel()], chunk=chunk)
            work.scatter_add_(0, i, part)

    def _group(self, gkey, names: list[str], flats: list[Tensor], device):
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names")
        small = [j for j, f in enumerate(flats) if f.numel() < self.cat_max]
        small = small if len(small) > 1 else []
        order = small + [j for j in range(len(flats)) if j not in set(small)]
        idx = torch.empty(sum(f.numel() for f in flats), dtype=torch.int64, device=device)
        parts, a = [], 0
        for j in order:
            n = flats[j].numel()
            parts.append(_folded(self._name_key(names[j]), 0, n, self.k, out=idx[a:a + n]))
            a += n
        n_small = sum(flats[j].numel() for j in small)
        buf = torch.empty(n_small, dtype=self.dtype, device=device) if small else None
        big = list(zip(order[len(small):], parts[len(small):]))
        entry = self._groups[gkey] = (idx, (small, buf, idx[:n_small]), big)
        return entry

    @torch.no_grad()
    def sketch(self, named_tensors: Iterable[tuple[str, Tensor]], out: Tensor | None = None) -> Tensor:
        """Sketch (k,) of the concatenation of the flattened tensors (each by its logical row-major
        index, offset 0).  Order of the pairs is irrelevant.  ``out`` (k,) is overwritten and returned."""
        names, flats = [], []
        for name, t in named_tensors:
            names.append(name)
            flats.append(t.reshape(-1))
        device = flats[0].device if flats else (out.device if out is not None else None)
        work = torch.zeros(2 * self.k, dtype=self.dtype, device=device)
        if not self.cache:
            if len(set(names)) != len(names):
                raise ValueError("duplicate tensor names")
            for name, f in zip(names, flats):
                self._scatter_fly(work, name, f.to(self.dtype), 0)
        elif flats:
            gkey = (device, tuple(zip(names, [f.numel() for f in flats])))
            entry = self._groups.get(gkey)
            _, (small, buf, small_idx), big = entry or self._group(gkey, names, flats, device)
            if small:  # small tensors: one (serial) cat into a reused buffer, one scatter
                work.scatter_add_(0, small_idx, torch.cat([flats[j] for j in small], out=buf))
            for j, i in big:  # large tensors: one scatter each, no big temporary
                work.scatter_add_(0, i, flats[j].to(self.dtype))
        return self._finish(work, out, add=False)

    def layout_index(self, layout: Iterable[tuple[str, int, int]], device=None) -> Tensor:
        """int64 (N,) index ``bucket + k * (sign < 0)`` of a flat buffer that holds, one after
        another, the slices ``(name, offset, numel)`` of ``layout``: elements ``offset ..
        offset+numel-1`` of the flattened tensor ``name`` (offset 0 and the full numel for a whole
        tensor; a shard's global offset for a shard).  8 bytes per element; built once, then every
        :meth:`sketch_folded` call is a single ``scatter_add_``."""
        layout = [(str(n), int(o), int(m)) for n, o, m in layout]
        out = torch.empty(sum(m for _, _, m in layout), dtype=torch.int64, device=device)
        a = 0
        for name, offset, numel in layout:
            _folded(self._name_key(name), offset, numel, self.k, out=out[a:a + numel])
            a += numel
        return out

    def layout_matrix(self, layout: Iterable[tuple[str, int, int]], device=None) -> Tensor:
        """The operator of :meth:`layout_index` as a sparse CSR (k, N) matrix of signs, so that
        ``torch.mv(S, flat)`` is the sketch of the flat buffer.  Rows are buckets, and within a row
        the elements stay in ascending order, as ``scatter_add_`` sums them; one CSR product was
        about 2x faster than the scatter on a 12k-element CPU model.  8 bytes per element (int32
        indices below 2^31 elements, else 12)."""
        import warnings

        idx = self.layout_index(layout, device)
        neg = idx >= self.k
        bucket = idx - neg * self.k
        order = torch.argsort(bucket, stable=True)
        crow = torch.zeros(self.k + 1, dtype=torch.int64, device=idx.device)
        crow[1:] = torch.bincount(bucket, minlength=self.k).cumsum(0)
        values = (1.0 - 2.0 * neg.to(self.dtype))[order]
        if idx.numel() < 2 ** 31:  # int32 indices: 4 fewer bytes per element to read per product
            crow, order = crow.to(torch.int32), order.to(torch.int32)
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(crow, order, values, size=(self.k, idx.numel()),
                                           check_invariants=False)

    @torch.no_grad()
    def sketch_folded(self, flat: Tensor, index: Tensor, out: Tensor | None = None) -> Tensor:
        """Sketch (k,) of a flat buffer ``flat`` (N,) laid out as the :meth:`layout_index` ``index``
        (N,) says; equal to :meth:`sketch` / :meth:`sketch_shard` of the same slices (the same
        operator, one scatter).  ``out`` (k,) is overwritten and returned."""
        work = torch.zeros(2 * self.k, dtype=self.dtype, device=flat.device)
        work.scatter_add_(0, index, flat.to(self.dtype))
        return self._finish(work, out, add=False)

    @torch.no_grad()
    def sketch_shard(self, name: str, shard: Tensor, offset: int, out: Tensor | None = None) -> Tensor:
        """Sketch (k,) of a contiguous slice ``shard`` (any shape; flattened row-major) of the flattened
        tensor ``name`` whose first element has flat index ``offset`` in the full tensor.  With
        ``out`` (k,), the shard's sketch is ADDED to it (so summing over shards is one buffer)."""
        flat = shard.reshape(-1).to(self.dtype)
        work = torch.zeros(2 * self.k, dtype=self.dtype, device=flat.device)
        if self.cache:
            skey = (flat.device, name, int(offset), flat.numel())
            idx = self._shards.get(skey)
            if idx is None:
                idx = self._shards[skey] = _folded(self._name_key(name), offset, flat.numel(),
                                                   self.k, flat.device)
            work.scatter_add_(0, idx, flat)
        else:
            self._scatter_fly(work, name, flat, int(offset))
        return self._finish(work, out, add=True)


def sketch_inner(a: Tensor, b: Tensor) -> Tensor:
    """Unbiased estimate of <x, y> from a = Sx, b = Sy; shapes (..., k) -> (...)."""
    return (a * b).sum(-1)


def sketch_norm(a: Tensor) -> Tensor:
    """Estimate of |x| (= |Sx|; |Sx|^2 is unbiased for |x|^2); (..., k) -> (...)."""
    return torch.linalg.vector_norm(a, dim=-1)


def sketch_distance(a: Tensor, b: Tensor) -> Tensor:
    """Estimate of |x - y| = |S(x - y)| by linearity; (..., k) -> (...)."""
    return torch.linalg.vector_norm(a - b, dim=-1)


def sketch_cosine(a: Tensor, b: Tensor) -> Tensor:
    """Estimate of cos(x, y) in [-1, 1] (0 if either sketch is zero); (..., k) -> (...)."""
    den = (sketch_norm(a) * sketch_norm(b)).clamp_min(torch.finfo(a.dtype).tiny)
    return (sketch_inner(a, b) / den).clamp(-1.0, 1.0)


def sketch_gram(S: Tensor) -> Tensor:
    """Estimated Gram matrix G[i, j] = <x_i, x_j> from stacked sketches; (..., T, k) -> (..., T, T)."""
    return S @ S.transpose(-1, -2)


def sketch_cosine_matrix(S: Tensor) -> Tensor:
    """Estimated cosines C[i, j] = cos(x_i, x_j); (..., T, k) -> (..., T, T), zero rows give 0."""
    n = sketch_norm(S).clamp_min(torch.finfo(S.dtype).tiny).unsqueeze(-1)
    U = S / n
    return (U @ U.transpose(-1, -2)).clamp(-1.0, 1.0)


def _eps(k: int, delta: float) -> float:
    if not 0 < delta <= 1:
        raise ValueError(f"delta must be in (0, 1], got {delta}")
    return math.sqrt(2.0 / (k * delta))


def inner_error_bound(norm_x: float, norm_y: float, k: int, delta: float) -> float:
    """t with P(|<Sx,Sy> - <x,y>| >= t) <= delta:  t = sqrt(2 / (k delta)) |x| |y|.

    Chebyshev with Var <= 2|x|^2|y|^2/k (module docstring); distribution-free, hence loose:
    the error is near Gaussian with std <= sqrt(2/k)|x||y|, so typical errors are ~sqrt(delta)
    times smaller (k=1024, delta=0.05: bound 0.198|x||y|, std <= 0.044|x||y|)."""
    return _eps(k, delta) * float(norm_x) * float(norm_y)


def norm_error_bound(k: int, delta: float) -> float:
    """r with P(| |Sx| / |x| - 1 | >= r) <= delta:  r = 1 - sqrt(1 - e), e = sqrt(2/(k delta)).

    From Chebyshev on |Sx|^2 (Var <= 2|x|^4/k): |Sx|^2/|x|^2 in [1-e, 1+e], and
    1 - sqrt(1-e) >= sqrt(1+e) - 1.  Returns 1 if e >= 1.  Typical relative std ~ sqrt(1/(2k))."""
    e = _eps(k, delta)
    return 1.0 - math.sqrt(1.0 - e) if e < 1 else 1.0


def cosine_error_bound(k: int, delta: float) -> float:
    """r with P(|cos(Sx, Sy) - cos(x, y)| >= r) <= delta:  r = 2e / (1 - e), e = sqrt(6/(k delta)).

    Union bound over three Chebyshev events of prob delta/3 each, on unit x, y (cosine is scale
    invariant): |<Sx,Sy> - c| <= e and |Sx|^2, |Sy|^2 in [1-e, 1+e]; then
    |cos_S - c| = |e' + c (1 - sqrt(ab))| / sqrt(ab) <= 2e / (1 - e).  Returns 2 if e >= 1.
    Informative (< 1) only for k * delta > 54; the typical std is ~ (1 - c^2) / sqrt(k)."""
    e = _eps(k, delta / 3.0)
    return 2.0 * e / (1.0 - e) if e < 1 else 2.0
