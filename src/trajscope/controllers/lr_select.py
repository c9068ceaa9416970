"""``select_lr``: the learning rate from the early phase instead of a grid search.

Methods (``METHODS``): ``range-test`` (:mod:`~trajscope.controllers.range_test`, the baseline),
``curvature`` (:mod:`~trajscope.controllers.curvature_lr`: eta = c T / lambda after a warm-up) and
``early-race`` (:mod:`~trajscope.controllers.race`, :mod:`~trajscope.controllers.race_run`: 6 rates
a factor 2 apart around the curvature estimate share the budget by successive halving: all run to
2.5% of the budget, the better half by the loss of the averaged iterate of the rung's last quarter
to 10%, the best of those continues to the end without a restart; choosing costs 0.275 budgets
plus the curvature estimate and the rung evaluations).

Compute accounting (:class:`~trajscope.controllers.lr_common.Compute`): ``choose`` is everything
spent on the choice that the final run does not reuse (range-test steps; warm-up steps; the losers'
race steps; every Hessian-vector product; the race's forward-only rung evaluations),
``train_steps`` the final run's steps (for the race the winner's whole budget, its race steps
included). ``total_step_equivalents = choose.step_equivalents
+ train_steps``. The decision goes into the final run: an event of kind ``controller`` (data
``{"controller", "reason", "evidence"}``, drawn on the report's timeline) and the result
``lr_selection`` (:meth:`LRSelection.to_dict`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from trajscope.config import RecordConfig, RunConfig
from trajscope.controllers.lr_common import Compute, ShortLoop
from trajscope.errors import UsageError, unknown_choice

METHODS = ("range-test", "curvature", "early-race")
RESULT = "lr_selection"  # the result name in the final run


@dataclass
class LRSelection:
    """The choice: ``lr``; ``choose`` what choosing cost; ``evidence`` what it rested on; ``run``
    the final run's summary (None without training); ``train_steps`` and ``train_wall_s`` the final
    run's steps and seconds."""

    method: str
    lr: float
    optimizer: str
    workload: str | None
    budget: int
    choose: Compute
    evidence: dict[str, Any]
    run: dict[str, Any] | None = None
    train_steps: int = 0
    train_wall_s: float = 0.0
    reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total_step_equivalents(self) -> float:
        return self.choose.step_equivalents + self.train_steps

    @property
    def total_wall_s(self) -> float:
        return self.choose.wall_s + self.train_wall_s

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "lr": self.lr, "optimizer": self.optimizer, "workload": self.workload,
                "budget": self.budget, "choose": self.choose.to_dict(), "evidence": self.evidence,
                "reason": self.reason, "run": self.run, "train_steps": self.train_steps,
                "train_wall_s": self.train_wall_s, "total_step_equivalents": self.total_step_equivalents,
                "total_wall_s": self.total_wall_s, **self.extra}


def base_config(target, optimizer: str | None, steps: int | None, seed: int, record: str | RecordConfig,
                momentum: float | None, batch_size: int | None) -> RunConfig:
    """The config every candidate and the final run share (its ``lr`` is replaced)."""
    rec = record if isinstance(record, RecordConfig) else RecordConfig.preset(record)
    if isinstance(target, RunConfig):
        updates = {k: v for k, v in {"optimizer": optimizer, "steps": steps, "momentum": momentum,
                                     "batch_size": batch_size}.items() if v is not None}
        return RunConfig(**{**target.model_dump(), **updates})
    if isinstance(target, str):
        return RunConfig.for_workload(target, optimizer=optimizer, steps=steps, seed=seed, momentum=momentum,
                                      batch_size=batch_size, record=rec)
    from trajscope.config import validated

    return validated(RunConfig, {"workload": "(model)", "optimizer": optimizer or "sgd", "steps": steps or 1000,
                                 "seed": seed, "momentum": momentum or 0.0, "batch_size": batch_size or 128,
                                 "record": rec})


def select_lr(target, method: str = "early-race", *, optimizer: str | None = None, steps: int | None = None,
              seed: int = 0, root=None, executor: str = "local", jobs: int = 1, address: str | None = None,
              train: bool = True, record: str | RecordConfig = "default", momentum: float | None = None,
              batch_size: int | None = None, loss_fn=None, data=None, progress: bool = True,
              **options: Any) -> LRSelection:
    """Choose the learning rate of ``target`` and (``train``) train the final run at it.

    ``target``: a workload name, a :class:`RunConfig` (its ``lr`` is ignored), or an ``nn.Module``
    with ``loss_fn(logits, y)`` and ``data=(x, y)`` training tensors (range-test and curvature only;
    nothing is trained or stored, and the module itself is not changed). ``steps``: the budget of the
    final run. ``executor``, ``jobs``, ``address``: how the race's candidates run
    (:func:`trajscope.sweep.run_configs`). ``options``: per method, ``range_steps``, ``lr_min``,
    ``lr_max`` (range-test); ``warmup``, ``examples`` (default: one batch, at most 128), ``c``
    (curvature and early-race); ``candidates``, ``factor``, ``rungs`` (fractions of the budget),
    ``keep`` (fraction kept per rung), ``race_fraction`` (one rung there instead), ``key`` (what
    ranks the candidates: ``avg_loss``, ``loss``, ``val_loss``), ``tol`` (tie tolerance), ``cooldown``
    (opt-in: the last rung ranked after a cooldown branch of this fraction of the budget, e.g.
    0.025; default 0: ranked by ``key``)
    (early-race).
    """
    if method not in METHODS:
        raise unknown_choice("method", method, METHODS)
    is_model = isinstance(target, nn.Module)
    if is_model and (loss_fn is None or data is None):
        raise UsageError("select_lr on a model needs loss_fn and data=(x, y)")
    if is_model and method == "early-race":
        raise UsageError("early-race trains runs of a workload; give a workload name or a RunConfig")
    if not isinstance(target, (str, RunConfig, nn.Module)):
        raise UsageError(f"select_lr takes a workload name, a RunConfig or an nn.Module, not {type(target).__name__}")
    cfg = base_config(target, optimizer, steps, seed, record, momentum, batch_size)
    allowed = {"range-test": {"range_steps", "lr_min", "lr_max"}, "curvature": {"warmup", "examples", "c"},
               "early-race": {"warmup", "examples", "c", "candidates", "factor", "rungs", "keep", "race_fraction",
                              "tol", "sharpness", "key", "cooldown"}}[method]
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise unknown_choice(f"option of method {method!r}", unknown[0], allowed)

    def loop() -> ShortLoop:
        if is_model:
            return ShortLoop.for_model(target, loss_fn, data[0], data[1], cfg)
        return ShortLoop.for_config(cfg)

    if method == "early-race":
        from trajscope.controllers.race_run import early_race

        return early_race(cfg, loop, root=root, executor=executor, jobs=jobs, address=address, train=train,
                          progress=progress, **options)
    if method == "range-test":
        sel = _range_test(cfg, loop(), **options)
    else:
        sel = _curvature(cfg, loop(), **options)
    if train and not is_model:
        finish(sel, cfg, root, progress)
    return sel


def _range_test(cfg: RunConfig, loop: ShortLoop, range_steps: int | None = None, lr_min: float | None = None,
                lr_max: float | None = None) -> LRSelection:
    from trajscope.controllers.range_test import DEFAULT_BOUNDS, range_test

    lo, hi = DEFAULT_BOUNDS.get(cfg.optimizer, (1e-6, 1.0))
    n = range_steps or min(200, max(50, cfg.steps // 20))
    t0 = time.perf_counter()
    res = range_test(loop.step, lr_min or lo, lr_max or hi, n)
    choose = Compute(loop.compute.batch_size, steps=res.steps, wall_s=time.perf_counter() - t0)
    reason = (f"steepest descent of the smoothed loss at lr {res.lr:.4g} (step {res.steepest_at + 1} of "
              f"{res.steps}" + (f", diverged at step {res.diverged_at + 1})" if res.diverged_at is not None else ")"))
    return LRSelection("range-test", res.lr, cfg.optimizer, cfg.workload, cfg.steps, choose, res.to_dict(),
                       reason=reason)


def _curvature(cfg: RunConfig, loop: ShortLoop, warmup: int | None = None, examples: int | None = None,
               c: float | None = None) -> LRSelection:
    from trajscope.controllers.curvature_lr import C_RATE, MAX_EXAMPLES, curvature_select

    t0 = time.perf_counter()
    res = curvature_select(loop, warmup or default_warmup(cfg.steps),
                           examples=examples or min(cfg.batch_size, MAX_EXAMPLES), c=c or C_RATE)
    comp = res.pop("compute")
    comp.wall_s = time.perf_counter() - t0
    reason = (f"lambda {res['lambda']:.4g} after {res['warmup_steps']} warm-up steps; threshold "
              f"{res['threshold_unit']:.3g}/lambda = {res['threshold_unit'] / res['lambda']:.4g}; "
              f"lr = {res['c']:.3g} of it = {res['lr']:.4g}")
    return LRSelection("curvature", res["lr"], cfg.optimizer, cfg.workload, cfg.steps, comp, res, reason=reason)


def default_warmup(budget: int) -> int:
    """2% of the budget, at least 10 and at most 100 steps."""
    return min(100, max(10, round(0.02 * budget)))


def finish(sel: LRSelection, cfg: RunConfig, root, progress: bool) -> None:
    """Train the final run at ``sel.lr`` and store the decision in it."""
    from trajscope.train import Trainer

    final = Trainer(cfg.model_copy(update={"lr": sel.lr}), root=root, progress=progress).fit()
    sel.run, sel.train_steps = final, int(final.get("steps") or 0)
    sel.train_wall_s = float(final.get("wall_s") or 0.0)
    store(sel, step=0)


def store(sel: LRSelection, step: int) -> None:
    """Write the decision (an event of kind ``controller``) and the result into the final run."""
    from trajscope.controllers.base import KIND
    from trajscope.store import Run

    if sel.run is None:
        return
    run = Run.open(sel.run["path"], write=True)
    try:
        evidence = {k: v for k, v in sel.evidence.items() if not isinstance(v, list) or len(v) <= 16}
        run.log_event(step, KIND, f"{sel.method}: lr {sel.lr:.4g}",
                      {"controller": sel.method, "reason": sel.reason, "evidence": evidence,
                       "state": {"lr": sel.lr, "choose": sel.choose.to_dict()}})
        run.save_result(RESULT, sel.to_dict())
    finally:
        run.close()
