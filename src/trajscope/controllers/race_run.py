"""Running the early race (the rule and the evidence are in :mod:`trajscope.controllers.race`).

1. the curvature estimate eta_c (:func:`~trajscope.controllers.curvature_lr.curvature_select`);
2. ``candidates`` rates eta_c * factor^j, j centred on 0 (default 5 rates, factor 2);
3. each candidate is the final config at its rate plus a ``race`` controller stopping at step
   k = ``race_fraction`` of the budget (at least 10 steps), trained by
   :func:`trajscope.sweep.run_configs` (``executor``/``jobs``/``address``); a candidate run already
   in the store (stopped, finished or diverged) is read, not trained again;
4. :func:`~trajscope.controllers.race.race_decision` picks the winner, which is resumed from its
   step-k checkpoint to the end of the budget; the decision is stored in it at step k.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

from trajscope.config import CallbackSpec, RunConfig
from trajscope.controllers.lr_common import Compute, ShortLoop
from trajscope.errors import UsageError


def candidate_rates(center: float, n: int = 5, factor: float = 2.0) -> list[float]:
    """``n`` rates center * factor^(j - (n-1)/2), j = 0..n-1, ascending."""
    if n < 1 or factor <= 1:
        raise UsageError(f"the race needs candidates >= 1 and factor > 1, got {n}, {factor}")
    return [center * factor ** (j - (n - 1) / 2) for j in range(n)]


def race_steps(budget: int, fraction: float) -> int:
    if not 0 < fraction < 1:
        raise UsageError(f"race_fraction must be in (0, 1), got {fraction}")
    return min(max(10, round(fraction * budget)), budget)


def race_config(cfg: RunConfig, lr: float, at: int, examples: int) -> RunConfig:
    """``cfg`` at rate ``lr`` with a race controller stopping at step ``at`` (sharpness on
    ``examples`` training examples)."""
    spec = CallbackSpec(kind="race", options={"at": at, "examples": examples})
    return cfg.model_copy(update={"lr": float(lr), "controllers": cfg.controllers + (spec,)})


def _read(path) -> dict[str, Any]:
    """A candidate run's status, steps and race evidence from the store."""
    from trajscope.controllers.base import KIND
    from trajscope.store import Run

    run = Run.open(path)
    try:
        out = {"status": run.status, "steps": run.last_step() or 0, "path": str(run.path), "run_id": run.id,
               "wall_s": float(run.meta.get("wall_s") or 0.0)}
        ev = run.events()
        for data in ev[ev["kind"] == KIND]["data"]:
            d = json.loads(data) if data else {}
            if d.get("controller") == "race":
                out["evidence"] = d.get("evidence", {})
        return out
    finally:
        run.close()


def _train_candidates(configs: list[RunConfig], root, executor, jobs, address, progress) -> list[dict[str, Any]]:
    from trajscope.store.paths import is_run_dir
    from trajscope.sweep import run_configs
    from trajscope.train.trainer import run_path

    paths = [run_path(c, root) for c in configs]
    todo = [i for i, p in enumerate(paths)
            if not (is_run_dir(p) and _read(p)["status"] in ("stopped", "finished", "diverged"))]
    results = run_configs([configs[i] for i in todo], root=root, executor=executor, jobs=jobs, address=address,
                          progress=progress)
    errors = {i: r.get("error") for i, r in zip(todo, results) if r.get("status") == "failed"}
    out = []
    for i, p in enumerate(paths):
        out.append({"status": "failed", "error": errors[i]} if i in errors else {**_read(p), "cached": i not in todo})
    return out


def early_race(cfg: RunConfig, make_loop: Callable[[], ShortLoop], *, root=None, executor: str = "local",
               jobs: int = 1, address: str | None = None, train: bool = True, progress: bool = True,
               warmup: int | None = None, examples: int | None = None, c: float | None = None, candidates: int = 5,
               factor: float = 2.0, race_fraction: float = 0.05, tol: float = 0.05):
    """The race (see the module docstring); returns an :class:`~trajscope.controllers.lr_select.LRSelection`."""
    from trajscope.controllers.lr_select import LRSelection, _curvature, store
    from trajscope.controllers.race import race_decision
    from trajscope.train import Trainer

    t0 = time.perf_counter()
    curv = _curvature(cfg, make_loop(), warmup=warmup, examples=examples, c=c)
    rates = candidate_rates(curv.lr, candidates, factor)
    at = race_steps(cfg.steps, race_fraction)
    configs = [race_config(cfg, lr, at, examples or cfg.batch_size) for lr in rates]
    t_race = time.perf_counter()
    runs = _train_candidates(configs, root, executor, jobs, address, progress)
    evidence = []
    for lr, r in zip(rates, runs):
        if r["status"] == "diverged":
            evidence.append({"lr": lr, "diverged": True, "steps": r["steps"]})
        elif r["status"] == "failed" or "evidence" not in r:
            raise UsageError(f"race candidate at lr {lr:.4g} did not run: {r.get('error') or r['status']}")
        else:
            evidence.append({**r["evidence"], "lr": lr, "steps": at})
    decision = race_decision(evidence, tol=tol)
    w = decision["winner"]
    batch = curv.choose.batch_size
    hvp_examples = curv.choose.hvp_examples
    race_hvps = sum(e.get("hvps", 0) for e in evidence)
    loser_steps = sum(min(r.get("steps", at), at) for i, r in enumerate(runs) if i != w)
    choose = curv.choose.add(Compute(batch, steps=loser_steps, hvps=race_hvps,
                                     hvp_examples=hvp_examples if race_hvps else 0))
    # wall time: the curvature estimate and the losers' race runs (each run's own seconds, so the
    # figure does not depend on how many ran in parallel); the winner's race seconds are training
    choose.wall_s = (t_race - t0) + sum(r.get("wall_s", 0.0) for i, r in enumerate(runs) if i != w)
    sel = LRSelection("early-race", rates[w], cfg.optimizer, cfg.workload, cfg.steps, choose,
                      {"curvature": {k: v for k, v in curv.evidence.items()}, "rates": rates, "race_steps": at,
                       "candidates": evidence, "verdicts": decision["verdicts"], "winner": w},
                      reason=decision["reason"],
                      extra={"race_runs": [r.get("run_id") for r in runs]})
    if not train:
        return sel
    winner_cfg = configs[w]
    if runs[w]["status"] == "stopped":
        final = Trainer(winner_cfg, root=root, resume=True, progress=progress).fit()
    else:
        final = Trainer(winner_cfg, root=root, progress=progress).fit()  # finished: read from the store
    sel.run = final
    sel.train_steps = int(final.get("steps") or 0)
    sel.train_wall_s = float(final.get("wall_s") or 0.0) + (runs[w].get("wall_s", 0.0) if runs[w]["status"] == "stopped" else 0.0)
    store(sel, step=at)
    return sel
