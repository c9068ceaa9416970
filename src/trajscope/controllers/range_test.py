"""Leslie Smith's learning-rate range test, the familiar baseline of ``trajscope tune``.

:func:`range_test` is the plain loop: ``step(t, lr) -> loss`` takes update t at rate ``lr`` and
returns the mini-batch loss (mean over the batch) before the update; the rate grows geometrically
from ``lr_min`` to ``lr_max`` over ``steps`` updates and the test stops early once the smoothed loss
diverges (:func:`~trajscope.functional.lr_range.divergence_index`). The suggested rate is the one at
the steepest descent of the smoothed loss in log rate, over the part of the curve before divergence.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

from trajscope.functional import lr_range

DEFAULT_BOUNDS = {"sgd": (1e-4, 10.0), "adam": (1e-6, 1.0), "adamw": (1e-6, 1.0), "muon": (1e-5, 1.0)}


@dataclass
class RangeTestResult:
    """``lr`` the suggestion; ``rates``, ``losses``, ``smoothed`` per step taken (``steps`` of them);
    ``diverged_at`` the index where the smoothed loss diverged (None if it never did);
    ``steepest_at`` the index of the suggestion; ``first_increase_lr`` the rate of the first update
    after which the raw loss exceeded the loss before it (None if the loss never rose)."""

    lr: float
    rates: list[float]
    losses: list[float]
    smoothed: list[float]
    steps: int
    diverged_at: int | None
    steepest_at: int
    first_increase_lr: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def range_test(step: Callable[[int, float], float], lr_min: float, lr_max: float, steps: int = 100, *,
               beta: float = 0.98, stop_factor: float = 4.0, skip: int = 5) -> RangeTestResult:
    """Run the range test (see the module docstring). ``skip``: the first smoothed values (few
    losses behind them) are not candidates for the steepest descent."""
    rates = lr_range.exponential_rates(lr_min, lr_max, steps)
    losses: list[float] = []
    diverged = None
    for t, lr in enumerate(rates, start=1):
        losses.append(float(step(t, lr)))
        smoothed = lr_range.smooth_losses(losses, beta)
        diverged = lr_range.divergence_index(smoothed, stop_factor)
        if diverged is not None:
            break
    smoothed = lr_range.smooth_losses(losses, beta)
    usable = diverged if diverged is not None else len(losses)
    usable = max(usable, 1)
    i = lr_range.steepest_descent_index(rates[:usable], smoothed[:usable], skip=min(skip, max(usable - 1, 0)))
    # the loss of step j is measured before update j, so a rise from j-1 to j is update j-1's doing
    rise = next((rates[j - 1] for j in range(1, len(losses))
                 if losses[j] > losses[j - 1] or not math.isfinite(losses[j])), None)
    return RangeTestResult(lr=rates[i], rates=rates[:len(losses)], losses=losses, smoothed=smoothed,
                           steps=len(losses), diverged_at=diverged, steepest_at=i, first_increase_lr=rise)
