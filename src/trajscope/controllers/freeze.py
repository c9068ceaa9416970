"""The redundancy freeze: once the trajectory has become redundant, train only a small set.

``freeze`` (:class:`FreezeController`) watches the run's directional structure online and, at the
switch, sets ``requires_grad=False`` (and ``grad=None``) on every parameter outside the kept set, so
autograd no longer computes those weight gradients and torch optimizers skip those parameters (they
skip any parameter whose ``grad`` is None: no update, no weight decay, optimizer state untouched).
What a frozen step still computes: the whole forward pass, and in the backward the input gradients
of every layer between the loss and the earliest kept parameter; a frozen prefix that only the
input feeds builds no autograd graph at all (so running it under ``no_grad`` would save nothing).
On a small model the saving is therefore the frozen weight gradients plus their optimizer updates,
about 22 % of a step for ``mnist1d-cnn`` on one CPU thread with the convolution kernels, 24-27 %
with the dense operators below (``benchmarks/redundancy_freeze.py``), on the CPU and torch build
those figures were taken with; on an AMD AVX-512 CPU with torch 2.13 the whole step is twice as
fast, the weight gradients are a smaller share of it, and the saving is 19-20 % (ResNet-20: 29 % and
27 %); on an Intel AVX-512 CPU, 27-28 % (ResNet-20 23-24 %: its forward is 40 % of the step there).
The saving is a ratio of kernel times, so it moves with the CPU. The optimizer step does not
shrink with the parameter count: a torch optimizer's cost is per tensor (a few small kernel calls
each, plus a fixed cost), so updating 6 of 11 tensors (192 of 12,202 scalars) costs about 80 % of the
full step; tensors without a gradient cost almost nothing, so narrowing the param groups to the
kept set would not help.
A frozen convolution is moreover a constant linear map: with ``frozen_ops="dense"`` (default) each
frozen convolution on a small feature map (dense matrix of at most 64 Ki entries) runs as one
product with that matrix, built once, forward and input gradient
(:mod:`trajscope.controllers.frozen_ops`; equal to float rounding); ``"native"`` keeps the
convolution kernels. The switch decision's evidence names the convolutions given the dense path
(``dense_candidates``).

The kept set (``keep``): ``"norm"`` (default), the scales and shifts of every normalization module
(BatchNorm, LayerNorm, GroupNorm, InstanceNorm, RMSNorm); or a glob of parameter names
(``"head.*"``); or a list of those. ``last_layer=True`` adds the parameters of the last module (in
``named_modules()`` order) that owns parameters. A model without normalization parameters is a
one-line UsageError unless the set is named, checked at FIT_START, before the first step.

When to switch:

- ``at_step=K``: forced. The switch happens once step K has been taken (at STEP_END of step K; at
  FIT_START for K = 0), so updates K+1, K+2, ... change only the kept set. No watching, no cost.
- otherwise, by the redundancy criterion of :mod:`trajscope.functional.redundancy`: the controller
  sketches all parameters (count sketch of ``sketch_dim``, seed ``sketch_seed``) at FIT_START (the
  reference) and at every STEP_END, keeps the last ``window`` sketches, and every ``every`` steps
  (from step ``max(window, min_step)`` on) computes the window's displacement MDS and its ratio to
  the random-walk baseline; after ``patience`` consecutive decisions with ``ratio <= threshold``
  it switches. Default ``threshold=0.005``: the direction from the start turns by at most 0.5 % of
  what a random walk of that age would (it was 0.05; on ``mnist1d-cnn``, 3 seeds, that switched at
  steps 430-580 of 2,000 and lost 0.5 point of validation accuracy, while switches at 700-1,000
  lost 0.1-0.3 point, within seed noise; ``benchmarks/README.md``, redundancy_freeze). The ratio
  falls as a decaying schedule shrinks the steps, so in a short run it fires late: on the synthetic
  ResNet-20 stand-in (batch 32, cosine) at steps 440-470 of 720, and at 220 of 240.
  It writes ``<name>/mds``, ``<name>/ratio``, ``<name>/update_cosine`` and
  ``<name>/baseline`` at each such decision step. ``regime="<probe>"``: no switch while the
  activation regime is chaotic (:mod:`trajscope.controllers.regime`).

The state records the switch step, its reason and the parameter counts (scalars and tensors:
``kept_params``, ``frozen_params``, ``total_params``); the switch is a decision in the run's event
log, and ``<name>/trainable_params`` is written at the switch. On resume after the switch the
freeze is applied again at FIT_START.
"""

from __future__ import annotations

import fnmatch
import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from trajscope.controllers.base import Controller, register
from trajscope.controllers.frozen_ops import MODES as FROZEN_OPS_MODES, install_frozen_ops
from trajscope.controllers.regime import RegimeGate
from trajscope.errors import UsageError
from trajscope.events import StepContext
from trajscope.functional.redundancy import redundancy

NORM_TYPES: tuple[type, ...] = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
                                nn.modules.instancenorm._InstanceNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def norm_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters owned directly by normalization modules (scales and shifts)."""
    return [f"{m_name}.{p_name}" if m_name else p_name
            for m_name, m in model.named_modules() if isinstance(m, NORM_TYPES)
            for p_name, _ in m.named_parameters(recurse=False)]


def last_layer_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters of the last module (``named_modules()`` order) that owns any."""
    last = [(n, m) for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    if not last:
        return []
    m_name, m = last[-1]
    return [f"{m_name}.{p}" if m_name else p for p, _ in m.named_parameters(recurse=False)]


def kept_parameter_names(model: nn.Module, keep: str | Iterable[str] = "norm", last_layer: bool = False) -> list[str]:
    """The kept set (module docstring), in ``named_parameters()`` order; one-line UsageError if a
    glob matches nothing, the model has no normalization parameters for ``"norm"``, or the set
    is empty or holds every parameter."""
    items = [keep] if isinstance(keep, str) else list(keep)
    names = [n for n, _ in model.named_parameters()]
    chosen: set[str] = set()
    for item in items:
        if item == "norm":
            found = norm_parameter_names(model)
            if not found:
                raise UsageError(f"{type(model).__name__} has no normalization parameters to keep; name the set "
                                 "with keep=GLOB (e.g. keep='head.*') or last_layer=true")
        else:
            found = [n for n in names if fnmatch.fnmatchcase(n, str(item))]
            if not found:
                raise UsageError(f"keep={item!r} matches no parameter of {type(model).__name__} "
                                 f"(names look like {names[0]!r})")
        chosen.update(found)
    if last_layer:
        chosen.update(last_layer_parameter_names(model))
    if not chosen or len(chosen) == len(names):
        raise UsageError(f"the kept set holds {'no' if not chosen else 'every'} parameter: nothing to freeze")
    return [n for n in names if n in chosen]


def freeze_except(model: nn.Module, kept: Iterable[str]) -> dict[str, int]:
    """Set ``requires_grad=False`` and ``grad=None`` on every parameter not named in ``kept``;
    return the counts (``kept_params``/``frozen_params``/``total_params`` in scalars,
    ``kept_tensors``/``frozen_tensors`` in tensors)."""
    kept = set(kept)
    counts = {"kept_params": 0, "frozen_params": 0, "total_params": 0, "kept_tensors": 0, "frozen_tensors": 0}
    for n, p in model.named_parameters():
        counts["total_params"] += p.numel()
        if n in kept:
            counts["kept_params"] += p.numel()
            counts["kept_tensors"] += 1
        else:
            p.requires_grad_(False)
            p.grad = None
            counts["frozen_params"] += p.numel()
            counts["frozen_tensors"] += 1
    return counts


@dataclass
class FreezeState:
    """``switched`` at ``switch_step`` because of ``switch_reason`` (``at_step`` or ``redundant``);
    the counts of the switch; ``streak``: consecutive redundant decisions; the last ``mds`` and
    ``ratio``; ``reference_step``: the step of the reference state."""

    switched: bool = False
    switch_step: int | None = None
    switch_reason: str | None = None
    kept_params: int | None = None
    frozen_params: int | None = None
    total_params: int | None = None
    kept_tensors: int | None = None
    frozen_tensors: int | None = None
    streak: int = 0
    mds: float | None = None
    ratio: float | None = None
    reference_step: int | None = None


@register
class FreezeController(Controller):
    """Freeze all but a kept set once the trajectory is redundant, or at a given step (module docstring)."""

    default_name = "freeze"

    def __init__(self, name: str | None = None, every: int | None = None, *, at_step: int | None = None,
                 keep: str | list[str] = "norm", last_layer: bool = False, window: int = 50,
                 threshold: float = 0.005, patience: int = 3, min_step: int = 0, sketch_dim: int = 512,
                 sketch_seed: int = 0, regime: str | None = None, frozen_ops: str = "dense"):
        super().__init__(name, every if every is not None else 10)
        if frozen_ops not in FROZEN_OPS_MODES:
            raise UsageError(f"freeze: frozen_ops must be one of {', '.join(FROZEN_OPS_MODES)}, got {frozen_ops!r}")
        self.frozen_ops = frozen_ops
        if at_step is not None and int(at_step) < 0:
            raise UsageError(f"freeze: at_step must be >= 0, got {at_step}")
        if window < 3 or patience < 1 or sketch_dim < 1 or not threshold >= 0:
            raise UsageError("freeze: need window >= 3, patience >= 1, sketch_dim >= 1 and threshold >= 0")
        self.at_step = None if at_step is None else int(at_step)
        self.keep, self.last_layer = keep, bool(last_layer)
        self.window, self.threshold, self.patience = int(window), float(threshold), int(patience)
        self.min_step, self.sketch_dim, self.sketch_seed = int(min_step), int(sketch_dim), int(sketch_seed)
        self.gate = RegimeGate(regime)
        self.state = FreezeState()
        self._kept: list[str] | None = None
        self._sketcher = None
        self._reference: torch.Tensor | None = None  # (k,) float64 sketch of theta_ref
        self._window: deque[tuple[int, torch.Tensor]] = deque(maxlen=self.window)

    @property
    def watching(self) -> bool:
        return self.at_step is None and not self.state.switched

    def _sketch(self, model: nn.Module) -> torch.Tensor:
        if self._sketcher is None:
            from trajscope.functional.sketch import Sketcher

            self._sketcher = Sketcher(k=self.sketch_dim, seed=self.sketch_seed)
        return self._sketcher.sketch(model.named_parameters()).to(torch.float64)

    def on_fit_start(self, ctx: StepContext) -> None:
        self._kept = kept_parameter_names(ctx.model, self.keep, self.last_layer)  # a bad set fails now
        if self.state.switched:  # resumed after the switch: freeze again, silently
            freeze_except(ctx.model, self._kept)
            install_frozen_ops(ctx.model, self.frozen_ops)
        elif self.at_step is not None and self.at_step <= ctx.step:
            self._switch(ctx, "at_step", f"forced switch at_step={self.at_step}", {})
        elif self.watching and self._reference is None:
            self._reference = self._sketch(ctx.model)
            self.state.reference_step = int(ctx.step)

    def on_step_end(self, ctx: StepContext) -> None:
        if self.state.switched:
            return
        if self.at_step is not None:
            if ctx.step >= self.at_step:
                self._switch(ctx, "at_step", f"forced switch at_step={self.at_step}", {})
            return
        self.gate.observe(ctx)
        if self._reference is None:  # a plain loop that emitted no FIT_START: start watching now
            self.on_fit_start(ctx)
            return
        self._window.append((int(ctx.step), self._sketch(ctx.model)))
        first_age = self._window[0][0] - self.state.reference_step
        if (ctx.step % self.every or len(self._window) < self.window or ctx.step < self.min_step
                or first_age < 1):
            return
        self._watch(ctx, first_age)

    def _watch(self, ctx: StepContext, first_age: int) -> None:
        stats = redundancy(torch.stack([s for _, s in self._window]), self._reference, first_age)
        self.log_values(ctx, stats)
        self.state.mds, self.state.ratio = stats["mds"], stats["ratio"]
        redundant = math.isfinite(stats["ratio"]) and stats["ratio"] <= self.threshold
        self.state.streak = self.state.streak + 1 if redundant else 0
        if self.state.streak < self.patience:
            return
        evidence = {**stats, "streak": self.state.streak, "threshold": self.threshold, "window": self.window,
                    **self.gate.evidence()}
        if self.gate.chaotic:
            self.decide(ctx, "held: chaotic regime", reason=f"redundant (ratio {stats['ratio']:.3g} <= "
                        f"{self.threshold:g} for {self.state.streak} decisions) but the activation regime is "
                        "chaotic", evidence=evidence)
            return
        self._switch(ctx, "redundant", f"ratio {stats['ratio']:.3g} <= {self.threshold:g} on "
                     f"{self.state.streak} consecutive decisions", evidence)

    def switch_now(self, ctx: StepContext, reason: str = "switched by the caller") -> None:
        """Switch at this step whatever the criterion says (``switch_reason`` ``"forced"``)."""
        if not self.state.switched:
            self._switch(ctx, "forced", reason, {})

    def _switch(self, ctx: StepContext, why: str, reason: str, evidence: dict[str, Any]) -> None:
        if self._kept is None:
            self._kept = kept_parameter_names(ctx.model, self.keep, self.last_layer)
        counts = freeze_except(ctx.model, self._kept)
        dense = install_frozen_ops(ctx.model, self.frozen_ops)
        s = self.state
        s.switched, s.switch_step, s.switch_reason = True, int(ctx.step), why
        s.kept_params, s.frozen_params, s.total_params = counts["kept_params"], counts["frozen_params"], counts["total_params"]
        s.kept_tensors, s.frozen_tensors = counts["kept_tensors"], counts["frozen_tensors"]
        self._window.clear()
        self.log_values(ctx, {"trainable_params": counts["kept_params"]})
        self.decide(ctx, f"froze {counts['frozen_params']:,} of {counts['total_params']:,} parameters; "
                    f"{counts['kept_params']:,} stay trainable", reason=reason,
                    evidence={**evidence, **counts, "frozen_ops": self.frozen_ops, "dense_candidates": dense})

    def buffers(self) -> dict[str, Any]:
        out: dict[str, Any] = {"regime": self.gate.state()}
        if self._reference is not None:
            out["reference"] = self._reference.clone()
        if self._window:
            out["window_steps"] = [s for s, _ in self._window]
            out["window"] = torch.stack([v for _, v in self._window])
        return out

    def load_buffers(self, buffers: dict[str, Any]) -> None:
        self.gate.load(buffers.get("regime"))
        ref = buffers.get("reference")
        self._reference = None if ref is None else ref.to(torch.float64).clone()
        self._window.clear()
        for s, v in zip(buffers.get("window_steps", []), buffers.get("window", [])):
            self._window.append((int(s), v.to(torch.float64).clone()))
