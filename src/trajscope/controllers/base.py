"""Controllers: act on training from what the probes and the trajectory show.

A controller is a :class:`~trajscope.events.Callback` with a named, serializable decision state (a
dataclass, like optax's ``<Name>State``). Every decision goes into the run's event log as an event
of kind ``controller`` whose data holds the controller's ``name``, the ``reason``, the ``evidence``
(the probe values it used) and the ``state`` after the decision, so that a user can see why the
learning rate changed; the report draws them as a timeline.

Subclasses set ``default_name`` (also the registry key) and ``needs`` (as for probes: ``batch``,
``loss_fn``, ``optimizer``, ``data``), keep their state in ``self.state`` (a dataclass instance of
plain JSON values) and call :meth:`Controller.decide` when they act. Every registered controller is
built with no arguments by one conformance test.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from trajscope.errors import UsageError
from trajscope.events import Callback, StepContext

REGISTRY: dict[str, type["Controller"]] = {}

KIND = "controller"  # the event kind of a decision (read by trajscope.report.controllers)


def register(cls: type["Controller"]) -> type["Controller"]:
    """Class decorator: make ``cls`` buildable from a run config (``controllers=[{"kind": ...}]``)."""
    if cls.default_name in REGISTRY:
        raise ValueError(f"controller name {cls.default_name!r} registered twice")
    REGISTRY[cls.default_name] = cls
    return cls


def all_controllers() -> dict[str, type["Controller"]]:
    return dict(REGISTRY)


class Controller(Callback):
    """Base class of controllers (see the module docstring)."""

    default_name: ClassVar[str] = "controller"
    needs: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, name: str | None = None):
        self.name = name or self.default_name
        self.state: Any = None  # a dataclass instance, set by the subclass
        self._checked = False

    def check(self, ctx: StepContext) -> None:
        """Fail with one line naming what the context lacks (checked once, at first use)."""
        if self._checked:
            return
        have = {"batch": ctx.batch is not None, "loss_fn": ctx.workload is not None,
                "optimizer": ctx.optimizer is not None, "data": ctx.data is not None}
        missing = sorted(n for n in self.needs if not have.get(n, False))
        if missing:
            raise UsageError(f"controller {self.name!r} needs {', '.join(missing)} in its context")
        self._checked = True

    def decide(self, ctx: StepContext, message: str, reason: str, evidence: dict[str, Any] | None = None) -> None:
        """Write one decision to the run: ``message`` says what was done, ``reason`` why, and
        ``evidence`` the values it rested on; the current state is stored with it."""
        data = {"controller": self.name, "reason": reason, "evidence": evidence or {}, "state": self.state_dict()}
        ctx.run.log_event(ctx.step, KIND, message, data)

    def state_dict(self) -> dict[str, Any]:
        """The decision state as plain values (for checkpoints and the event log)."""
        if self.state is None:
            return {}
        return dataclasses.asdict(self.state) if dataclasses.is_dataclass(self.state) else dict(self.state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.state is not None and dataclasses.is_dataclass(self.state) and state:
            self.state = type(self.state)(**state)
