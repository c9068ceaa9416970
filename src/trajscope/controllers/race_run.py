"""Running the early race (the rule and the evidence are in :mod:`trajscope.controllers.race`).

1. the curvature estimate eta_c (:func:`~trajscope.controllers.curvature_lr.curvature_select`);
2. ``candidates`` rates eta_c * factor^j, j centred on 0 (default 6 rates, factor 2: a 32x span);
3. rungs at the fractions ``rungs`` of the budget (default 2.5% and 10%, each at least 5 steps);
   every candidate is the final config at its rate plus a ``race`` controller that stops it at each
   rung. All candidates run to the first rung; :func:`~trajscope.controllers.race.race_decision`
   keeps ``ceil(n * keep)`` of them (default half, ranked by the loss of the averaged iterate of
   the rung's last quarter, ``key="avg_loss"``), which are resumed to the next rung, and so on;
   the last rung keeps one (with ``cooldown`` > 0, opt-in, and the default key: ranked by the loss
   after a cooldown branch of ``cooldown`` x budget steps, at least MIN_RUNG; see
   :mod:`trajscope.controllers.race` for what it was measured to do). Runs go through :func:`trajscope.sweep.run_configs`
   (``executor``/``jobs``/``address``); a candidate already in the store at or past the rung is
   read, not trained again;
4. the winner is resumed from its last checkpoint to the end of the budget; the decision is stored
   in it at the last rung.

Compute (choosing): the curvature estimate's warm-up steps and Hessian-vector products, each
loser's steps up to the rung it lost at (or diverged), the cooldown branches' steps (every
candidate at the last rung, the winner's included), the race's own Hessian-vector products, and
every candidate's forward-only rung evaluations (the averaged iterate on ``AVG_EXAMPLES`` training
examples, a third of a step per batch of examples; the validation set too only with
``key="val_loss"``, the one key it ranks by); the winner's steps are all training. With the
defaults, 3 losers at 2.5% and 2 at 10%: 0.275 budgets, plus the curvature estimate (10-20 steps
and about 20 products on at most 128 examples) and 9 rung evaluations (3 x 8 = 24
step-equivalents at batch 64). Measured on the benchmark's mnist5k-cnn (budget 300, batch 64): 84
loser steps, 10 warm-up steps and 14 products on 64 examples (28), 9 x 512 averaged-iterate
examples (24): 146 step-equivalents; the validation pass at every rung (1,000 examples, 47 more)
was dropped because it ranked nothing. The candidates' own periodic evaluations (``eval_every``)
are not counted, as for every run of every method (the grid's trials included). Why a first rung at 2.5% and not
5%: on a factor-2 grid of full runs (6 workload/optimizer pairs, 10 rates each), races of the 6
rates around the measured curvature centres pick the same rate with a first rung at 2.5% as at 5%
(the best of the grid on all 6 pairs), and the first rung is where the most candidates drop out,
so halving it saves 0.075 budgets. ``sharpness=True`` adds the stability-ratio
guard at the last rung, at about 2 x 15 x examples / batch_size steps per candidate left.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Callable, Sequence

from trajscope.config import CallbackSpec, RunConfig
from trajscope.controllers.lr_common import Compute, ShortLoop
from trajscope.errors import UsageError

RUNGS = (0.025, 0.10)  # fractions of the budget where the race decides
MIN_RUNG = 5          # steps
AVG_EXAMPLES = 512    # training examples for the averaged-iterate loss at a rung
COOLDOWN = 0.0        # the last rung's cooldown branch, a fraction of the budget (0: none; opt in, e.g. 0.025)


def candidate_rates(center: float, n: int = 6, factor: float = 2.0) -> list[float]:
    """``n`` rates center * factor^(j - (n-1)/2), j = 0..n-1, ascending."""
    if n < 1 or factor <= 1:
        raise UsageError(f"the race needs candidates >= 1 and factor > 1, got {n}, {factor}")
    return [center * factor ** (j - (n - 1) / 2) for j in range(n)]


def race_steps(budget: int, fraction: float) -> int:
    """The step of a rung at ``fraction`` of the budget (at least MIN_RUNG, at most the budget)."""
    if not 0 < fraction < 1:
        raise UsageError(f"race fractions must be in (0, 1), got {fraction}")
    return min(max(MIN_RUNG, round(fraction * budget)), budget)


def rung_steps(budget: int, fractions: Sequence[float]) -> list[int]:
    """The distinct rung steps of ``fractions`` (ascending)."""
    if not fractions:
        raise UsageError("the race needs at least one rung")
    return sorted({race_steps(budget, f) for f in fractions})


def cooldown_steps(budget: int, fraction: float) -> int:
    """Steps of the last rung's cooldown branch at ``fraction`` of the budget (0: none; else at least
    MIN_RUNG)."""
    if not 0 <= fraction < 1:
        raise UsageError(f"the race's cooldown must be a fraction in [0, 1), got {fraction}")
    return 0 if fraction == 0 else max(MIN_RUNG, round(fraction * budget))


def race_config(cfg: RunConfig, lr: float, rungs: Sequence[int], examples: int, sharpness: bool = False,
                avg_examples: int = AVG_EXAMPLES, validate: bool = False, cooldown: int = 0) -> RunConfig:
    """``cfg`` at rate ``lr`` with a race controller stopping at each of ``rungs`` (``sharpness``: the
    stability ratio on ``examples`` training examples at the last rung; ``avg_examples``: training
    examples for the averaged-iterate loss; ``validate``: the validation pass at each rung, only
    where it ranks, ``key="val_loss"``). ``avg_examples`` is always in the controller's options,
    so a candidate's run id differs from those of races stored before that loss was recorded, and
    so is ``validate`` (a race stored with the validation pass has other ids)."""
    opts = {"at": rungs[-1]} if len(rungs) == 1 else {"rungs": list(rungs)}
    opts.update({"examples": examples} if sharpness else {"sharpness_at": []})
    opts["avg_examples"] = int(avg_examples)
    opts["validate"] = bool(validate)
    if cooldown:  # only where used, so that the ids of races stored without one stay the same
        opts["cooldown"] = int(cooldown)
    spec = CallbackSpec(kind="race", options=opts)
    return cfg.model_copy(update={"lr": float(lr), "controllers": cfg.controllers + (spec,)})


def _read(path) -> dict[str, Any]:
    """A candidate run's status, steps and race evidence per rung step from the store."""
    from trajscope.controllers.base import KIND
    from trajscope.store import Run

    run = Run.open(path)
    try:
        out = {"status": run.status, "steps": run.last_step() or 0, "path": str(run.path), "run_id": run.id,
               "wall_s": float(run.meta.get("wall_s") or 0.0), "evidence": {}}
        ev = run.events()
        for data in ev[ev["kind"] == KIND]["data"]:
            d = json.loads(data) if data else {}
            if d.get("controller") == "race" and "step" in d.get("evidence", {}):
                out["evidence"][int(d["evidence"]["step"])] = d["evidence"]
        return out
    finally:
        run.close()


def _advance(configs: list[RunConfig], rung: int, root, executor, jobs, address, progress) -> list[dict[str, Any]]:
    """Bring every run of ``configs`` to step ``rung`` (new, or resumed from a lower rung's
    checkpoint); a run already there, finished or diverged is read. Returns each run's state."""
    from trajscope.store.paths import is_run_dir
    from trajscope.sweep import run_configs
    from trajscope.train.trainer import run_path

    paths = [run_path(c, root) for c in configs]
    state = [_read(p) if is_run_dir(p) else None for p in paths]
    todo = [i for i, s in enumerate(state) if s is None or (s["status"] == "stopped" and s["steps"] < rung)
            or s["status"] not in ("stopped", "finished", "diverged")]
    walls = {i: (state[i] or {}).get("wall_s", 0.0) for i in todo}
    # train_one resumes a stopped (or killed) run from its last checkpoint and starts a new one
    results = run_configs([configs[i] for i in todo], root=root, executor=executor, jobs=jobs, address=address,
                          progress=progress)
    errors = {i: r.get("error") for i, r in zip(todo, results) if r.get("status") == "failed"}
    out = []
    for i, p in enumerate(paths):
        if i in errors:
            out.append({"status": "failed", "error": errors[i]})
            continue
        s = _read(p)
        # a resumed run's wall time restarts at the resume: add what it spent before
        s["wall_s"] += walls.get(i, 0.0)
        s["cached"] = i not in todo
        out.append(s)
    return out


def _trained_s(r: dict[str, Any], rung: int) -> float:
    """Seconds candidate ``r`` trained up to ``rung``: the race controller's count at that rung
    (summed over resumes and read from the store, so a race read back reports the seconds its runs
    took when they were trained), else the run's own wall time (a run that diverged before it)."""
    ev = r.get("evidence", {}).get(rung) or {}
    return float(ev["wall_s"]) if ev.get("wall_s") is not None else float(r.get("wall_s") or 0.0)


def _rung_evidence(lr: float, r: dict[str, Any], rung: int, key: str = "loss") -> dict[str, Any]:
    if r["status"] == "failed":
        raise UsageError(f"race candidate at lr {lr:.4g} did not run: {r.get('error')}")
    if r["status"] == "diverged" and rung not in r["evidence"]:
        return {"lr": lr, "diverged": True, "steps": r["steps"]}
    if rung not in r["evidence"]:
        raise UsageError(f"race candidate at lr {lr:.4g} has no evidence at step {rung} ({r['status']})")
    ev = r["evidence"][rung]
    if key not in ev:
        raise UsageError(f"race candidate at lr {lr:.4g} (run {r.get('run_id')}) has no {key!r} in its evidence at "
                         f"step {rung}: it was stored by an older trajscope; use a fresh root")
    return {**ev, "lr": lr, "steps": rung}


def early_race(cfg: RunConfig, make_loop: Callable[[], ShortLoop], *, root=None, executor: str = "local",
               jobs: int = 1, address: str | None = None, train: bool = True, progress: bool = True,
               warmup: int | None = None, examples: int | None = None, c: float | None = None, candidates: int = 6,
               factor: float = 2.0, rungs: Sequence[float] = RUNGS, keep: float = 0.5,
               sharpness: bool = False, race_fraction: float | None = None, key: str = "avg_loss",
               tol: float | None = None, cooldown: float = COOLDOWN):
    """The race (see the module docstring); returns an :class:`~trajscope.controllers.lr_select.LRSelection`.
    ``race_fraction``: a one-rung race at that fraction (instead of ``rungs``); ``key``: what ranks
    the candidates at a rung (:data:`~trajscope.controllers.race.KEYS`); ``tol``: the tie tolerance
    (default: :data:`~trajscope.controllers.race.TIES` of ``key``)."""
    from trajscope.controllers.curvature_lr import MAX_EXAMPLES
    from trajscope.controllers.lr_select import LRSelection, _curvature, store
    from trajscope.controllers.race import race_decision
    from trajscope.train import Trainer

    if not 0 < keep < 1:
        raise UsageError(f"keep must be in (0, 1), got {keep}")
    n_cool = cooldown_steps(cfg.steps, cooldown) if key == "avg_loss" else 0  # another key ranks by itself
    t0 = time.perf_counter()
    curv = _curvature(cfg, make_loop(), warmup=warmup, examples=examples, c=c)
    rates = candidate_rates(curv.lr, candidates, factor)
    steps = rung_steps(cfg.steps, (race_fraction,) if race_fraction is not None else tuple(rungs))
    n_ex = examples or min(cfg.batch_size, MAX_EXAMPLES)
    configs = [race_config(cfg, lr, steps, n_ex, sharpness, validate=key == "val_loss", cooldown=n_cool)
               for lr in rates]
    t_race = time.perf_counter()
    alive = list(range(len(rates)))
    runs: dict[int, dict[str, Any]] = {}
    out_at: dict[int, int] = {}  # loser -> the steps it ran
    decisions = []
    for k, rung in enumerate(steps):
        for i, r in zip(alive, _advance([configs[i] for i in alive], rung, root, executor, jobs, address, progress)):
            runs[i] = r
        last = k == len(steps) - 1
        rung_key = "cool_loss" if last and n_cool else key  # the cooldown branch ranks the last rung
        evidence = [_rung_evidence(rates[i], runs[i], rung, rung_key) for i in alive]
        n_keep = 1 if last else max(1, math.ceil(len(alive) * keep))
        d = race_decision(evidence, tol=tol if rung_key == key else None, keep=n_keep, key=rung_key)
        kept = [alive[j] for j in d["keep"]]
        for j, i in enumerate(alive):
            if i not in kept:
                out_at[i] = min(runs[i]["steps"], rung)
        decisions.append({"step": rung, "key": rung_key, "candidates": evidence, "verdicts": d["verdicts"],
                          "reason": d["reason"], "kept": kept})
        alive = kept
    w = alive[0]
    batch = curv.choose.batch_size
    race_hvps = sum(e.get("hvps") or 0 for d in decisions for e in d["candidates"])
    forwards = sum(e.get("forward_examples") or 0 for d in decisions for e in d["candidates"])
    cool = sum(e.get("cool_steps") or 0 for d in decisions for e in d["candidates"])  # the winner's too
    choose = curv.choose.add(Compute(batch, steps=sum(out_at.values()) + cool, hvps=race_hvps,
                                     hvp_examples=n_ex if race_hvps else 0, forward_examples=forwards))
    # wall time: the curvature estimate and the losers' race runs (each run's own seconds, so the
    # figure does not depend on how many ran in parallel); the winner's race seconds are training
    choose.wall_s = (t_race - t0) + sum(_trained_s(runs[i], out_at[i]) for i in out_at)
    last = decisions[-1]
    reason = " | ".join(f"step {d['step']}: {d['reason']}" for d in decisions)
    sel = LRSelection("early-race", rates[w], cfg.optimizer, cfg.workload, cfg.steps, choose,
                      {"curvature": dict(curv.evidence), "rates": rates, "rungs": steps, "race_steps": steps[-1],
                       "rung_decisions": decisions, "candidates": last["candidates"], "verdicts": last["verdicts"],
                       "winner": w, "losers_steps": {str(i): s for i, s in out_at.items()},
                       "losers_wall_s": {str(i): _trained_s(runs[i], s) for i, s in out_at.items()}},
                      reason=reason, extra={"race_runs": [runs[i].get("run_id") for i in range(len(rates))]})
    if not train:
        return sel
    final = runs[w]
    # seconds up to the last rung (the race controller's count, also when read back from the store)
    # plus those of the segment after it (the final run's own wall time, which restarts at a resume)
    wall_before = _trained_s(final, steps[-1])
    for _ in steps:  # resumed through any rung left (at most every rung), to the end of the budget
        if final["status"] != "stopped":
            break
        final = Trainer(configs[w], root=root, resume=True, progress=progress).fit()
    if "final" not in final:  # finished or diverged before this call: its summary from the store
        final = Trainer(configs[w], root=root, progress=progress).fit()
    sel.run = final
    sel.train_steps = int(final.get("steps") or 0)
    after = float(final.get("wall_s") or 0.0) if sel.train_steps > steps[-1] else 0.0
    sel.train_wall_s = wall_before + after
    store(sel, step=steps[-1])
    return sel
