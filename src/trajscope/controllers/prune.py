"""``imp``: one round of iterative magnitude pruning with rewinding, as a controller that a run's
config names (so a round is cached by its config hash like any run).

A round is a run whose config holds ``CallbackSpec(kind="imp", options={...})``:

- ``rewind_run`` / ``rewind_step``: at FIT_START the model takes the weights of run ``rewind_run``
  (an id in the same store root) at its ``params`` snapshot of ``rewind_step`` (and its ``buffers``
  snapshot of that step where recorded: BatchNorm running statistics), or, with ``rewind_step``
  None, its last checkpoint (e.g. a pre-trained network). Tensors whose names start with a prefix
  in ``keep_init`` keep this run's own init (e.g. ``["head."]`` when the rewind source was trained
  on another task). None: the run starts from its own init.
- ``perturb``: applied to the rewound weights, every prunable tensor, before masking: ``none``,
  ``sign-reinit`` (magnitudes of a fresh init drawn with ``perturb_seed``, the rewound signs),
  ``permute`` (a random permutation within each tensor) or ``noise`` (Gaussian noise of std
  ``noise_scale`` times the tensor's std at this run's init). Seeded by ``perturb_seed``, so every
  round of a chain rewinds to the same perturbed network.
- ``mask_run``: the previous round. Its final weights (last checkpoint) and its mask (its ``mask``
  snapshot of step 0; all ones for a dense run) give this run's mask: the smallest
  ``prune_fraction`` of the surviving weights by magnitude, globally over the prunable tensors
  (:mod:`trajscope.functional.prune`). None: dense (no mask).
- Learning-rate schedule and rewinding: a run rewound to step k trains ``steps`` = T - k more
  steps, and with ``schedule_offset`` = k and ``schedule_steps`` = T its t-th update uses the rate
  the original run used at update k + t (``lr * schedule_factor(config with steps=T, k + t)``), so
  the schedule is rewound with the weights. The momentum buffer starts empty (it is not rewound).

Masks are enforced exactly: the weights are multiplied by the mask at FIT_START, the gradients at
AFTER_BACKWARD (so momentum never accumulates on a pruned weight) and the weights again at
AFTER_OPTIMIZER_STEP (weight decay or a stale buffer cannot revive one). The mask is stored in the
run as the ``mask`` snapshot of step 0 (float32 0/1). The recorder writes step 0 before FIT_START,
so this controller replaces the step-0 ``params`` snapshot (where there is one) and the step-0
``param_norm`` scalar with the rewound, masked state; a step-0 sketch, if recorded, is of the
run's own init. On resume (FIT_START at a step > 0) only the mask is read back from the run.
"""

from __future__ import annotations

import dataclasses
import torch

from trajscope.controllers.base import Controller, register
from trajscope.errors import UsageError
from trajscope.events import StepContext
from trajscope.functional import prune as P

PERTURBATIONS = ("none", "sign-reinit", "permute", "noise")


@dataclasses.dataclass
class IMPState:
    """The round's decision: its sparsity over the prunable tensors and their count of weights."""

    sparsity: float = 0.0
    prunable: int = 0
    alive: int = 0


def _open_run(ctx: StepContext, run_id: str, what: str):
    from trajscope.store import Run
    from trajscope.store.paths import is_run_dir, run_dir

    path = run_dir(ctx.run.path.parent, run_id)
    if not is_run_dir(path):
        raise UsageError(f"imp: the {what} run {run_id!r} is not in {ctx.run.path.parent}; train it first")
    run = Run.open(path)
    if run.status != "finished":
        status = run.status
        run.close()
        raise UsageError(f"imp: the {what} run {run_id!r} is {status}, not finished")
    return run


def _final_state(run) -> dict[str, torch.Tensor]:
    steps = run.snapshot_steps("checkpoint")
    if not steps:
        raise UsageError(f"imp: run {run.id} has no checkpoint; give it checkpoint_every > 0")
    return dict(run.load_state(steps[-1], "checkpoint")["model"])


@register
class IMPController(Controller):
    """One round of IMP with rewinding (module docstring)."""

    default_name = "imp"
    needs = frozenset({"optimizer"})

    def __init__(self, name: str | None = None, *, rewind_run: str | None = None, rewind_step: int | None = None,
                 mask_run: str | None = None, prune_fraction: float = 0.2, perturb: str = "none",
                 noise_scale: float = 1.0, perturb_seed: int = 0, keep_init: list[str] | tuple[str, ...] = (),
                 schedule_offset: int = 0, schedule_steps: int | None = None):
        super().__init__(name)
        if perturb not in PERTURBATIONS:
            raise UsageError(f"imp: unknown perturb {perturb!r}; valid choices: {', '.join(PERTURBATIONS)}")
        if not 0.0 <= prune_fraction < 1.0:
            raise UsageError(f"imp: prune_fraction must be in [0, 1), got {prune_fraction}")
        self.rewind_run, self.rewind_step, self.mask_run = rewind_run, rewind_step, mask_run
        self.prune_fraction, self.perturb, self.noise_scale = prune_fraction, perturb, noise_scale
        self.perturb_seed, self.keep_init = perturb_seed, tuple(keep_init)
        self.schedule_offset, self.schedule_steps = int(schedule_offset), schedule_steps
        self.masks: dict[str, torch.Tensor] = {}
        self.state = IMPState()

    # ---------------------------------------------------------------- events
    def on_fit_start(self, ctx: StepContext) -> None:
        self.check(ctx)
        params = dict(ctx.model.named_parameters())
        names = P.prunable_names(params.items())
        if ctx.step > 0:  # resumed: the weights come from the checkpoint, the mask from this run
            if 0 in ctx.run.snapshot_steps("mask"):
                self.masks = {n: t.bool() for n, t in ctx.run.load_snapshot(0, "mask").items()}
            return
        init = {n: p.detach().clone() for n, p in params.items()}
        with torch.no_grad():
            if self.rewind_run is not None:
                self._rewind(ctx, names, init)
            self.masks = self._mask(ctx, names)
            self._apply(ctx.model)
        self._record_start(ctx)

    def on_after_backward(self, ctx: StepContext) -> None:
        params = dict(ctx.model.named_parameters())
        for n, m in self.masks.items():
            if params[n].grad is not None:
                params[n].grad.mul_(m)

    def on_before_optimizer_step(self, ctx: StepContext) -> None:
        if self.schedule_offset == 0 and self.schedule_steps is None:
            return
        from trajscope.train.optim import schedule_factor

        total = self.schedule_steps if self.schedule_steps is not None else ctx.config.steps + self.schedule_offset
        full = ctx.config.model_copy(update={"steps": int(total)})
        for group in ctx.optimizer.param_groups:
            group["lr"] = ctx.config.lr * schedule_factor(full, ctx.step + self.schedule_offset)

    def on_after_optimizer_step(self, ctx: StepContext) -> None:
        with torch.no_grad():
            self._apply(ctx.model)

    # ---------------------------------------------------------------- parts
    def _apply(self, model) -> None:
        params = dict(model.named_parameters())
        for n, m in self.masks.items():
            params[n].mul_(m)

    def _rewind(self, ctx: StepContext, names: list[str], init: dict[str, torch.Tensor]) -> None:
        run = _open_run(ctx, self.rewind_run, "rewind")
        try:
            if self.rewind_step is None:
                state = _final_state(run)
            else:
                if self.rewind_step not in run.snapshot_steps("params"):
                    raise UsageError(f"imp: run {run.id} has no params snapshot at step {self.rewind_step}; "
                                     f"it has {run.snapshot_steps('params')}")
                state = dict(run.load_snapshot(self.rewind_step, "params"))
                if self.rewind_step in run.snapshot_steps("buffers"):
                    state.update(run.load_snapshot(self.rewind_step, "buffers"))
        finally:
            run.close()
        state = {k: v for k, v in state.items() if not k.startswith(self.keep_init or ("\0",))}
        ctx.model.load_state_dict(state, strict=False)
        if self.perturb != "none":
            self._perturb(ctx, names, init)

    def _perturb(self, ctx: StepContext, names: list[str], init: dict[str, torch.Tensor]) -> None:
        params = dict(ctx.model.named_parameters())
        g = torch.Generator().manual_seed(10_007 + self.perturb_seed)
        fresh = None
        if self.perturb == "sign-reinit":
            # a new draw from the init distribution, without touching the global generator
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(10_007 + self.perturb_seed)
                fresh = dict(ctx.workload.make_model(ctx.config.workload_options).named_parameters())
        for n in names:
            w = params[n].detach()
            if self.perturb == "sign-reinit":
                new = P.sign_reinit(w, fresh[n].detach())
            elif self.perturb == "permute":
                new = P.permute_within(w, g)
            else:
                new = P.add_scaled_noise(w, float(init[n].std()), self.noise_scale, g)
            params[n].copy_(new)

    def _mask(self, ctx: StepContext, names: list[str]) -> dict[str, torch.Tensor]:
        if self.mask_run is None:
            return {}
        run = _open_run(ctx, self.mask_run, "mask")
        try:
            final = _final_state(run)
            prev = ({n: t.bool() for n, t in run.load_snapshot(0, "mask").items()}
                    if 0 in run.snapshot_steps("mask") else None)
        finally:
            run.close()
        missing = [n for n in names if n not in final]
        if missing:
            raise UsageError(f"imp: run {self.mask_run} has no tensor {missing[0]!r}; is it the same model?")
        return P.global_magnitude_masks({n: final[n] for n in names}, prev, self.prune_fraction)

    def _record_start(self, ctx: StepContext) -> None:
        run = ctx.run
        if self.masks:
            run.save_snapshot(0, {n: m.float() for n, m in self.masks.items()}, kind="mask")
            total = sum(m.numel() for m in self.masks.values())
            self.state = IMPState(P.sparsity(self.masks), total, sum(int(m.sum()) for m in self.masks.values()))
        named = list(ctx.model.named_parameters())
        if 0 in run.snapshot_steps("params"):
            keep = set(run.load_snapshot(0, "params"))
            # background, like the recorder: its single writer thread keeps the order, so this file wins
            run.save_snapshot(0, {n: p for n, p in named if n in keep}, kind="params", background=True)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.detach()) for _, p in named]))
        run.log_scalars(0, {"param_norm": float(norm)})
        source = f"run {self.rewind_run} step {self.rewind_step if self.rewind_step is not None else 'final'}"
        self.decide(ctx, f"start from {source if self.rewind_run else 'own init'}"
                    f"{'' if self.perturb == 'none' else ', perturbed: ' + self.perturb}; "
                    f"sparsity {self.state.sparsity:.3f}",
                    reason="iterative magnitude pruning with rewinding",
                    evidence={"rewind_run": self.rewind_run, "rewind_step": self.rewind_step,
                              "mask_run": self.mask_run, "perturb": self.perturb})
