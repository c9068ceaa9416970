"""Kernel motion and activation regimes on a fixed probe set of inputs.

**Empirical NTK** (Fort et al. 2020). J is the Jacobian of the model's outputs (logits, C per example)
in the trainable parameters (``requires_grad``, all of them), on the N probe inputs. ``kind`` chooses
the kernel:

- ``"trace"`` (default): K[n, m] = sum_c <J_nc, J_mc>, (N, N), the trace of each C x C block;
- ``"full"``: K[n*C + c, m*C + d] = <J_nc, J_md>, (N*C, N*C), every class pair;
- ``"sum"``: K[n, m] = <sum_c J_nc, sum_c J_mc>, (N, N), the NTK of the summed logits (a scalar
  output; C times cheaper).

J is computed with ``vmap(jacrev(functional_call))``, ``chunk_size`` examples at a time, in eval mode
by default (``train=False``; ``train=True``: train mode on batches of one example, no running-statistics
update). K is float64. Jacobian chunks are kept while they fit in ``max_bytes``, else recomputed.

**Kernel distance** S(K1, K2) = 1 - <K1, K2>_F / (|K1|_F |K2|_F), in [0, 1] for PSD kernels, invariant to
scale; **kernel velocity** = S(K_t1, K_t2) / (t2 - t1), distance per step.

**Activation regimes** (Leap+Verify): s = the cosine similarity of the network's activations on the
probe set against those Delta steps earlier, each flattened to one (N * D,) vector (``layer=None``: the
outputs; else the output of the named module). Labels: 2 stable if s >= tau_high, 0 chaotic if
s <= tau_low, 1 transition between. Thresholds (:func:`regime_thresholds`): ``"fixed"`` uses
tau_high, tau_low (the paper's GPT-2 values 0.99949 and 0.99627 by default); ``"percentile"`` uses the
70th and 30th percentiles (linear interpolation) of the observed similarities; ``"auto"`` (default) uses
the fixed thresholds unless at least ``min_history`` similarities have been observed and the fixed
thresholds give all of them the same label (they do not discriminate on this model), then the
percentiles.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from trajscope.functional.hvp import trainable_parameters
from trajscope.functional.noise import mode, stat_free_buffers

KINDS = ("trace", "full", "sum")
PAPER_TAU_HIGH, PAPER_TAU_LOW = 0.99949, 0.99627
CHAOTIC, TRANSITION, STABLE = 0, 1, 2
LABELS = {CHAOTIC: "chaotic", TRANSITION: "transition", STABLE: "stable"}


def _jacobian_fn(model: nn.Module, kind: str, train: bool):
    """vmap-ed ``(params, x (m, ...)) -> {name: (m, C, *shape)}`` (C = 1 for ``kind="sum"``)."""
    buffers = stat_free_buffers(model, train)

    def out_one(params: dict, xi: Tensor) -> Tensor:
        return functional_call(model, {**params, **buffers}, (xi.unsqueeze(0),), strict=False).reshape(-1)

    if kind == "sum":
        g = vmap(grad(lambda p, xi: out_one(p, xi).sum()), in_dims=(None, 0))
        return lambda p, x: {n: t.unsqueeze(1) for n, t in g(p, x).items()}
    return vmap(jacrev(out_one), in_dims=(None, 0))


def _contract(Ja: dict[str, Tensor], Jb: dict[str, Tensor], kind: str) -> Tensor:
    """Kernel block between two Jacobian chunks (ma, C, ...), (mb, C, ...): (ma, mb) or (ma C, mb C)."""
    out = None
    for n, a in Ja.items():
        a, b = a.flatten(2), Jb[n].flatten(2)  # (ma, C, p), (mb, C, p)
        if kind == "full":
            blk = a.flatten(0, 1) @ b.flatten(0, 1).T
        else:
            blk = torch.einsum("acp,bcp->ab", a, b)
        out = blk.to(torch.float64) if out is None else out + blk
    return out


def empirical_ntk(model: nn.Module, x: Tensor, *, kind: str = "trace", chunk_size: int = 32,
                  train: bool = False, max_bytes: int = 1 << 30) -> Tensor:
    """The empirical NTK of ``model`` on the inputs ``x`` (N, ...) (module docstring), float64."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    params = {n: p.detach() for n, p in trainable_parameters(model)}
    fn = _jacobian_fn(model, kind, train)
    starts = list(range(0, len(x), chunk_size))
    cache: dict[int, dict[str, Tensor]] = {}

    def jac(i: int) -> dict[str, Tensor]:
        if i in cache:
            return cache[i]
        J = fn(params, x[starts[i]:starts[i] + chunk_size])
        nbytes = sum(t.numel() * t.element_size() for t in J.values())
        if (len(cache) + 1) * nbytes <= max_bytes:
            cache[i] = J
        return J

    with mode(model, train), sdpa_kernel([SDPBackend.MATH]):  # fused CPU attention has no vmap rule
        rows = []
        for ia in range(len(starts)):
            Ja = jac(ia)
            rows.append([_contract(Ja, Ja if ib == ia else jac(ib), kind) for ib in range(ia + 1)])
    n = len(starts)
    blocks = [[rows[i][j] if j <= i else rows[j][i].T for j in range(n)] for i in range(n)]
    return torch.cat([torch.cat(r, 1) for r in blocks], 0)


def kernel_distance(K1: Tensor, K2: Tensor) -> float:
    """S = 1 - <K1, K2>_F / (|K1|_F |K2|_F): 0 for proportional kernels, 1 for orthogonal ones; NaN
    if either kernel is 0."""
    a, b = K1.to(torch.float64).reshape(-1), K2.to(torch.float64).reshape(-1)
    denom = float(a.norm() * b.norm())
    return 1.0 - float(a @ b) / denom if denom > 0 else math.nan


def kernel_velocity(K1: Tensor, K2: Tensor, dt: float) -> float:
    """Kernel distance per step between kernels ``dt`` > 0 steps apart."""
    if dt <= 0:
        raise ValueError(f"dt must be > 0, got {dt}")
    return kernel_distance(K1, K2) / dt


@torch.no_grad()
def activations(model: nn.Module, x: Tensor, layer: str | None = None, *, chunk_size: int = 1024,
                train: bool = False) -> Tensor:
    """Activations (N, D) float32 on ``x``: the model's outputs, or the output of the module named
    ``layer`` (``dict(model.named_modules())``), each example's flattened. Eval mode by default (no
    side effect in either mode: running statistics are not updated)."""
    module = model if layer is None else dict(model.named_modules()).get(layer)
    if module is None:
        raise ValueError(f"model has no module named {layer!r}")
    seen: list[Tensor] = []
    handle = module.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    buffers = stat_free_buffers(model, train)
    try:
        with mode(model, train):
            for a in range(0, len(x), chunk_size):
                functional_call(model, buffers, (x[a:a + chunk_size],), strict=False)
    finally:
        handle.remove()
    return torch.cat([s.reshape(len(s), -1) for s in seen]).to(torch.float32)


def activation_similarity(a: Tensor, b: Tensor) -> float:
    """Cosine similarity of two activation matrices, each flattened to one vector (float64)."""
    u, v = a.to(torch.float64).reshape(-1), b.to(torch.float64).reshape(-1)
    denom = float(u.norm() * v.norm())
    return float(u @ v) / denom if denom > 0 else math.nan


def regime_label(s: float, tau_high: float, tau_low: float) -> int:
    """2 (stable) if s >= tau_high, 0 (chaotic) if s <= tau_low, else 1 (transition)."""
    return STABLE if s >= tau_high else CHAOTIC if s <= tau_low else TRANSITION


def regime_thresholds(history: Sequence[float], *, tau_high: float = PAPER_TAU_HIGH,
                      tau_low: float = PAPER_TAU_LOW, thresholds: str = "auto",
                      percentiles: tuple[float, float] = (70.0, 30.0),
                      min_history: int = 8) -> tuple[float, float, bool]:
    """(tau_high, tau_low, used_percentiles) for the similarities observed so far (module doc)."""
    if thresholds not in ("auto", "fixed", "percentile"):
        raise ValueError(f"thresholds must be 'auto', 'fixed' or 'percentile', got {thresholds!r}")
    h = torch.as_tensor(list(history), dtype=torch.float64)
    use = thresholds == "percentile"
    if thresholds == "auto" and len(h) >= min_history:
        labels = {regime_label(float(s), tau_high, tau_low) for s in h}
        use = len(labels) == 1
    if not use or len(h) == 0:
        return tau_high, tau_low, False
    q = torch.quantile(h, torch.tensor([percentiles[0] / 100, percentiles[1] / 100], dtype=torch.float64))
    return float(q[0]), float(q[1]), True


def regime_labels(similarities: Sequence[float], *, causal: bool = False, **options) -> Tensor:
    """Labels (T,) int64 of a sequence of similarities. ``causal=False``: thresholds from the whole
    sequence; ``causal=True``: label t uses the similarities up to and including t (as a probe does).
    ``options``: those of :func:`regime_thresholds`."""
    s = [float(v) for v in similarities]
    if not causal:
        hi, lo, _ = regime_thresholds(s, **options)
        return torch.tensor([regime_label(v, hi, lo) for v in s], dtype=torch.int64)
    out = []
    for t, v in enumerate(s):
        hi, lo, _ = regime_thresholds(s[:t + 1], **options)
        out.append(regime_label(v, hi, lo))
    return torch.tensor(out, dtype=torch.int64)
