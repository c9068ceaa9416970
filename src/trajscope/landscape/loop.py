"""Point-by-point evaluation for :func:`~trajscope.landscape.grid.evaluate_points` (strategy "loop").

One plain forward pass per point and data batch on a private copy of the model, with three savings
over setting the parameters and calling the loss at every point:

- *One write per point.* The copy's parameters are views into one flat buffer per (dtype, device).
  With c = (head, last), base = origin + head . directions[:-1] is rebuilt only when the head
  changes (once per row of a grid); a point's parameters are then ``flat = base + last * d_last``,
  one ``torch.add`` per buffer, or, within a row, the step ``flat += (last - previous) * d_last``
  in place (reads two tensors instead of three: ~2% of a forward pass on the MLP), anchored anew
  every ``ANCHOR`` points so that float32 rounding cannot accumulate past ~ANCHOR ulps.
- *Input layers replayed.* A ``Linear`` or ``Conv`` layer whose input does not depend on the
  parameters (the data, or a view or reshape of it) is linear in its own weight and bias, so its
  output at origin + sum_j c_j d_j is y_0 + sum_j c_j y_j: y_0 its output at the origin, y_j its
  output with weight and bias replaced by direction j's (zero where the direction lacks them).
  These are computed once per data batch, and the layer's forward becomes one add (the head part
  cached per row as above). For the MNIST-1D MLP 40-256-256-10 this removes the first matmul, 13%
  of a forward pass's multiply-adds. A layer qualifies if it is called once per forward pass, its
  input does not require grad when every varied parameter does, its fan-in (multiply-adds per
  output element) is at least ``MIN_FAN_IN``, and its outputs fit in ``REPLAY_BYTES``. At the first
  point the replayed forward pass is checked against a plain one and the replay dropped if they
  differ beyond float32 rounding (e.g. a random input: dropout before the layer).
- *ReLU in place.* An ``nn.ReLU`` of the copy that follows a layer returning a fresh tensor
  (``Linear``, ``Conv``, a norm layer) in an ``nn.Sequential``, and appears there only once in the
  model, runs in place: no new output tensor per point (on the MNIST-1D MLP 10% of a forward pass:
  each fresh 1 MB output is allocated and written anew). The first point's check below compares
  with a plain pass with the modules as they were.
- *Loss per chunk.* Each point's output is copied into a buffer (g, B, ...) reused across chunks,
  and the losses and hits of the chunk's points are taken together at its end, with no per-point
  synchronization. Interleaving the loss with the forward passes, or keeping the outputs alive as
  separate tensors, measured 10-30% slower on a CPU (the heap fragments and the forward pass's large
  temporaries leave the cache); a ``vmap(loss_fn)`` over the chunk was slower than a loop over it.

The replayed output differs from the direct one by float32 rounding only (the tests hold both to
the ``load_state_dict`` reference).
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

MIN_FAN_IN = 4
ANCHOR = 16
REPLAY_BYTES = 256 * 2**20
REPLAYABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _fan_in(m: nn.Module) -> int:
    if isinstance(m, nn.Linear):
        return m.in_features
    return m.in_channels // m.groups * math.prod(m.kernel_size)


class _FlatParams:
    """The copy's varied parameters as views into one flat buffer per (dtype, device); ``set(c)``
    writes origin + c . directions into them (module docstring)."""

    def __init__(self, model: nn.Module, origin: dict[str, Tensor], stacked: dict[str, Tensor]):
        named = dict(model.named_parameters())
        groups: dict[tuple, list[str]] = {}
        for n in origin:
            groups.setdefault((named[n].dtype, named[n].device), []).append(n)
        self.k = next(iter(stacked.values())).shape[0] if stacked else 0
        self.flat, self.origin, self.base, self.dirs = [], [], [], []
        for (dtype, device), names in groups.items():
            flat = torch.cat([origin[n].reshape(-1) for n in names]).to(dtype=dtype, device=device)
            dirs = torch.stack([torch.cat([stacked[n][j].reshape(-1) for n in names]) for j in range(self.k)]
                               ) if self.k else flat[:0]
            off = 0
            for n in names:
                p = named[n]
                p.data = flat[off:off + p.numel()].view_as(p)
                off += p.numel()
            self.flat.append(flat)
            self.origin.append(flat.clone())
            self.base.append(flat.clone())
            self.dirs.append(dirs.to(dtype=dtype, device=device))
        self._head: tuple | None = None
        self._last, self._steps = 0.0, ANCHOR

    def set(self, c: list[float]) -> bool:
        """Write the point ``c``; True if the head (all but the last coefficient) changed."""
        if not self.k:
            return False
        head, changed = tuple(c[:-1]), tuple(c[:-1]) != self._head
        if changed:
            for base, origin, dirs in zip(self.base, self.origin, self.dirs):
                base.copy_(origin)
                for cj, d in zip(head, dirs[:-1]):
                    base.add_(d, alpha=cj)
            self._head = head
        if changed or self._steps >= ANCHOR:
            for flat, base, dirs in zip(self.flat, self.base, self.dirs):
                torch.add(base, dirs[-1], alpha=c[-1], out=flat)
            self._steps = 0
        else:
            for flat, dirs in zip(self.flat, self.dirs):
                flat.add_(dirs[-1], alpha=c[-1] - self._last)
            self._steps += 1
        self._last = c[-1]
        return changed


class _Replay:
    """One input layer's outputs per data batch: y_0 (origin) and y_j (direction j), the head sum
    cached, and the forward replaced by ``out = base + last * y_last`` (module docstring)."""

    def __init__(self, module: nn.Module, prefix: str, inputs: list[Tensor], stacked: dict[str, Tensor], k: int,
                 budget: int):
        self.module = module
        self.y0 = [module(x) for x in inputs]
        self.nbytes = sum(y.numel() * y.element_size() for y in self.y0) * (k + 3)  # y_0, y_j, base, buffer
        if self.nbytes > budget:
            return
        local = dict(module.named_parameters(recurse=False))
        self.ys = [[functional_call(module, {n: stacked[f"{prefix}{n}"][j] if f"{prefix}{n}" in stacked
                                             else torch.zeros_like(p) for n, p in local.items()}, (x,))
                    for j in range(k)] for x in inputs]  # [batch][direction]
        self.base = [y.clone() for y in self.y0]
        self.buf = [torch.empty_like(y) for y in self.y0]
        self.out = self.buf[0]

    def rebase(self, head: list[float]) -> None:
        for base, y0, ys in zip(self.base, self.y0, self.ys):
            base.copy_(y0)
            for cj, y in zip(head, ys[:-1]):
                base.add_(y, alpha=cj)

    def point(self, b: int, last: float | None) -> None:
        """Write batch ``b``'s output at the current point (``last`` None: no direction) into its
        buffer, rewritten at every point (so the model may modify it in place; its output is copied
        out at once). A fresh tensor per point was faulted in anew at every point by the heap (the
        MLP: 320 page faults per point, +50% time)."""
        self.out = self.buf[b]
        if last is None:
            self.out.copy_(self.base[b])
        else:
            torch.add(self.base[b], self.ys[b][-1], alpha=last, out=self.out)

    def attach(self) -> None:
        self.module.forward = lambda *args, **kwargs: self.out

    def detach(self) -> None:
        self.module.__dict__.pop("forward", None)


def _input_layers(model: nn.Module, origin: dict[str, Tensor], batches) -> dict[str, list[Tensor]]:
    """{module name: its input per batch} for the layers whose input does not depend on the varied
    parameters, called once per forward pass (module docstring)."""
    calls: dict[str, list[Tensor]] = {}
    hooks = [m.register_forward_pre_hook(lambda m, args, name=name: calls.setdefault(name, []).append(args[0]))
             for name, m in model.named_modules() if isinstance(m, REPLAYABLE) and _fan_in(m) >= MIN_FAN_IN]
    params = dict(model.named_parameters())
    try:
        with torch.enable_grad():
            for p in params.values():
                p.requires_grad_(False)
            for n in origin:
                params[n].requires_grad_(True)
            for x, _ in batches:
                model(x)
    finally:
        for h in hooks:
            h.remove()
        for p in params.values():
            p.requires_grad_(False)
    return {name: [x.detach() for x in inputs] for name, inputs in calls.items()
            if len(inputs) == len(batches) and not any(x.requires_grad for x in inputs)}


_FRESH = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.modules.batchnorm._NormBase, nn.LayerNorm,
          nn.GroupNorm)


def _inplace_relus(model: nn.Module) -> list[nn.ReLU]:
    """The ReLUs that may run in place (module docstring): each the next element after a module
    that returns a fresh tensor in an ``nn.Sequential``, used nowhere else."""
    uses: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    out = []
    for seq in model.modules():
        if isinstance(seq, nn.Sequential):
            for prev, m in zip(list(seq)[:-1], list(seq)[1:]):
                if type(m) is nn.ReLU and not m.inplace and uses[id(m)] == 1 and isinstance(prev, _FRESH):
                    out.append(m)
    return out


def _set_inplace(relus: list[nn.ReLU], on: bool) -> None:
    for m in relus:
        m.inplace = on


class Looped:
    """Strategy "loop" of :func:`~trajscope.landscape.grid.evaluate_points`: ``(c (g, k), batches)
    -> (sum over batches of n_b * loss_b (g,), hits (g,))`` float64 (module docstring)."""

    def __init__(self, model: nn.Module, loss_fn: Callable, origin: dict[str, Tensor],
                 stacked: dict[str, Tensor], train: bool, batches, replay: bool = True):
        self.model = copy.deepcopy(model).train(train)
        self.params = _FlatParams(self.model, origin, stacked)
        self.loss_fn, self.checked = loss_fn, False
        self.outs: list[Tensor] = []  # per batch (chunk, *output shape)
        self.replays: list[_Replay] = []
        if replay:
            budget = REPLAY_BYTES
            modules = dict(self.model.named_modules())
            for name, inputs in _input_layers(self.model, origin, batches).items():
                r = _Replay(modules[name], f"{name}." if name else "", inputs, stacked, self.params.k, budget)
                if r.nbytes <= budget:
                    budget -= r.nbytes
                    self.replays.append(r)
        for r in self.replays:
            r.attach()
        self.relus = _inplace_relus(self.model) if replay else []
        _set_inplace(self.relus, True)

    def __call__(self, c: Tensor, batches) -> tuple[Tensor, Tensor]:
        for i, ci in enumerate(c.tolist()):
            if self.params.set(ci):
                for r in self.replays:
                    r.rebase(ci[:-1])
            for b, (x, _) in enumerate(batches):
                for r in self.replays:
                    r.point(b, ci[-1] if ci else None)
                self._keep(b, i, len(c), self.model(x))
            if not self.checked:
                self._check(batches, i)
        loss = torch.zeros(len(c), dtype=torch.float64)
        hits = torch.zeros(len(c), dtype=torch.float64)
        for (x, y), out in zip(batches, self.outs):
            lb, hb = self._score(out[:len(c)], y)
            loss += lb.to(torch.float64) * len(x)
            hits += hb.to(torch.float64)
        return loss, hits

    def _keep(self, b: int, i: int, g: int, out: Tensor) -> None:
        """Copy batch ``b``'s output at point ``i`` of a chunk of ``g`` into its buffer (g, *out.shape)
        (module docstring)."""
        if b == len(self.outs):
            self.outs.append(out.new_empty(0))
        buf = self.outs[b]
        if len(buf) < g or buf.shape[1:] != out.shape or buf.dtype != out.dtype:
            buf = self.outs[b] = out.new_empty((g, *out.shape))
        buf[i].copy_(out)

    def _check(self, batches, i: int) -> None:
        """Compare point ``i``'s replayed outputs with a plain forward pass; drop the replay (keeping
        the plain outputs) where they differ beyond float32 rounding."""
        self.checked = True
        if not self.replays and not self.relus:
            return
        for r in self.replays:
            r.detach()
        _set_inplace(self.relus, False)
        plain = [self.model(x) for x, _ in batches]
        if all(_close(out[i], p) for out, p in zip(self.outs, plain)):
            for r in self.replays:
                r.attach()
            _set_inplace(self.relus, True)
            return
        self.replays, self.relus = [], []
        for out, p in zip(self.outs, plain):
            out[i].copy_(p)

    def _score(self, out: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(loss (g,), hits (g,)) of one batch's outputs (g, B, ...) at g points."""
        hits = (out.argmax(-1) == y).flatten(1).sum(1)
        loss = torch.empty(len(out), dtype=torch.float64)
        for i, o in enumerate(out):  # written in place: no small tensors left alive on the heap
            loss[i] = self.loss_fn(o, y)
        return loss, hits


def _close(a: Tensor, b: Tensor) -> bool:
    """Equal to float32 rounding, relative to b's largest magnitude."""
    return bool((a - b).abs().max() <= 1e-4 * b.abs().max() + 1e-6)
