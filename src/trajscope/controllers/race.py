"""The early race: several candidate rates for the first steps of one budget, the winner continues.

Each candidate is an ordinary run of the same config at its rate, with the full budget's schedule
and the Trainer's batches, plus a :class:`RaceController` that gathers early-phase evidence over
the first ``at`` steps and, at step ``at``, writes it as a decision and asks the Trainer to stop
(``stop_requested``; the Trainer checkpoints and marks the run ``stopped``). The winner is resumed
from that checkpoint, so its steps are exactly those of a run started at its rate (a test checks
the final weights bit for bit); the losers stay ``stopped`` with their evidence in the store.

Evidence at step ``at`` (theta the parameters, all trainable ones, flattened):

- ``loss_slope``: least-squares slope, per step, of log training loss (mini-batch mean, before
  each update) over the second half of the race; > 0 means the loss is rising;
- ``stability_ratio``: sharpness (preconditioned for Adam) on the first ``examples`` training
  examples over the optimizer's stability threshold at the current rate (> 1: beyond the edge);
- ``distance``: |theta_at - theta_0| / |theta_0|, the relative distance from init;
- ``update_mds``: directional exploration, the mean off-diagonal cosine between the displacements
  of ``chunks`` equal windows of the race (1: a straight path; lower: more exploration);
- ``val_loss``, ``val_metric``: validation loss (mean) and accuracy at step ``at``.

:func:`race_decision` (the rule): a candidate is out if it diverged, its loss is rising, or its
stability ratio exceeds ``ratio_max`` (2: still unstable after the early transient). Of the rest,
those whose validation loss is within ``tol`` (relative) of the best are tied, and the tie goes to
the most exploring (lowest ``update_mds``): larger rates explore more (Singh et al.) and the
catapult results place the best fixed-compute rate as high as stability allows.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import torch
from torch.nn.utils import parameters_to_vector

from trajscope.controllers.base import Controller, register
from trajscope.errors import UsageError
from trajscope.events import StepContext


@dataclasses.dataclass
class RaceState:
    """``at``: the race's last step; ``losses``: training loss of steps 1..; ``evidence``: set at
    step ``at`` (empty before)."""

    at: int
    losses: list = dataclasses.field(default_factory=list)
    evidence: dict = dataclasses.field(default_factory=dict)


def loss_slope(losses: Sequence[float]) -> float:
    """Least-squares slope per step of log(loss) over the second half of ``losses`` (0 if < 2)."""
    tail = [math.log(max(v, 1e-12)) for v in losses[len(losses) // 2:]]
    n = len(tail)
    if n < 2:
        return 0.0
    mx, my = (n - 1) / 2, sum(tail) / n
    return sum((i - mx) * (v - my) for i, v in enumerate(tail)) / sum((i - mx) ** 2 for i in range(n))


def mean_cosine(vectors: torch.Tensor) -> float:
    """Mean off-diagonal cosine similarity of the rows of ``vectors`` (m, P), m >= 2."""
    v = vectors.double()
    v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-300)
    g = v @ v.T
    m = len(v)
    return float((g.sum() - g.diagonal().sum()) / (m * (m - 1)))


@register
class RaceController(Controller):
    """Gathers the race evidence over steps 1..``at`` and stops the run at ``at`` (``stop=False``:
    only records). ``examples``: training examples for the sharpness; ``chunks``: windows of the
    exploration measure."""

    default_name = "race"
    needs = frozenset({"data", "loss_fn", "optimizer"})

    def __init__(self, name: str | None = None, at: int = 50, examples: int = 128, chunks: int = 8,
                 stop: bool = True):
        super().__init__(name)
        if at < 2 or chunks < 2:
            raise UsageError(f"race needs at >= 2 and chunks >= 2, got at={at}, chunks={chunks}")
        self.examples, self.chunks, self.stop = examples, min(chunks, at), stop
        self.state = RaceState(at=at)
        self.stop_requested = False
        self._marks: list[torch.Tensor] = []
        self._bounds = {round(at * j / self.chunks) for j in range(self.chunks + 1)}

    def _theta(self, ctx: StepContext) -> torch.Tensor:
        return parameters_to_vector([p for p in ctx.model.parameters() if p.requires_grad]).detach().clone()

    def on_fit_start(self, ctx: StepContext) -> None:
        if ctx.step == 0:
            self._marks = [self._theta(ctx)]

    def on_step_end(self, ctx: StepContext) -> None:
        at = self.state.at
        if ctx.step > at or not self._marks:
            return
        self.check(ctx)
        self.state.losses.append(float(ctx.loss.detach()))
        if ctx.step in self._bounds:
            self._marks.append(self._theta(ctx))
        if ctx.step == at:
            self.state.evidence = self.evidence(ctx)
            self.decide(ctx, f"race evidence at step {at}" + ("; stopping for the race" if self.stop else ""),
                        "end of the race window", self.state.evidence)
            self.stop_requested = self.stop

    def evidence(self, ctx: StepContext) -> dict[str, Any]:
        from trajscope.controllers.curvature_lr import sharpness
        from trajscope.functional.hessian import stability_threshold

        theta = self._marks[-1]
        disp = torch.stack([b - a for a, b in zip(self._marks[:-1], self._marks[1:])])
        x, y = ctx.data.x_train[:self.examples], ctx.data.y_train[:self.examples]
        lam, hvps = sharpness(ctx.model, ctx.loss_fn, (x, y), ctx.optimizer,
                              generator=torch.Generator().manual_seed(0))
        try:
            ratio = lam / stability_threshold(ctx.optimizer)
        except ValueError:
            ratio = None
        was = ctx.model.training
        ctx.model.eval()
        with torch.no_grad():
            logits = ctx.model(ctx.data.x_val)
        ctx.model.train(was)
        return {"step": ctx.step, "lr": float(ctx.optimizer.param_groups[0]["lr"]),
                "loss": sum(self.state.losses[-5:]) / len(self.state.losses[-5:]),
                "loss_slope": loss_slope(self.state.losses), "sharpness": lam, "stability_ratio": ratio,
                "hvps": hvps, "hvp_examples": len(x),
                "distance": float((theta - self._marks[0]).norm() / self._marks[0].norm().clamp_min(1e-12)),
                "update_mds": mean_cosine(disp),
                "val_loss": float(ctx.workload.loss_fn(logits, ctx.data.y_val)),
                "val_metric": float(ctx.workload.metric_fn(logits, ctx.data.y_val))}


def race_decision(candidates: Sequence[dict[str, Any]], tol: float = 0.05, ratio_max: float = 2.0) -> dict[str, Any]:
    """Pick the winner (see the module docstring). ``candidates``: one dict per rate with ``lr`` and
    either ``diverged: True`` or the evidence keys. Returns ``{"winner": index, "lr", "reason",
    "verdicts": [str per candidate]}``; every candidate diverged: UsageError."""
    verdicts = []
    alive = []
    for i, c in enumerate(candidates):
        if c.get("diverged") or not math.isfinite(c.get("val_loss", math.inf)):
            verdicts.append("out: diverged")
        elif c["loss_slope"] > 0:
            verdicts.append(f"out: training loss rising (slope {c['loss_slope']:.3g} per step)")
        elif c.get("stability_ratio") is not None and c["stability_ratio"] > ratio_max:
            verdicts.append(f"out: stability ratio {c['stability_ratio']:.3g} > {ratio_max}")
        else:
            verdicts.append("in")
            alive.append(i)
    if not alive:  # nothing passed: fall back on the best validation loss of the finite ones
        alive = [i for i, c in enumerate(candidates) if not c.get("diverged") and math.isfinite(c.get("val_loss", math.inf))]
        if not alive:
            raise UsageError("every candidate rate diverged in the race; give smaller rates")
    best = min(candidates[i]["val_loss"] for i in alive)
    tied = [i for i in alive if candidates[i]["val_loss"] <= best * (1 + tol)]
    winner = min(tied, key=lambda i: (candidates[i].get("update_mds", 0.0), -candidates[i]["lr"]))
    for i in tied:
        verdicts[i] = ("winner" if i == winner else "tied, less exploring") + f" (val loss {candidates[i]['val_loss']:.4g})"
    reason = (f"{len(alive)} of {len(candidates)} candidates stable and descending; {len(tied)} within "
              f"{tol:.0%} of the best validation loss {best:.4g}; the most exploring "
              f"(update MDS {candidates[winner].get('update_mds', float('nan')):.3g}) wins")
    return {"winner": winner, "lr": candidates[winner]["lr"], "reason": reason, "verdicts": verdicts}
