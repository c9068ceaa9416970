"""The stability controller: keep sharpness / stability threshold in a band by scaling the lr.

``stability`` (:class:`StabilityController`). Every ``every`` steps (default 10), at STEP_END, it
measures the stability ratio ``r = lambda / threshold(eta)`` of the step just taken: ``lambda`` the
top Hessian eigenvalue of the loss on the step's batch (``data="batch"``) or on a fixed set
(``data="fixed"``), ``threshold`` the optimizer's (:func:`~trajscope.functional.hessian.stability_threshold`:
``2/eta`` for SGD, ``(2+2 beta)/eta`` heavy ball, ``(2+2 beta1)/(eta (1-beta1))`` for Adam/AdamW,
compared there with the sharpness of Adam's preconditioned Hessian), ``eta`` the learning rate in
effect at that step. It uses its own :class:`~trajscope.probes.sharpness.SharpnessProbe` (options
``data``, ``fixed_size``, ``tol``, ``max_iter``, ``seed``), or, with ``probe="<name>"``, reads
``<name>/stability_ratio`` from a sharpness probe that runs before it (it then decides only on the
steps where that probe measured).

The decision: if ``low <= r <= high`` (default 0.8 and 0.95: just under the edge of stability) it
does nothing; otherwise it moves the lr multiplier ``m`` toward ``target`` (default the middle of the
band): ``m <- clip(m * clip(target / r, 1/(1+max_change), 1+max_change), min_multiplier,
max_multiplier)``, a bounded change per decision. Since ``r`` is proportional to ``eta`` at fixed
curvature, on a quadratic with top eigenvalue ``lambda`` SGD's lr converges into
``[2 low / lambda, 2 high / lambda]`` (tested). ``max_multiplier=1`` makes it a cap that only ever
lowers the schedule's lr.

The rule assumes the curvature stays put while the lr moves. In a real network it often does not:
a larger lr drives training to flatter regions (self-stabilization; with normalization layers the
weights grow and the sharpness falls like 1/eta), so the ratio never reaches the band from below
and an unguarded controller raises the lr to ``max_multiplier`` (on mnist1d-cnn with SGD: x100,
the loss back at chance). So a *raise* needs the sharpness to follow: the first measurement that
asks for a raise sets ``reference`` (its ``lambda``), and a later raise is held while ``lambda <
follow * reference`` (default ``follow=0.5``; 0 turns the guard off). And the batch sharpness can
stay under the edge while SGD's noise at the larger lr already undoes the progress (mnist1d-mlp: the
ratio reached 0.93 at 7x the lr with the loss rising from 1.7 to 2.3), so a raise is also held unless
the mean training loss since the last measurement (``window_loss``) is a new low, below every earlier
window's (``best_loss``): the lr goes up only while training still improves at the current one
(``loss_guard=False`` turns this off). Nor does it raise once the schedule anneals: while the
schedule's own lr is under ``anneal`` (default 0.5) times its highest so far, the threshold 2/eta
grows as the schedule lowers eta, and raising to keep the ratio would undo the decay (mnist1d-mlp,
200 steps: x26 at the last step); ``anneal=0`` turns this off. Lowering is never held. A held raise is a decision; while
holds follow each other only the first is written (``holds`` counts them all).

The multiplier composes with the schedule: at BEFORE_OPTIMIZER_STEP it sets every param group's
``lr`` to ``base * m``, ``base`` being the lr the trainer's schedule has just written. In a plain
loop whose lr nobody rewrites, the controller recognizes its own previous value (the group's lr
equals what it wrote) and keeps using the previous base, so the multiplier never compounds.

Every change is a decision in the run (evidence: ``lambda_max``, ``stability_threshold``,
``stability_ratio``, the lr, the band); ``<name>/ratio``, ``<name>/lambda_max``,
``<name>/multiplier`` (in effect at the measured step) and ``<name>/lr`` are written at each
measurement (none while any group's lr is 0, e.g. the last step of a cosine schedule: there is no
threshold at lr 0). A measurement inside the band changes nothing and is not a decision; its
scalars are still written. ``regime="<probe>"``: no change while the activation regime is chaotic (the refusal is
written instead; :mod:`trajscope.controllers.regime`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from trajscope.controllers.base import Controller, register
from trajscope.controllers.regime import RegimeGate
from trajscope.errors import UsageError
from trajscope.events import StepContext


@dataclass
class StabilityState:
    """``multiplier``: the factor on the schedule's lr; the last measured ``ratio`` and
    ``lambda_max``; ``changes``: decisions that changed the multiplier; ``refusals``: changes
    refused in the chaotic regime; ``reference``: the sharpness when a raise was first asked for;
    ``holds``: raises held (the schedule annealing, the sharpness under ``follow * reference``, or
    the training loss not at a new low); ``window_loss``: the mean training loss between the last two measurements, ``best_loss``
    the lowest of the earlier ones;
    ``schedule_peak``: the highest lr the schedule has set (first param group)."""

    multiplier: float = 1.0
    ratio: float | None = None
    lambda_max: float | None = None
    changes: int = 0
    refusals: int = 0
    reference: float | None = None
    holds: int = 0
    window_loss: float | None = None
    best_loss: float | None = None
    schedule_peak: float = 0.0


def next_multiplier(multiplier: float, ratio: float, low: float, high: float, target: float,
                    max_change: float, min_multiplier: float, max_multiplier: float) -> float:
    """The decision rule (module docstring) as a plain function: the new multiplier."""
    if low <= ratio <= high:
        return multiplier
    step = 1.0 + max_change
    factor = min(max(target / ratio, 1.0 / step), step) if ratio > 0 else step
    return min(max(multiplier * factor, min_multiplier), max_multiplier)


@register
class StabilityController(Controller):
    """Scale the lr to keep the stability ratio in ``[low, high]`` (module docstring)."""

    default_name = "stability"
    needs = frozenset({"optimizer"})

    def __init__(self, name: str | None = None, every: int | None = None, *, low: float = 0.8,
                 high: float = 0.95, target: float | None = None, max_change: float = 0.25,
                 min_multiplier: float = 1e-2, max_multiplier: float = 1e2, probe: str | None = None,
                 regime: str | None = None, data: str = "batch", fixed_size: int = 1024, tol: float = 1e-2,
                 max_iter: int = 30, seed: int = 0, follow: float = 0.5,
                 loss_guard: bool = True, anneal: float = 0.5):
        super().__init__(name, every if every is not None else 10)
        target = (low + high) / 2 if target is None else target
        if not (0 < low <= target <= high) or max_change <= 0 or not (0 < min_multiplier <= 1 <= max_multiplier):
            raise UsageError("stability: need 0 < low <= target <= high, max_change > 0 and "
                             "min_multiplier <= 1 <= max_multiplier")
        self.low, self.high, self.target, self.max_change = float(low), float(high), float(target), float(max_change)
        self.min_multiplier, self.max_multiplier = float(min_multiplier), float(max_multiplier)
        if not 0 <= follow < 1:
            raise UsageError(f"stability: follow must be in [0, 1), got {follow}")
        if not 0 <= anneal <= 1:
            raise UsageError(f"stability: anneal must be in [0, 1], got {anneal}")
        self.follow, self.loss_guard, self.anneal = float(follow), bool(loss_guard), float(anneal)
        self._loss_sum, self._loss_n, self._held = 0.0, 0, False
        self.probe_name = probe
        self.gate = RegimeGate(regime)
        self.state = StabilityState()
        self._probe = None
        if probe is None:
            from trajscope.probes.sharpness import SharpnessProbe

            self._probe = SharpnessProbe(name=f"{self.name}.sharpness", data=data, fixed_size=fixed_size, tol=tol,
                                         max_iter=max_iter, seed=seed)
            self.needs = frozenset({"optimizer", "loss_fn", "batch" if data == "batch" else "data"})
        self._base: list[float] = []
        self._applied: list[float] = []

    def on_before_optimizer_step(self, ctx: StepContext) -> None:
        self.check(ctx)
        if self.loss_guard and ctx.loss is not None:  # one add on the loss's device: no sync per step
            self._loss_sum = ctx.loss.detach() + self._loss_sum
            self._loss_n += 1
        m = self.state.multiplier
        groups = ctx.optimizer.param_groups
        bases = []
        for i, group in enumerate(groups):
            lr = float(group["lr"])
            ours = i < len(self._applied) and lr == self._applied[i]
            bases.append(self._base[i] if ours else lr)
            group["lr"] = bases[-1] * m
        self._base, self._applied = bases, [float(g["lr"]) for g in groups]
        if bases:
            self.state.schedule_peak = max(self.state.schedule_peak, bases[0])

    def _measure(self, ctx: StepContext) -> dict[str, float] | None:
        if self._probe is None:
            prefix = f"{self.probe_name}/"
            if prefix + "stability_ratio" not in ctx.values:
                return None
            return {k[len(prefix):]: v for k, v in ctx.values.items() if k.startswith(prefix)}
        out = self._probe(ctx)
        if "stability_threshold" not in out:
            raise UsageError(f"controller {self.name!r} needs an optimizer with a known stability threshold "
                             f"(SGD, Adam, AdamW), not {type(ctx.optimizer).__name__}")
        return out if "stability_ratio" in out else None  # Adam before its first step: no ratio yet

    def on_step_end(self, ctx: StepContext) -> None:
        self.gate.observe(ctx)
        if ctx.step % self.every:
            return
        self.check(ctx)
        if any(float(g["lr"]) <= 0 for g in ctx.optimizer.param_groups):
            return  # no threshold at lr 0 (the end of a cosine schedule): nothing to control
        out = self._measure(ctx)
        if out is None:
            return
        s, ratio, lr = self.state, float(out["stability_ratio"]), float(ctx.optimizer.param_groups[0]["lr"])
        if s.window_loss is not None and math.isfinite(s.window_loss):
            s.best_loss = s.window_loss if s.best_loss is None else min(s.best_loss, s.window_loss)
        previous_loss = s.best_loss
        if self._loss_n:  # a non-finite loss in the window makes it non-finite: no new low, no raise
            s.window_loss = float(self._loss_sum) / self._loss_n
        self._loss_sum, self._loss_n = 0.0, 0
        s.ratio, s.lambda_max = ratio, float(out.get("lambda_max", math.nan))
        self.log_values(ctx, {"ratio": ratio, "lambda_max": s.lambda_max, "multiplier": s.multiplier, "lr": lr})
        evidence = {**{k: float(v) for k, v in out.items() if k in ("lambda_max", "preconditioned_lambda_max",
                                                                 "stability_threshold", "stability_ratio")},
                    "lr": lr, "band": [self.low, self.high], "target": self.target, **self.gate.evidence()}
        if not math.isfinite(ratio):
            self.decide(ctx, "held: stability ratio not finite", reason=f"ratio {ratio}", evidence=evidence)
            return
        new = next_multiplier(s.multiplier, ratio, self.low, self.high, self.target, self.max_change,
                              self.min_multiplier, self.max_multiplier)
        if new == s.multiplier:
            self._held = False
            return
        side = "above" if ratio > self.high else "below"
        why = f"stability ratio {ratio:.3g} {side} the band [{self.low:g}, {self.high:g}]"
        if self.gate.chaotic:
            s.refusals += 1
            self.decide(ctx, "held: chaotic regime", reason=f"{why}, but the activation regime is chaotic",
                        evidence=evidence)
            return
        if new > s.multiplier:
            hold = self._raise_held(previous_loss)
            if hold is not None:
                s.holds += 1
                if not self._held:
                    self.decide(ctx, f"held: {hold[0]}", reason=f"{why}, but {hold[1]}",
                                evidence={**evidence, "reference": s.reference, "follow": self.follow,
                                          "window_loss": s.window_loss, "best_loss": previous_loss})
                self._held = True
                return
        self._held = False
        old, s.multiplier, s.changes = s.multiplier, new, s.changes + 1
        self.decide(ctx, f"lr multiplier {old:.4g} -> {new:.4g}", reason=why,
                    evidence={**evidence, "multiplier_before": old, "multiplier_after": new})

    def _raise_held(self, previous_loss: float | None) -> tuple[str, str] | None:
        """Why a raise is held (a short title and the reason), or None to let it through."""
        s = self.state
        if self._base and self._base[0] < self.anneal * s.schedule_peak:
            return ("the schedule anneals",
                    f"the schedule's lr {self._base[0]:.4g} is under {self.anneal:g} x its peak {s.schedule_peak:.4g}: "
                    f"the decay is the schedule's")
        if math.isfinite(s.lambda_max):
            if s.reference is None:
                s.reference = s.lambda_max
            elif s.lambda_max < self.follow * s.reference:
                return ("the sharpness does not follow the lr",
                        f"the sharpness fell to {s.lambda_max:.3g}, under {self.follow:g} x {s.reference:.3g} "
                        f"when a raise was first asked for: a larger lr flattens the loss instead of nearing the edge")
        if self.loss_guard and previous_loss is not None and s.window_loss is not None \
                and not s.window_loss < previous_loss:
            return ("the training loss is not falling",
                    f"the mean training loss since the last measurement, {s.window_loss:.4g}, is not below the "
                    f"lowest before it, {previous_loss:.4g}")
        return None

    def buffers(self) -> dict[str, Any]:
        out: dict[str, Any] = {"regime": self.gate.state(),
                               "window": [float(self._loss_sum), self._loss_n, self._held]}
        if self._probe is not None:
            out["probe"] = self._probe.state_dict()
        return out

    def load_buffers(self, buffers: dict[str, Any]) -> None:
        self.gate.load(buffers.get("regime"))
        if "window" in buffers:
            total, n, held = buffers["window"]
            self._loss_sum, self._loss_n, self._held = float(total), int(n), bool(held)
        if self._probe is not None and "probe" in buffers:
            self._probe.load_state_dict(buffers["probe"])
