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

- ``avg_loss`` (what ranks the candidates): the loss of the averaged iterate, the mean of
  theta_j over the rung's last quarter j = ``tail_start(k)``..k (a Polyak-Ruppert tail average),
  on the first ``avg_examples`` training examples (default 512, a multiple of the batch size), in
  train mode on batch-size chunks (normalization on each chunk's statistics, no buffer or random
  state touched: :func:`subset_loss`); ``forward_examples`` the examples this rung's evaluations
  passed forward (the average's, plus the validation set where ``validate``), counted as choosing
  compute;
- ``cool_loss`` (what ranks the candidates at the last rung when the race is given a
  ``cooldown``, opt-in): the loss,
  on the same examples as ``avg_loss``, of a copy of the run after ``cooldown`` more steps on the
  run's own next batches with the rate falling linearly from its current value towards 0
  (:func:`cooled_loss`; the run itself is untouched); ``cool_steps`` those steps, counted as
  choosing compute (the winner's too); None and 0 at the other rungs;
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
- ``val_loss``, ``val_metric``: validation loss (mean) and accuracy at step k (eval mode), only
  with ``validate=True`` (None otherwise): the averaged iterate ranks the candidates and the
  training losses guard them, so the validation pass decides nothing unless ``key="val_loss"``; it
  was made at every rung up to here and cost 0.02-0.16 budgets per race (mnist5k-cnn: 1,000
  validation examples at 9 candidate-rungs, 47 of its 193 choosing step-equivalents);
- ``wall_s``: the seconds this candidate has trained up to the rung, over all its resumes (so that a
  race read back from the store reports the seconds its runs took when they were trained).

:func:`race_decision` (the rule at every rung; the key is ``cool_loss`` at a rung with a cooldown,
else ``avg_loss``): a candidate is out if it diverged (a non-finite
loss; the training loss, the ranking key and, where measured, the validation loss), made no
progress (``loss >= first_loss``), or, where measured, its stability ratio exceeds
``ratio_max`` (2: still unstable after the early transient). The others are ranked by ``avg_loss``
(lowest first; an exact tie goes to the larger rate); the first ``keep`` go on. ``key="loss"``
ranks by the last iterates' training loss instead, with ties within ``tol`` (relative, default 2%)
going to the larger rate first: the rule up to the averaged iterate.

Why the averaged iterate: at a rung the rate is still near its peak, and the loss of the current
iterate carries a noise floor that grows with the rate (SGD bounces across the valley floor); the
schedule's decay removes it later, so a short horizon ranks large rates too low (Wu et al. 2018,
"short-horizon bias"). The average of the last quarter's iterates sits near the valley floor
(Polyak-Ruppert averaging, what the decay would reach), so it ranks the rates closer to how they
end. The last-iterate rule needed a tie tolerance for this: on a factor-2 grid of full runs
(mnist1d-mlp, mnist1d-cnn and digits-mlp with SGD and AdamW, 10 rates each; modadd-mlp 5; 32 races
of 6 adjacent rates with the default rungs) it picks the same rates as the averaged iterate only
with its 2% tie rule (without it 10 of 32 races end more than 0.5 points below the window's best,
by 1.6-5.5, against 1 of 32 with it; with 1%, 4 of 32), while
the averaged iterate picks them with no tolerance at all (and with any from 0 to 2%). On the
benchmark's own seed-0 races the two differ on digits-mlp SGD (0.406 instead of 0.203: the
average loss 0.111 against 0.130 at step 50, where the last iterates had 0.226 against 0.186)
and mnist5k-cnn SGD (0.100 instead of 0.200: 0.319 against 0.361 at step 30). With a 2% tie the
average would hand mnist1d-cnn AdamW to 0.031 (1.022 against 1.017 for 0.0155; 0.031 ends 1.3
points below 0.0155 in the mean over 3 seeds): the tie rule stood in for the same correction, so
with the correction made directly it is dropped.

Why a cooldown at the last rung (opt-in, session 8): the averaged iterate still ranked rates that
end best below smaller ones on some pairs (the benchmark's mnist1d-mlp SGD and mnist1d-cnn AdamW,
every study). A short linear cooldown asks directly where each rate's iterate goes when its rate
decays, what the schedule does later (the "cooldown" of warmup-stable-decay schedules: a short
decay from any point of a constant-rate run recovers most of the decayed loss). Measured offline
first (plain loop with the benchmark's configs, seeds 3-8, never the benchmark's 0-2;
factor-sqrt(2) grids of 9 rates per pair, each rate's full run with its 10% rung evaluated both
ways, a cooldown of 2.5% of the budget; races of the factor-2 ladders among them, all of a
ladder's rates ranked at 10% by each key, where the race ranks the 3 its first rung kept): over
6 pairs (mnist1d-mlp, mnist1d-cnn, digits-mlp x SGD, AdamW) and 72 ladders the
mean regret against the ladder's best final is 0.50 points with the cooldown against 0.77 with the
averaged iterate (paired difference -0.28, standard error 0.14; 23 against 28 ladders more than
0.5 points off), lower or equal on every pair (mnist1d-mlp SGD 0.70 against 1.61), and the second
half of the seeds (6-8, a replicate run after the first look at 3-5) gave -0.37 +- 0.20 on its own.
It costs ``cooldown`` steps per candidate at the last rung (3 x 2.5% = 0.075 budgets at 0.025).
**It is opt-in, because the benchmark did not confirm the gain**: ``benchmarks/lr_selection.py
--studies 3`` with ``cooldown=0.025`` changed 4 of 30 picks (mnist1d-cnn SGD study 0 a factor 2
down, 1.1 points lower; mnist1d-cnn AdamW study 2 a factor 2 up, 1.2 higher; mnist5k-cnn AdamW
study 2, 0.3 lower; modadd-mlp SGD, where nothing learns), left within pairs and workloads as they
were (6 of 10 and 2 of 5 on study 0, 7 and 2 on the medians), and took ``compute_ratio`` from 1.40
to 1.49, at the edge of the 1.5 target.

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

Why 2% and not 5% for the last-iterate rule (it was 5% up to commit 0b6a864): on the factor-2 grid of full runs, the ties
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


def tail_start(rung: int) -> int:
    """The first step of a rung's last quarter, steps tail_start(k)..k (as :func:`recent_loss`)."""
    return rung - max(1, rung // 4) + 1


def subset_loss(model: torch.nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                theta: torch.Tensor | None = None) -> float:
    """Mean loss of ``model`` on (``x``, ``y``) in train mode (normalization layers use the statistics
    of each chunk of ``batch_size`` examples, as in training), with its trainable parameters replaced
    by the flat vector ``theta`` if given; the model, its buffers and the random state are left as
    they were. The loss is the example-weighted mean of the chunks' mean losses."""
    from torch.func import functional_call

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {}
    if theta is not None:
        shapes = [p for n, p in model.named_parameters() if p.requires_grad]
        offset = 0
        for n, p in zip(names, shapes):
            params[n] = theta[offset:offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
    was = model.training
    model.train()
    total = 0.0
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            for i in range(0, len(x), batch_size):
                buffers = {n: b.clone() for n, b in model.named_buffers()}  # batch statistics, no side effects
                out = functional_call(model, {**params, **buffers}, (x[i:i + batch_size],))
                total += float(loss_fn(out, y[i:i + batch_size])) * len(x[i:i + batch_size])
    finally:
        model.train(was)
    return total / len(x)


def cooled_loss(ctx: StepContext, steps: int, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    """The loss on (``x``, ``y``) (as :func:`subset_loss`) after a short cooldown branched off the
    run at ``ctx.step``: a copy of the model and of the optimizer state
    (:func:`~trajscope.train.optim.copy_optimizer`) takes ``steps`` more steps on the run's
    own next batches (the Trainer's ``BatchSampler``, steps ``ctx.step + 1 ..``) with every group's
    rate falling linearly from its current value, lr * (1 - (j - 1) / steps) at the j-th step. The
    run itself (model, buffers, optimizer state, random state) is left exactly as it was; inf if the
    branch diverges."""
    import copy

    from trajscope.train.optim import copy_optimizer
    from trajscope.train.trainer import BatchSampler

    model = copy.deepcopy(ctx.model)
    opt = copy_optimizer(ctx.optimizer, model, ctx.config)
    rates = [g["lr"] for g in ctx.optimizer.param_groups]
    data = ctx.data
    sampler = BatchSampler(len(data.x_train), int(ctx.config.batch_size), int(ctx.config.seed))
    model.train()
    with torch.random.fork_rng(devices=[]):
        for j in range(1, steps + 1):
            for g, lr in zip(opt.param_groups, rates):
                g["lr"] = lr * (1 - (j - 1) / steps)
            idx = sampler.indices(ctx.step + j)
            loss = ctx.loss_fn(model(data.x_train[idx]), data.y_train[idx])
            if not torch.isfinite(loss):
                return math.inf
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return subset_loss(model, ctx.loss_fn, x, y, batch_size)


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
    the last); ``chunks``: windows of the exploration measure; ``validate``: also evaluate the
    validation set at each rung (``val_loss``, ``val_metric``; needed for ``key="val_loss"``)."""

    default_name = "race"
    needs = frozenset({"data", "loss_fn", "optimizer"})

    def __init__(self, name: str | None = None, at: int = 50, rungs: Sequence[int] | None = None,
                 examples: int = 128, chunks: int = 8, stop: bool = True,
                 sharpness_at: Sequence[int] | None = None, avg_examples: int = 512, validate: bool = False,
                 cooldown: int = 0, cooldown_at: Sequence[int] | None = None):
        super().__init__(name)
        rungs = sorted({int(r) for r in (rungs if rungs else (at,))})
        if rungs[0] < 2 or chunks < 2:
            raise UsageError(f"race needs rungs >= 2 and chunks >= 2, got rungs={rungs}, chunks={chunks}")
        self.examples, self.chunks, self.stop, self.avg_examples = examples, chunks, stop, avg_examples
        self.validate = bool(validate)
        if int(cooldown) < 0:
            raise UsageError(f"race cooldown must be >= 0 steps, got {cooldown}")
        self.cooldown = int(cooldown)
        self._sums: dict[int, list] = {}  # rung -> [sum of theta over its last quarter so far, count]
        self.sharpness_at = set(rungs[-1:] if sharpness_at is None else (int(r) for r in sharpness_at))
        self.cooldown_at = set(rungs[-1:] if cooldown_at is None else (int(r) for r in cooldown_at))
        self.state = RaceState(rungs=rungs)
        self.stop_requested = False
        self._clock = (time.perf_counter(), 0.0)  # (when this fit started, seconds trained before it)
        self._marks: dict[int, torch.Tensor] = {}  # step -> theta at the window bounds still needed
        self._bounds = set().union(*(window_bounds(r, chunks) for r in rungs))

    def _theta(self, ctx: StepContext) -> torch.Tensor:
        return parameters_to_vector([p for p in ctx.model.parameters() if p.requires_grad]).detach().clone()

    def buffers(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self._marks:
            steps = sorted(self._marks)
            out.update({"mark_steps": steps, "marks": torch.stack([self._marks[s] for s in steps])})
        if self._sums:
            rungs = sorted(self._sums)
            out.update({"sum_rungs": rungs, "sum_counts": [self._sums[r][1] for r in rungs],
                        "sums": torch.stack([self._sums[r][0] for r in rungs])})
        return out

    def load_buffers(self, buffers: dict[str, Any]) -> None:
        self._marks = {int(s): v.clone() for s, v in zip(buffers.get("mark_steps", []), buffers.get("marks", []))}
        self._sums = {int(r): [v.clone(), int(c)] for r, c, v in
                      zip(buffers.get("sum_rungs", []), buffers.get("sum_counts", []), buffers.get("sums", []))}

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
        theta = None
        if ctx.step in self._bounds:
            theta = self._marks[ctx.step] = self._theta(ctx)
        for r in self.state.rungs:
            if tail_start(r) <= ctx.step <= r:
                theta = self._theta(ctx) if theta is None else theta
                if r in self._sums:
                    self._sums[r][0] += theta
                    self._sums[r][1] += 1
                else:
                    self._sums[r] = [theta.clone(), 1]
        if ctx.step in self.state.rungs:
            ev = self.evidence(ctx)
            self.state.evidence.append(ev)
            self.decide(ctx, f"race evidence at step {ctx.step}" + ("; stopping for the race" if self.stop else ""),
                        f"rung {self.state.rungs.index(ctx.step) + 1} of {len(self.state.rungs)}", ev)
            self.stop_requested = self.stop
            later = set().union(*(window_bounds(r, self.chunks) for r in self.state.rungs if r > ctx.step))
            self._marks = {s: v for s, v in self._marks.items() if s == 0 or s in later} if later else {}
            self._sums.pop(ctx.step, None)

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
        # the ranking losses' examples: the first avg_examples training examples, a multiple of the batch
        n = len(ctx.data.x_train)
        bs = min(int(ctx.config.batch_size), n)
        n_sub = max(bs, min(self.avg_examples, n) // bs * bs)
        x_sub, y_sub = ctx.data.x_train[:n_sub], ctx.data.y_train[:n_sub]
        avg_loss, n_avg = None, 0
        if ctx.step in self._sums:  # the rung's last quarter of iterates, averaged (Polyak-Ruppert)
            total, count = self._sums[ctx.step]
            avg_loss, n_avg = subset_loss(ctx.model, ctx.loss_fn, x_sub, y_sub, bs, total / count), n_sub
        cool_loss, cool_steps = None, 0
        if self.cooldown and ctx.step in self.cooldown_at:
            cool_loss, cool_steps = cooled_loss(ctx, self.cooldown, x_sub, y_sub, bs), self.cooldown
            n_avg += n_sub
        val_loss = val_metric = None
        n_val = 0
        if self.validate:
            was = ctx.model.training
            ctx.model.eval()
            with torch.no_grad():
                logits = ctx.model(ctx.data.x_val)
            ctx.model.train(was)
            val_loss = float(ctx.workload.loss_fn(logits, ctx.data.y_val))
            val_metric = float(ctx.workload.metric_fn(logits, ctx.data.y_val))
            n_val = len(ctx.data.x_val)
        return {"step": ctx.step, "lr": float(ctx.optimizer.param_groups[0]["lr"]),
                "loss": recent_loss(self.state.losses), "first_loss": self.state.losses[0], "avg_loss": avg_loss,
                "loss_slope": loss_slope(self.state.losses), "sharpness": lam, "stability_ratio": ratio,
                "hvps": hvps, "hvp_examples": n_ex, "wall_s": self.state.wall_s,
                "forward_examples": n_avg + n_val,
                "distance": float((theta - theta0).norm() / theta0.norm().clamp_min(1e-12)),
                "update_mds": mean_cosine(disp) if len(disp) >= 2 else None,
                "val_loss": val_loss, "val_metric": val_metric, "cool_loss": cool_loss, "cool_steps": cool_steps}


KEYS = {"avg_loss": "averaged-iterate loss", "loss": "training loss", "val_loss": "validation loss",
        "cool_loss": "loss after a cooldown"}
TIES = {"avg_loss": 0.0, "loss": 0.02, "val_loss": 0.02, "cool_loss": 0.0}  # each key's default tie tolerance (module docstring)


def _num(v) -> float:
    return math.inf if v is None else float(v)


def race_decision(candidates: Sequence[dict[str, Any]], tol: float | None = None, ratio_max: float = 2.0,
                  keep: int = 1, key: str = "avg_loss") -> dict[str, Any]:
    """One rung's decision (see the module docstring). ``candidates``: one dict per rate with ``lr``
    and either ``diverged: True`` or the evidence keys (``loss``, ``first_loss``, ``val_loss``, the
    ranking ``key``, optionally ``stability_ratio``). ``key``: what ranks them, ``"avg_loss"``
    (the averaged iterate's loss), ``"loss"`` (recent training loss) or ``"val_loss"``; those within
    ``tol`` (relative; default ``TIES[key]``) of the best are tied and go first, the largest rate
    first, then the rest by ``key``. Returns ``{"winner": index, "lr", "keep":
    [the first ``keep`` indices, best first], "reason", "verdicts": [str per candidate]}``; every
    candidate diverged: UsageError."""
    if keep < 1 or key not in KEYS:
        raise UsageError(f"a race rung needs keep >= 1 and key one of {', '.join(KEYS)}, got keep={keep}, key={key!r}")
    tol = TIES[key] if tol is None else tol

    def finite(c) -> bool:  # the training loss and the key; the validation loss where measured
        return all(math.isfinite(_num(c.get(k))) for k in {"loss", key}) and \
            (c.get("val_loss") is None or math.isfinite(c["val_loss"]))

    verdicts = []
    alive = []
    for i, c in enumerate(candidates):
        if c.get("diverged") or not finite(c):
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
        alive = [i for i, c in enumerate(candidates) if not c.get("diverged") and finite(c)]
        if not alive:
            raise UsageError("every candidate rate diverged in the race; give smaller rates")
    best = min(candidates[i][key] for i in alive)
    tied = sorted((i for i in alive if candidates[i][key] <= best * (1 + tol)), key=lambda i: -candidates[i]["lr"])
    rest = sorted((i for i in alive if i not in tied), key=lambda i: candidates[i][key])
    ranked = tied + rest
    kept = ranked[:keep]
    name = KEYS[key]
    for pos, i in enumerate(ranked):
        what = "winner" if pos == 0 else ("kept" if i in kept else f"out: ranked {pos + 1}")
        why = "tied with the best, larger rate first" if i in tied else name
        verdicts[i] = f"{what} ({why}; {name} {candidates[i][key]:.4g})"
    reason = (f"{len(alive)} of {len(candidates)} candidates " + ("finite (none passed the guards)" if fallback
              else "finite and making progress") + f"; {len(tied)} within {tol:.0%} of the best {name} "
              f"{best:.4g}, the largest rate of them first; {len(kept)} kept")
    return {"winner": kept[0], "lr": candidates[kept[0]]["lr"], "keep": kept, "reason": reason, "verdicts": verdicts}
