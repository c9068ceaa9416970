"""The recorder's schedules, decided a window of steps at a time.

Right after a training step even a few lines of Python cost several times their usual time (the
step evicted the interpreter's caches): evaluating the seven schedules of a default Recorder
took ~60 us per step in context, against ~1 us for one list lookup. Schedules built from the
pure combinators of :mod:`trajscope.schedules` (``every``, ``until``, ``at``, ``logspace``,
``never`` and ``|``, ``&``, ``~`` of them) depend on the step alone, so :class:`Plan` evaluates
them for ``window`` steps at once; any other schedule (a wrapped callable, a user's subclass)
is called at every step, as before.
"""

from __future__ import annotations

from trajscope import schedules as S

_PURE = (S.Never, S.Every, S.Until, S.At, S.LogSpaced)


def is_pure(s: S.Schedule) -> bool:
    """Whether ``s`` is one of the step-only schedules of :mod:`trajscope.schedules`."""
    if type(s) in _PURE:
        return True
    if type(s) in (S.AnyOf, S.AllOf):
        return all(is_pure(p) for p in s.parts)
    return type(s) is S.Not and is_pure(s.part)


def _fires(s: S.Schedule, start: int, end: int) -> set[int]:
    """The steps in ``start .. end - 1`` at which the pure schedule ``s`` fires (each class's
    rule in closed form: no call per step)."""
    kind = type(s)
    if kind is S.Never:
        return set()
    if kind is S.Every:
        first = max(start, s.start)
        first += (s.start - first) % s.n  # the next step on the grid start + i * n
        return set(range(first, end, s.n))
    if kind is S.Until:
        return set(range(start, min(end, s.last + 1)))
    if kind is S.At:
        return {t for t in s.at if start <= t < end}
    if kind is S.LogSpaced:  # step 0 and round(10 ** (j / per_decade)), j = 0, 1, ... (increasing)
        out = {0} if start <= 0 < end else set()
        j, t = 0, 1
        while t < end:
            if t >= start:
                out.add(t)
            j += 1
            t = round(10 ** (j / s.per_decade))
        return out
    parts = [_fires(p, start, end) for p in (s.parts if kind in (S.AnyOf, S.AllOf) else (s.part,))]
    if kind is S.AnyOf:
        return set().union(*parts)
    if kind is S.AllOf:
        return set.intersection(*parts) if parts else set(range(start, end))
    return set(range(start, end)) - parts[0]  # Not


def _window(s: S.Schedule, start: int, n: int) -> list[bool]:
    """[s(start), ..., s(start + n - 1)]."""
    fired = _fires(s, start, start + n)
    return [t in fired for t in range(start, start + n)]


class Plan:
    """``plan(step)`` -> a tuple of ``schedules[i](step)``, looked up in a window of precomputed
    steps when every schedule :func:`is_pure` (else each is called)."""

    def __init__(self, schedules: tuple[S.Schedule, ...], window: int = 512):
        self.schedules, self.window = schedules, window
        self.pure = all(is_pure(s) for s in schedules)
        self._start, self._rows = 0, []

    def __call__(self, step: int) -> tuple[bool, ...]:
        if not self.pure:
            return tuple(bool(s(step)) for s in self.schedules)
        i = step - self._start
        if not 0 <= i < len(self._rows):
            self._start, i = step, 0
            self._rows = list(zip(*(_window(s, step, self.window) for s in self.schedules)))
        return self._rows[i]
