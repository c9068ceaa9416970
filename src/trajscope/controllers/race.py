"""The early race: candidate rates share one budget by successive halving, the winner continues.

Each candidate is an ordinary run of the same config at its rate, with the full budget's schedule
and the Trainer's batches, plus a :class:`RaceController` that gathers early-phase evidence and, at
each *rung* (a step of ``rungs``), writes it as a decision and asks the Trainer to stop
(``stop_requested``; the Trainer checkpoints and marks the run ``stopped``). A candidate kept at a
rung is resumed from that checkpoint to the next rung; the winner of the last rung is resumed to
the end of the budget. So the winner's steps are exactly those of a run started at its rate (a test
checks the final weights bit for bit) and a loser costs the steps up to the rung it lost at; the
losers stay ``stopped`` with their evidence in the store.

Evidence at a rung at step k (theta the parameters, all trainable ones, flattened):

- ``loss``: the rung's training loss, the mean of the mini-batch losses (each the batch mean,
  before its update, in train mode) of the last quarter of steps 1..k; ``first_loss`` the loss of
  step 1 (the same batch for every candidate);
- ``loss_slope``: least-squares slope, per step, of log training loss over the second half of
  steps 1..k (> 0: rising at the rung; recorded, not a guard: over the few steps of a first rung
  it is noise, and it threw out rates that ended best);
- ``stability_ratio``: sharpness (preconditioned for Adam; plus SGD's L2 weight decay) on the first
  ``examples`` training examples over the optimizer's stability threshold at the current rate (> 1:
  beyond the edge); only at the rungs in ``sharpness_at`` (the early race asks for it with
  ``sharpness=True``, at its last rung), None elsewhere, because its Hessian-vector products cost
  steps;
- ``distance``: |theta_k - theta_0| / |theta_0|, the relative distance from init;
- ``update_mds``: directional exploration, the mean off-diagonal cosine between the displacements
  of ``chunks`` equal windows of steps 0..k (1: a straight path; lower: more exploration);
- ``val_loss``, ``val_metric``: validation loss (mean) and accuracy at step k (eval mode);
- ``wall_s``: the seconds this candidate has trained up to the rung, over all its resumes (so that a
  race read back from the store reports the seconds its runs took when they were trained).

:func:`race_decision` (the rule at every rung): a candidate is out if it diverged (a non-finite
loss), made no progress (``loss >= first_loss``), or, where measured, its stability ratio exceeds
``ratio_max`` (2: still unstable after the early transient). The others are ranked by ``loss``:
those within ``tol`` (relative, default 2%) of the best are tied and come first, the largest rate
first; the rest follow by ``loss``. The first ``keep`` go on.

Why the training loss and not the validation loss: at 5% of the budget, the validation loss of the
rates that end best is the worst of all on the BatchNorm CNNs (mnist1d-cnn: 3.98 at lr 0.25
against 1.86 at 0.03, step 20 of 400; eval-mode running statistics lag behind the catapult), while
the training loss of the last quarter of the rung already ranks them as their final metric does
(measured on a factor-2 grid of full runs of mnist1d-mlp, mnist1d-cnn and digits-mlp with SGD and
AdamW: a race of any 5 or 6 adjacent rates with rungs at 5% and 10% of the budget picks the rate
with the best final metric whenever it is among them, but for digits-mlp AdamW 0.0256 against
0.0512; a first rung at 2.5% instead of 5% picks the same rates). Why the tie goes to the larger rate: a short
horizon favours small rates (Wu et al. 2018, "short-horizon bias"), larger rates explore more
(lower ``update_mds``, Singh et al.), and the catapult results place the best fixed-compute rate as
high as stability allows.

Why 2% and not 5% (it was 5% up to commit 0b6a864): on the factor-2 grid of full runs, the ties
that rightly went to the larger rate at the last rung were 0.1-1.5% apart (mnist1d-mlp SGD: 0.25 at
1.385 against 0.125 at 1.365, 5.5 points better at the end; a tolerance of 1% loses it), and every
tolerance from 2% to 10% picks the same rates on the 42 races of adjacent grid rates there. The
benchmark's race on mnist1d-cnn AdamW had its last rung 3.4% apart (0.031 at 1.160 against 0.0155
at 1.122, step 40 of 400) and 5% gave it to 0.031, which ends 1.3 points below 0.0155 in the mean
over 3 seeds (below it on every seed). 2% is the smallest tolerance that keeps the grid's picks;
it changes no other pick of the benchmark's races.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Sequence

import torch
from torch.nn.utils import parameters_to_vector

from trajscope.controllers.base import Controller, register
from trajscope.errors import UsageError
from trajscope.events import StepContext


@dataclasses.dataclass
class RaceState:
    """``rungs``: the steps where the race decides (ascending); ``losses``: training loss of steps
    1..; ``evidence``: one dict per rung passed (empty before the first); ``wall_s``: seconds this
    run has trained so far, summed over its resumes (from each fit's start to the last step seen)."""

    rungs: list
    losses: list = dataclasses.field(default_factory=list)
    evidence: list = dataclasses.field(default_factory=list)
    wall_s: float = 0.0


def loss_slope(losses: Sequence[float]) -> float:
    """Least-squares slope per step of log(loss) over the second half of ``losses`` (0 if < 2)."""
    tail = [math.log(max(v, 1e-12)) for v in losses[len(losses) // 2:]]
    n = len(tail)
    if n < 2:
        return 0.0
    mx, my = (n - 1) / 2, sum(tail) / n
    return sum((i - mx) * (v - my) for i, v in enumerate(tail)) / sum((i - mx) ** 2 for i in range(n))


def recent_loss(losses: Sequence[float]) -> float:
    """Mean of the last quarter of ``losses`` (at least one value): the rung's training loss."""
    q = max(1, len(losses) // 4)
    return math.fsum(losses[-q:]) / q


def mean_cosine(vectors: torch.Tensor) -> float:
    """Mean off-diagonal cosine similarity of the rows of ``vectors`` (m, P), m >= 2."""
    v = vectors.double()
    v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-300)
    g = v @ v.T
    m = len(v)
    return float((g.sum() - g.diagonal().sum()) / (m * (m - 1)))


def window_bounds(rung: int, chunks: int) -> list[int]:
    """The ``chunks + 1`` window boundaries 0 = b_0 < ... < b_m = ``rung`` (m = min(chunks, rung))."""
    m = min(chunks, rung)
    return sorted({round(rung * j / m) for j in range(m + 1)})


@register
class RaceController(Controller):
    """Gathers the race evidence and stops the run at each rung (``stop=False``: only records).

    ``rungs``: the decision steps (``at``, a single rung, is kept for one-rung races); ``examples``:
    training examples for the sharpness; ``sharpness_at``: the rungs where it is measured (default:
    the last); ``chunks``: windows of the exploration measure."""

    default_name = "race"
    needs = frozenset({"data", "loss_fn", "optimizer"})

    def __init__(self, name: str | None = None, at: int = 50, rungs: Sequence[int] | None = None,
                 examples: int = 128, chunks: int = 8, stop: bool = True,
                 sharpness_at: Sequence[int] | None = None):
        super().__init__(name)
        rungs = sorted({int(r) for r in (rungs if rungs else (at,))})
        if rungs[0] < 2 or chunks < 2:
            raise UsageError(f"race needs rungs >= 2 and chunks >= 2, got rungs={rungs}, chunks={chunks}")
        self.examples, self.chunks, self.stop = examples, chunks, stop
        self.sharpness_at = set(rungs[-1:] if sharpness_at is None else (int(r) for r in sharpness_at))
        self.state = RaceState(rungs=rungs)
        self.stop_requested = False
        self._clock = (time.perf_counter(), 0.0)  # (when this fit started, seconds trained before it)
        self._marks: dict[int, torch.Tensor] = {}  # step -> theta at the window bounds still needed
        self._bounds = set().union(*(window_bounds(r, chunks) for r in rungs))

    def _theta(self, ctx: StepContext) -> torch.Tensor:
        return parameters_to_vector([p for p in ctx.model.parameters() if p.requires_grad]).detach().clone()

    def buffers(self) -> dict[str, Any]:
        if not self._marks:
            return {}
        steps = sorted(self._marks)
        return {"mark_steps": steps, "marks": torch.stack([self._marks[s] for s in steps])}

    def load_buffers(self, buffers: dict[str, Any]) -> None:
        self._marks = {int(s): v.clone() for s, v in zip(buffers.get("mark_steps", []), buffers.get("marks", []))}

    def on_fit_start(self, ctx: StepContext) -> None:
        self.stop_requested = False
        self._clock = (time.perf_counter(), self.state.wall_s)
        if ctx.step == 0:
            self._marks = {0: self._theta(ctx)}

    def on_step_end(self, ctx: StepContext) -> None:
        last = self.state.rungs[-1]
        if ctx.step > last or 0 not in self._marks:
            return
        self.check(ctx)
        self.state.losses.append(float(ctx.loss.detach()))
        start, before = self._clock
        self.state.wall_s = before + time.perf_counter() - start
        if ctx.step in self._bounds:
            self._marks[ctx.step] = self._theta(ctx)
        if ctx.step in self.state.rungs:
            ev = self.evidence(ctx)
            self.state.evidence.append(ev)
            self.decide(ctx, f"race evidence at step {ctx.step}" + ("; stopping for the race" if self.stop else ""),
                        f"rung {self.state.rungs.index(ctx.step) + 1} of {len(self.state.rungs)}", ev)
            self.stop_requested = self.stop
            later = set().union(*(window_bounds(r, self.chunks) for r in self.state.rungs if r > ctx.step))
            self._marks = {s: v for s, v in self._marks.items() if s == 0 or s in later} if later else {}

    def evidence(self, ctx: StepContext) -> dict[str, Any]:
        from trajscope.controllers.curvature_lr import coupled_weight_decay, sharpness
        from trajscope.functional.hessian import stability_threshold

        theta, theta0 = self._marks[ctx.step], self._marks[0]
        bounds = window_bounds(ctx.step, self.chunks)
        disp = torch.stack([self._marks[b] - self._marks[a] for a, b in zip(bounds[:-1], bounds[1:])])
        lam = ratio = None
        hvps, n_ex = 0, 0
        if ctx.step in self.sharpness_at:
            x, y = ctx.data.x_train[:self.examples], ctx.data.y_train[:self.examples]
            lam, hvps = sharpness(ctx.model, ctx.loss_fn, (x, y), ctx.optimizer, tol=5e-2, max_iter=20,
                                  generator=torch.Generator().manual_seed(0))
            lam += coupled_weight_decay(ctx.optimizer)
            n_ex = len(x)
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
                "loss": recent_loss(self.state.losses), "first_loss": self.state.losses[0],
                "loss_slope": loss_slope(self.state.losses), "sharpness": lam, "stability_ratio": ratio,
                "hvps": hvps, "hvp_examples": n_ex, "wall_s": self.state.wall_s,
                "distance": float((theta - theta0).norm() / theta0.norm().clamp_min(1e-12)),
                "update_mds": mean_cosine(disp) if len(disp) >= 2 else None,
                "val_loss": float(ctx.workload.loss_fn(logits, ctx.data.y_val)),
                "val_metric": float(ctx.workload.metric_fn(logits, ctx.data.y_val))}


def race_decision(candidates: Sequence[dict[str, Any]], tol: float = 0.02, ratio_max: float = 2.0,
                  keep: int = 1, key: str = "loss") -> dict[str, Any]:
    """One rung's decision (see the module docstring). ``candidates``: one dict per rate with ``lr``
    and either ``diverged: True`` or the evidence keys (``loss``, ``first_loss``, ``val_loss``,
    optionally ``stability_ratio``). ``key``: what ranks them, ``"loss"`` (recent training loss)
    or ``"val_loss"``; those within ``tol`` (relative) of the best are tied and go first, the
    largest rate first, then the rest by ``key``. Returns ``{"winner": index, "lr", "keep":
    [the first ``keep`` indices, best first], "reason", "verdicts": [str per candidate]}``; every
    candidate diverged: UsageError."""
    if keep < 1 or key not in ("loss", "val_loss"):
        raise UsageError(f"a race rung needs keep >= 1 and key 'loss' or 'val_loss', got keep={keep}, key={key!r}")
    verdicts = []
    alive = []
    for i, c in enumerate(candidates):
        if c.get("diverged") or not all(math.isfinite(c.get(k, math.inf)) for k in ("loss", "val_loss")):
            verdicts.append("out: diverged")
        elif c.get("first_loss") is not None and c["loss"] >= c["first_loss"]:
            verdicts.append(f"out: no progress (training loss {c['loss']:.4g} >= {c['first_loss']:.4g} at step 1)")
        elif c.get("stability_ratio") is not None and c["stability_ratio"] > ratio_max:
            verdicts.append(f"out: stability ratio {c['stability_ratio']:.3g} > {ratio_max}")
        else:
            verdicts.append("in")
            alive.append(i)
    fallback = not alive
    if fallback:  # nothing passed the guards: rank the finite ones
        alive = [i for i, c in enumerate(candidates) if not c.get("diverged")
                 and all(math.isfinite(c.get(k, math.inf)) for k in ("loss", "val_loss"))]
        if not alive:
            raise UsageError("every candidate rate diverged in the race; give smaller rates")
    best = min(candidates[i][key] for i in alive)
    tied = sorted((i for i in alive if candidates[i][key] <= best * (1 + tol)), key=lambda i: -candidates[i]["lr"])
    rest = sorted((i for i in alive if i not in tied), key=lambda i: candidates[i][key])
    ranked = tied + rest
    kept = ranked[:keep]
    name = "training loss" if key == "loss" else "validation loss"
    for pos, i in enumerate(ranked):
        what = "winner" if pos == 0 else ("kept" if i in kept else f"out: ranked {pos + 1}")
        why = "tied with the best, larger rate first" if i in tied else name
        verdicts[i] = f"{what} ({why}; {name} {candidates[i][key]:.4g})"
    reason = (f"{len(alive)} of {len(candidates)} candidates " + ("finite (none passed the guards)" if fallback
              else "finite and making progress") + f"; {len(tied)} within {tol:.0%} of the best {name} "
              f"{best:.4g}, the largest rate of them first; {len(kept)} kept")
    return {"winner": kept[0], "lr": candidates[kept[0]]["lr"], "keep": kept, "reason": reason, "verdicts": verdicts}
