"""When to do something: ``step -> bool`` schedules and their combinators.

A schedule decides *when*; the recorder, probes and controllers decide *what*. Steps count optimizer
steps: step 0 is the initial state (before any update), step t the state after the t-th update.

>>> s = every(10) | until(3)
>>> [t for t in range(25) if s(t)]
[0, 1, 2, 3, 10, 20]
>>> [t for t in range(1000) if logspace(per_decade=2)(t)]
[0, 1, 3, 10, 32, 100, 316]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable


class Schedule:
    """Base class: ``schedule(step) -> bool``; combine with ``|`` (or), ``&`` (and), ``~`` (not)."""

    def __call__(self, step: int) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def __or__(self, other: "Schedule") -> "Schedule":
        return AnyOf((self, as_schedule(other)))

    def __and__(self, other: "Schedule") -> "Schedule":
        return AllOf((self, as_schedule(other)))

    def __invert__(self) -> "Schedule":
        return Not(self)

    def steps(self, last: int) -> list[int]:
        """The steps in ``0..last`` (inclusive) at which the schedule fires."""
        return [t for t in range(last + 1) if self(t)]


@dataclass(frozen=True)
class Never(Schedule):
    def __call__(self, step: int) -> bool:
        return False


@dataclass(frozen=True)
class Every(Schedule):
    """Fires at ``start, start + n, start + 2n, ...``."""

    n: int
    start: int = 0

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"every(n) needs n >= 1, got {self.n}")

    def __call__(self, step: int) -> bool:
        return step >= self.start and (step - self.start) % self.n == 0


@dataclass(frozen=True)
class Until(Schedule):
    """Fires at every step up to and including ``last``."""

    last: int

    def __call__(self, step: int) -> bool:
        return step <= self.last


@dataclass(frozen=True)
class At(Schedule):
    """Fires at the given steps."""

    at: frozenset

    def __call__(self, step: int) -> bool:
        return step in self.at


@dataclass(frozen=True)
class LogSpaced(Schedule):
    """Fires at step 0 and at ``round(10 ** (j / per_decade))`` for j = 0, 1, 2, ... (deduplicated)."""

    per_decade: int = 10

    def __post_init__(self):
        if self.per_decade < 1:
            raise ValueError(f"logspace needs per_decade >= 1, got {self.per_decade}")

    def __call__(self, step: int) -> bool:
        if step <= 0:
            return step == 0
        # The candidate exponents whose rounding could give `step`.
        j = round(self.per_decade * math.log10(step))
        return any(round(10 ** (i / self.per_decade)) == step for i in (j - 1, j, j + 1) if i >= 0)


@dataclass(frozen=True)
class AnyOf(Schedule):
    parts: tuple

    def __call__(self, step: int) -> bool:
        return any(p(step) for p in self.parts)


@dataclass(frozen=True)
class AllOf(Schedule):
    parts: tuple

    def __call__(self, step: int) -> bool:
        return all(p(step) for p in self.parts)


@dataclass(frozen=True)
class Not(Schedule):
    part: Schedule

    def __call__(self, step: int) -> bool:
        return not self.part(step)


@dataclass(frozen=True)
class Function(Schedule):
    """Wraps any ``step -> bool`` callable."""

    fn: Callable[[int], bool]

    def __call__(self, step: int) -> bool:
        return bool(self.fn(step))


def never() -> Schedule:
    return Never()


def always() -> Schedule:
    return Every(1)


def every(n: int, start: int = 0) -> Schedule:
    return Every(n, start)


def until(last: int) -> Schedule:
    return Until(last)


def at(steps: Iterable[int]) -> Schedule:
    return At(frozenset(int(s) for s in steps))


def logspace(per_decade: int = 10) -> Schedule:
    return LogSpaced(per_decade)


def dense_early(dense: int = 100, per_decade: int = 20) -> Schedule:
    """Every step up to ``dense``, then log-spaced (``per_decade`` per factor of 10).

    The default parameter-snapshot schedule: 101 snapshots for the first 100 steps, then 20 per
    decade (about 20 more up to step 1,000 and 20 more up to 10,000).
    """
    return Until(dense) | LogSpaced(per_decade)


def as_schedule(value) -> Schedule:
    """Accept a Schedule, a callable, ``None``/``False`` (never), ``True`` (always) or an int n (every n)."""
    if isinstance(value, Schedule):
        return value
    if value is None or value is False:
        return Never()
    if value is True:
        return Every(1)
    if isinstance(value, int):
        return Every(value)
    if callable(value):
        return Function(value)
    raise TypeError(f"cannot use {value!r} as a schedule")
