"""Probes: online measurements during training, each a schedule plus a call into ``functional/``.

A probe is a :class:`~trajscope.events.Callback`. At its event (default STEP_END, when the
parameters hold theta_step) and on the steps its schedule fires, it calls :meth:`Probe.measure`
and writes the returned scalars to the run as ``<name>/<quantity>``; ``name`` is given by the
user (default: the class's ``default_name``), so two instances never collide.

A probe declares what it needs in ``needs``; :meth:`Probe.check` verifies it against the context
when the probe first runs, and fails with one line naming what is missing:

- ``"batch"``: the current (inputs, labels) in ``ctx.batch``;
- ``"loss_fn"``: the workload's loss (``ctx.loss_fn``);
- ``"optimizer"``: the optimizer (for its learning rate, momentum, second moments);
- ``"data"``: the workload's data set (``ctx.data``), e.g. for a fixed probe set.

Every probe class registers itself with :func:`register` so that one conformance test runs all of
them. Its constructor must work with no arguments.
"""

from __future__ import annotations

from typing import Any, ClassVar

from trajscope import schedules as S
from trajscope.errors import UsageError
from trajscope.events import Callback, Event, StepContext, missing_needs

REGISTRY: dict[str, type["Probe"]] = {}


def register(cls: type["Probe"]) -> type["Probe"]:
    """Class decorator: make ``cls`` known to :func:`all_probes` (and the conformance test)."""
    if cls.default_name in REGISTRY:
        raise ValueError(f"probe name {cls.default_name!r} registered twice")
    REGISTRY[cls.default_name] = cls
    return cls


def all_probes() -> dict[str, type["Probe"]]:
    return dict(REGISTRY)


class Probe(Callback):
    """Base class. Subclasses set ``default_name`` and ``needs`` and implement :meth:`measure`."""

    default_name: ClassVar[str] = "probe"
    needs: ClassVar[frozenset[str]] = frozenset()
    event: ClassVar[Event] = Event.STEP_END

    def __init__(self, schedule=None, name: str | None = None, *, every: int | None = None):
        if every is not None and schedule is not None:
            raise ValueError("give either schedule or every, not both")
        if every is not None:
            schedule = S.every(every)
        self.schedule = S.as_schedule(schedule) if schedule is not None else S.logspace(4)
        self.name = name or self.default_name
        self._checked = False

    def on_event(self, event: Event, ctx: StepContext) -> None:
        if event is not self.event or not self.schedule(ctx.step):
            return
        values = {f"{self.name}/{k}": float(v) for k, v in self(ctx).items()}
        ctx.values.update(values)
        ctx.run.log_scalars(ctx.step, values)

    def __call__(self, ctx: StepContext) -> dict[str, float]:
        """Check the needs (once) and measure; usable in a plain loop with a hand-made context."""
        if not self._checked:
            self.check(ctx)
            self._checked = True
        return self.measure(ctx)

    def check(self, ctx: StepContext) -> None:
        missing = missing_needs(self.needs, ctx)
        if missing:
            raise UsageError(f"probe {self.name!r} needs {', '.join(missing)} in its context")

    def measure(self, ctx: StepContext) -> dict[str, float]:  # pragma: no cover - abstract
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """The probe's own state (e.g. a warm-start vector), for checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class BatchProbe(Probe):
    """A probe measured on examples: ``data="batch"`` the step's batch (``ctx.batch``), or
    ``data="fixed"`` the first ``fixed_size`` training examples of ``ctx.data`` (the same set every
    time; the probe then needs ``data`` instead of ``batch``)."""

    def __init__(self, schedule=None, name: str | None = None, *, every: int | None = None,
                 data: str = "batch", fixed_size: int = 1024):
        super().__init__(schedule, name, every=every)
        if data not in ("batch", "fixed"):
            raise ValueError(f"data must be 'batch' or 'fixed', got {data!r}")
        self.data, self.fixed_size = data, fixed_size
        if data == "fixed":
            self.needs = (type(self).needs - {"batch"}) | {"data"}

    def examples(self, ctx: StepContext):
        """The (inputs, labels) to measure on."""
        if self.data == "fixed":
            return ctx.data.x_train[:self.fixed_size], ctx.data.y_train[:self.fixed_size]
        return ctx.batch
