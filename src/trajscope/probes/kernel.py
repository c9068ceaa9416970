"""Kernel motion and activation-regime probes on a fixed probe set.

The probe set is the first ``size`` validation inputs of the workload (``ctx.data.x_val[:size]``), the
same at every measurement. Both probes take a reference at FIT_START (the state the run starts from:
step 0, the init, or the step a resumed run starts at) without writing anything, then write on their
scheduled steps at STEP_END. Definitions in :mod:`trajscope.functional.ntk`.

``kernel`` (:class:`KernelProbe`) writes ``distance`` S(K_ref, K_t) from the reference kernel,
``velocity`` S(K_prev, K_t) / (t - prev) against its previous measurement (or the reference; 0 when
there is neither, in a loop that emits no FIT_START), and ``trace`` tr(K_t) / N (the mean diagonal
entry: per-example kernel scale). Default N = 64, ``kind="trace"``; cost: one Jacobian of the C
outputs on N examples, N * C vector-Jacobian products, and memory N * C * P floats (chunked).

``regime`` (:class:`RegimeProbe`) writes ``similarity`` s, the cosine similarity of the activations
(outputs by default, or those of module ``layer``) against those ``delta`` steps earlier, ``label``
(0 chaotic, 1 transition, 2 stable), ``lag`` (the steps between the compared states) and ``fallback``
(1 when the percentile thresholds were used). The probe stores the activations at every step t with
``schedule(t + delta)``, so with any schedule the comparison is with exactly ``delta`` steps earlier;
for t < delta (or after a resume) it is with the earliest stored state (the reference), and ``lag``
says so. The thresholds come from all similarities this probe has measured (``thresholds="auto"``:
the paper's unless they give every observation the same label; see
:func:`~trajscope.functional.ntk.regime_thresholds`). Default schedule: every ``delta`` steps.
"""

from __future__ import annotations

from typing import Any

import torch

from trajscope import schedules as S
from trajscope.events import Event, StepContext
from trajscope.functional.ntk import (PAPER_TAU_HIGH, PAPER_TAU_LOW, activation_similarity, activations,
                                      empirical_ntk, kernel_distance, regime_label, regime_thresholds)
from trajscope.probes.base import Probe, register


class _ProbeSetProbe(Probe):
    """A probe on the first ``size`` validation inputs that takes a reference at FIT_START."""

    needs = frozenset({"data"})

    def on_event(self, event: Event, ctx: StepContext) -> None:
        if event is Event.FIT_START:
            if not self._checked:
                self.check(ctx)
                self._checked = True
            self.reference(ctx)
            return
        super().on_event(event, ctx)

    def probe_set(self, ctx: StepContext) -> torch.Tensor:
        return ctx.data.x_val[:self.size]

    def reference(self, ctx: StepContext) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


@register
class KernelProbe(_ProbeSetProbe):
    """Empirical-NTK distance from the reference and velocity (module docstring)."""

    default_name = "kernel"

    def __init__(self, schedule=None, name: str | None = None, *, size: int = 64, kind: str = "trace",
                 chunk_size: int = 32, train: bool = False):
        super().__init__(schedule, name)
        self.size, self.kind, self.chunk_size, self.train = size, kind, chunk_size, train
        self._ref: tuple[int, torch.Tensor] | None = None
        self._prev: tuple[int, torch.Tensor] | None = None

    def _kernel(self, ctx: StepContext) -> torch.Tensor:
        return empirical_ntk(ctx.model, self.probe_set(ctx), kind=self.kind, chunk_size=self.chunk_size,
                             train=self.train)

    def reference(self, ctx: StepContext) -> None:
        self._ref = self._prev = (ctx.step, self._kernel(ctx))

    def measure(self, ctx: StepContext) -> dict[str, float]:
        K = self._kernel(ctx)
        if self._ref is None:
            self._ref = (ctx.step, K)
        out = {"distance": kernel_distance(self._ref[1], K), "velocity": 0.0,
               "trace": float(K.diagonal().mean()) if self.kind != "full" else float(K.trace()) / self.size}
        if self._prev is not None and ctx.step > self._prev[0]:
            out["velocity"] = kernel_distance(self._prev[1], K) / (ctx.step - self._prev[0])
        self._prev = (ctx.step, K)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"ref": self._ref, "prev": self._prev}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._ref, self._prev = state.get("ref"), state.get("prev")


@register
class RegimeProbe(_ProbeSetProbe):
    """Activation similarity against ``delta`` steps earlier and its regime label (module docstring)."""

    default_name = "regime"

    def __init__(self, schedule=None, name: str | None = None, *, delta: int = 10, size: int = 256,
                 layer: str | None = None, tau_high: float = PAPER_TAU_HIGH, tau_low: float = PAPER_TAU_LOW,
                 thresholds: str = "auto", percentiles: tuple[float, float] = (70.0, 30.0),
                 min_history: int = 8, train: bool = False):
        if delta < 1:
            raise ValueError(f"delta must be >= 1, got {delta}")
        super().__init__(schedule if schedule is not None else S.every(delta), name)
        self.delta, self.size, self.layer, self.train = delta, size, layer, train
        self.options = {"tau_high": tau_high, "tau_low": tau_low, "thresholds": thresholds,
                        "percentiles": tuple(percentiles), "min_history": min_history}
        regime_thresholds([], **self.options)  # validates the options now
        self._stored: dict[int, torch.Tensor] = {}
        self.history: list[float] = []

    def _acts(self, ctx: StepContext) -> torch.Tensor:
        return activations(ctx.model, self.probe_set(ctx), self.layer, train=self.train)

    def reference(self, ctx: StepContext) -> None:
        self._stored[ctx.step] = self._acts(ctx)

    def on_event(self, event: Event, ctx: StepContext) -> None:
        if event is self.event and self.schedule(ctx.step + self.delta) and not self.schedule(ctx.step):
            self._stored[ctx.step] = self._acts(ctx)  # needed delta steps from now
        super().on_event(event, ctx)

    def _reference_for(self, step: int) -> int | None:
        earlier = [s for s in self._stored if s <= step - self.delta]
        if earlier:
            return max(earlier)
        before = [s for s in self._stored if s < step]
        return min(before) if before else None

    def measure(self, ctx: StepContext) -> dict[str, float]:
        a = self._acts(ctx)
        ref = self._reference_for(ctx.step)
        s = activation_similarity(self._stored[ref], a) if ref is not None else 1.0
        self.history.append(s)
        hi, lo, used = regime_thresholds(self.history, **self.options)
        if ref is not None:
            self._stored = {k: v for k, v in self._stored.items() if k >= ref}
        if self.schedule(ctx.step + self.delta):
            self._stored[ctx.step] = a
        return {"similarity": s, "label": regime_label(s, hi, lo),
                "lag": ctx.step - ref if ref is not None else 0, "fallback": float(used)}

    def state_dict(self) -> dict[str, Any]:
        return {"stored": dict(self._stored), "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._stored = dict(state.get("stored", {}))
        self.history = list(state.get("history", []))
