"""Loss and accuracy at many points theta = origin + sum_j c_j d_j of parameter space.

:func:`evaluate_points` evaluates ``chunk_size`` points at a time, either batched -- the parameters
of the chunk stacked, shape (chunk, *param.shape), and ``vmap(functional_call)`` over them, one
batched forward pass per chunk and data batch -- or point by point on a private copy of the model
(:mod:`~trajscope.landscape.loop`: one parameter write per point, layers that read the data
replayed from precomputed outputs, the loss per chunk) (``strategy``; the default picks the faster
by timing). :func:`evaluate_points_reference` is the
executable specification, a for-loop of ``load_state_dict`` and ``model(x)`` on a copy of the
model; the tests hold both ways to it.

Data: one batch ``(x, y)`` or a list of batches; the loss is ``loss_fn`` (a mean over its batch)
averaged over all examples (sum_b n_b loss_b / N), the metric is accuracy (the fraction of examples
whose arg-max output is the label). Mode: ``train=True`` (default) evaluates BatchNorm in train
mode, normalizing with the statistics of each data batch (so a landscape needs only the parameters,
not the running statistics), without updating any buffer; ``train=False`` uses eval mode and the
model's buffers as they are. Parameters the origin does not name keep the model's values.
"""

from __future__ import annotations

import copy
import time
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from trajscope.errors import UsageError
from trajscope.functional.noise import mode, stat_free_buffers
from trajscope.landscape.loop import Looped

LossFn = Callable[[Tensor, Tensor], Tensor]


def grid_coefficients(*axes: Tensor) -> Tensor:
    """Coefficients (prod len(axes), k) of the Cartesian grid of ``axes``, first axis slowest:
    row i * len(b) + j is (a[i], b[j]) for two axes (so ``values.view(len(a), len(b))[i, j]``)."""
    mesh = torch.meshgrid(*[torch.as_tensor(a, dtype=torch.float64) for a in axes], indexing="ij")
    return torch.stack([m.reshape(-1) for m in mesh], 1)


def _batches(data) -> list[tuple[Tensor, Tensor]]:
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], Tensor):
        return [data]
    return list(data)


def _stack(origin: dict[str, Tensor], directions: Sequence[dict[str, Tensor]],
           coeffs: Tensor | None = None) -> dict[str, Tensor]:
    """Directions stacked per name: {name: (k, *shape)} (zeros where a direction lacks the name);
    ``coeffs``, if given, must be (G, k) with k = len(directions) >= 1."""
    directions = list(directions)
    if not directions:
        raise UsageError("evaluate_points needs at least one direction (got none); the origin alone is "
                         "the point with every coefficient 0 of any direction")
    if coeffs is not None and (coeffs.dim() != 2 or coeffs.shape[1] != len(directions)):
        raise UsageError(f"coeffs must have shape (points, {len(directions)}) for {len(directions)} "
                         f"direction(s), got {tuple(coeffs.shape)}")
    return {n: torch.stack([d[n].to(o.dtype) if n in d else torch.zeros_like(o) for d in directions])
            for n, o in origin.items()}


def point_params(origin: dict[str, Tensor], stacked: dict[str, Tensor], c: Tensor) -> dict[str, Tensor]:
    """Parameters of the points with coefficients ``c`` (g, k): {name: (g, *shape)}."""
    return {n: o + torch.tensordot(c.to(o.dtype), stacked[n], dims=1) for n, o in origin.items()}


class _Vmapped:
    """One chunk of points per call: parameters (g, *shape), ``vmap(functional_call)`` over them."""

    def __init__(self, model, loss_fn, origin, stacked, train, batches):
        buffers = stat_free_buffers(model, train)

        def forward(params: dict[str, Tensor], x: Tensor) -> Tensor:
            return functional_call(model, {**params, **buffers}, (x,), strict=False)

        self.forward = vmap(forward, in_dims=(0, None))
        self.loss = vmap(loss_fn, in_dims=(0, None))
        self.origin, self.stacked = origin, stacked

    def __call__(self, c: Tensor, batches) -> tuple[Tensor, Tensor]:
        params = point_params(self.origin, self.stacked, c)
        loss = torch.zeros(len(c), dtype=torch.float64)
        hits = torch.zeros(len(c), dtype=torch.float64)
        for x, y in batches:
            with sdpa_kernel([SDPBackend.MATH]):  # the fused CPU attention has no vmap rule
                out = self.forward(params, x)  # (g, B, C)
            loss += self.loss(out, y).to(torch.float64) * len(x)
            hits += (out.argmax(-1) == y).sum(-1).to(torch.float64)
        return loss, hits


STRATEGIES = ("auto", "vmap", "loop")


@torch.no_grad()
def evaluate_points(model: nn.Module, loss_fn: LossFn, data, origin: dict[str, Tensor],
                    directions: Sequence[dict[str, Tensor]], coeffs: Tensor, *, train: bool = True,
                    chunk_size: int = 8, strategy: str = "auto", progress: bool = False,
                    stats: dict | None = None) -> tuple[Tensor, Tensor]:
    """(losses (G,), accuracies (G,)) float64 at the G points ``origin + coeffs @ directions``
    (``coeffs`` (G, k)), in chunks of ``chunk_size`` points (module docstring).

    ``strategy``: ``"vmap"`` runs one vmapped forward pass per chunk; ``"loop"`` one plain forward
    pass per point on a private copy of the model; ``"auto"`` times the second and third chunks
    (one each way, after a warm-up chunk) and runs the rest the faster way (the loop where vmap
    cannot batch the model or loss). The two agree to
    float32 rounding. On a CPU, where one forward pass of a large batch already keeps the cores
    busy, the loop is usually faster; batching points pays where a single pass leaves the device
    idle (small batches, GPUs). ``stats``, if given, receives ``strategy`` (the way most chunks ran)
    and, for "auto", ``timing`` (seconds of the timed chunk each way).
    """
    from trajscope.measures.trajectory import progress as bar

    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    batches = _batches(data)
    n_total = sum(len(x) for x, _ in batches)
    stacked = _stack(origin, directions, coeffs)
    ways = {s: cls(model, loss_fn, origin, stacked, train, batches)
            for s, cls in (("vmap", _Vmapped), ("loop", Looped)) if strategy in (s, "auto")}
    losses = torch.zeros(len(coeffs), dtype=torch.float64)
    hits = torch.zeros(len(coeffs), dtype=torch.float64)
    starts = list(range(0, len(coeffs), chunk_size))
    timing: dict[str, float] = {}
    with mode(model, train):
        for i, a in enumerate(bar(starts, len(starts), "landscape", progress)):
            way = _choose(strategy, i, timing)
            t0 = time.perf_counter()
            try:
                out = ways[way](coeffs[a:a + chunk_size], batches)
            except RuntimeError as e:  # e.g. a loss with data-dependent code that vmap cannot batch
                if strategy != "auto" or way != "vmap" or "vmap" not in str(e):
                    raise
                strategy, way = "loop", "loop"
                out = ways[way](coeffs[a:a + chunk_size], batches)
            losses[a:a + chunk_size], hits[a:a + chunk_size] = out
            if strategy == "auto" and i in (1, 2):
                timing[way] = time.perf_counter() - t0
    if stats is not None:
        stats.update(strategy=_choose(strategy, len(starts), timing), timing=dict(timing))
    return losses / n_total, hits / n_total


def _choose(strategy: str, i: int, timing: dict[str, float]) -> str:
    """The way chunk ``i`` runs: fixed, or for "auto" vmap (warm-up), vmap, loop, then the faster."""
    if strategy != "auto":
        return strategy
    if i <= 1:
        return "vmap"
    if i == 2:
        return "loop"
    return min(timing, key=timing.get) if len(timing) == 2 else "vmap"


@torch.no_grad()
def evaluate_points_reference(model: nn.Module, loss_fn: LossFn, data, origin: dict[str, Tensor],
                              directions: Sequence[dict[str, Tensor]], coeffs: Tensor, *,
                              train: bool = True) -> tuple[Tensor, Tensor]:
    """The same as :func:`evaluate_points` by a plain loop: for each point, ``load_state_dict`` into
    a copy of the model (in train or eval mode) and evaluate every batch."""
    batches = _batches(data)
    n_total = sum(len(x) for x, _ in batches)
    ref = copy.deepcopy(model).train(train)
    state = ref.state_dict()
    stacked = _stack(origin, directions, coeffs)
    losses, accs = [], []
    for c in coeffs:
        params = {n: p[0] for n, p in point_params(origin, stacked, c[None]).items()}
        ref.load_state_dict({**state, **params})
        loss = correct = 0.0
        for x, y in batches:
            out = ref(x)
            loss += float(loss_fn(out, y)) * len(x)
            correct += float((out.argmax(-1) == y).sum())
        losses.append(loss / n_total)
        accs.append(correct / n_total)
    return torch.tensor(losses, dtype=torch.float64), torch.tensor(accs, dtype=torch.float64)
