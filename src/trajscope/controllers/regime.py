"""Regime-aware decisions: a controller that refuses to act in the chaotic regime.

The activation-similarity regime (Leap+Verify; :class:`~trajscope.probes.kernel.RegimeProbe`,
definitions in :mod:`trajscope.functional.ntk`) labels each of its measurements 0 (chaotic),
1 (transition) or 2 (stable). A controller given ``regime="<probe name>"`` reads
``ctx.values["<probe name>/label"]`` at every STEP_END (the probe must run before the controller at
that event: in a config, probes always come first; in ``Trainer(callbacks=[...])`` and
:class:`~trajscope.controllers.base.LoopHooks`, list the probe first) and keeps the latest label.
While that label is 0 it refuses to act: the decision it would have taken is written to the run as
a refusal (``held: chaotic regime``) and its state is left unchanged. Before the probe's first
measurement the regime is unknown and the controller acts as it would without a gate (the evidence
says ``regime_label: None``).

Usage: ``trajscope run WORKLOAD --probe regime:delta=10 --controller stability:regime=regime``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trajscope.events import StepContext

CHAOTIC, TRANSITION, STABLE = 0, 1, 2  # the labels of trajscope.functional.ntk.regime_label
LABELS = {CHAOTIC: "chaotic", TRANSITION: "transition", STABLE: "stable"}


@dataclass
class RegimeView:
    """The latest regime label read (None: not measured yet) and the step it was measured at."""

    label: int | None = None
    step: int | None = None


class RegimeGate:
    """Reads the regime probe named ``probe`` (None: no gate, every decision is allowed)."""

    def __init__(self, probe: str | None):
        if probe is not None and (not isinstance(probe, str) or not probe):
            raise ValueError(f"regime must name a regime probe, got {probe!r}")
        self.probe = probe
        self.view = RegimeView()

    def observe(self, ctx: StepContext) -> None:
        """Take this step's label from ``ctx.values`` if the probe measured at this step."""
        if self.probe is None:
            return
        value = ctx.values.get(f"{self.probe}/label")
        if value is not None:
            self.view = RegimeView(int(round(float(value))), int(ctx.step))

    @property
    def chaotic(self) -> bool:
        return self.view.label == CHAOTIC

    def evidence(self) -> dict[str, Any]:
        if self.probe is None:
            return {}
        return {"regime_probe": self.probe, "regime_label": self.view.label, "regime_step": self.view.step,
                "regime": LABELS.get(self.view.label, "unknown")}

    def state(self) -> dict[str, Any]:
        return {"label": self.view.label, "step": self.view.step}

    def load(self, state: dict[str, Any] | None) -> None:
        if state:
            self.view = RegimeView(state.get("label"), state.get("step"))
