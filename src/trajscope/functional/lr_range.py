"""The learning-rate range test's arithmetic (Smith 2017, "Cyclical learning rates"): pure functions.

A range test trains for ``n`` steps with a rate that grows geometrically from ``lr_min`` to
``lr_max`` and records the training loss of each step. The loss is smoothed with a bias-corrected
exponential moving average; the test stops once the smoothed loss exceeds ``stop_factor`` times its
minimum so far (divergence), and suggests the rate where the smoothed loss falls fastest per unit of
log rate (the steepest descent), the usual reading of the curve.

>>> rates = exponential_rates(1e-3, 1.0, 4)
>>> [round(r, 4) for r in rates]
[0.001, 0.01, 0.1, 1.0]
>>> smooth_losses([1.0, 1.0, 1.0], beta=0.9)
[1.0, 1.0, 1.0]
"""

from __future__ import annotations

import math
from typing import Sequence


def exponential_rates(lr_min: float, lr_max: float, n: int) -> list[float]:
    """``n`` rates from ``lr_min`` to ``lr_max`` (both included), each ``(lr_max/lr_min)^(1/(n-1))``
    times the previous: rate i (0-based) is used by the (i+1)-th update."""
    if not (0 < lr_min < lr_max) or n < 2:
        raise ValueError(f"need 0 < lr_min < lr_max and n >= 2, got {lr_min}, {lr_max}, {n}")
    g = growth_factor(lr_min, lr_max, n)
    return [lr_min * g ** i for i in range(n)]


def growth_factor(lr_min: float, lr_max: float, n: int) -> float:
    """The per-step factor of :func:`exponential_rates`."""
    return (lr_max / lr_min) ** (1.0 / (n - 1))


def smooth_losses(losses: Sequence[float], beta: float = 0.98) -> list[float]:
    """Bias-corrected exponential moving average: m_t = beta m_{t-1} + (1 - beta) l_t, m_0 = 0, and
    the smoothed value at t (1-based) is m_t / (1 - beta^t), so a constant sequence stays constant.
    ``beta = 0`` returns the losses unchanged."""
    if not 0 <= beta < 1:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    out, m = [], 0.0
    for t, loss in enumerate(losses, start=1):
        m = beta * m + (1.0 - beta) * float(loss)
        out.append(m / (1.0 - beta ** t))
    return out


def divergence_index(smoothed: Sequence[float], stop_factor: float = 4.0) -> int | None:
    """The first index whose smoothed loss is not finite or exceeds ``stop_factor`` times the
    minimum of the smoothed losses before it; None if there is none."""
    best = math.inf
    for i, s in enumerate(smoothed):
        if not math.isfinite(s) or (i > 0 and s > stop_factor * best):
            return i
        best = min(best, s)
    return None


def steepest_descent_index(rates: Sequence[float], smoothed: Sequence[float], skip: int = 0) -> int:
    """The index i that minimizes the central difference of the smoothed loss in log rate,
    (s[i+1] - s[i-1]) / (log r[i+1] - log r[i-1]) (one-sided at the ends), over indices >= ``skip``
    (the first smoothed values rest on few losses). With fewer than 3 points, the argmin of ``s``."""
    n = len(smoothed)
    if n != len(rates) or n == 0:
        raise ValueError(f"rates and smoothed losses must be equal-length and non-empty, got {len(rates)}, {n}")
    if n < 3:
        return min(range(n), key=lambda i: smoothed[i])
    logs = [math.log(r) for r in rates]
    best_i, best_slope = None, math.inf
    for i in range(min(skip, n - 1), n):
        lo, hi = max(i - 1, 0), min(i + 1, n - 1)
        slope = (smoothed[hi] - smoothed[lo]) / (logs[hi] - logs[lo])
        if slope < best_slope:
            best_i, best_slope = i, slope
    return best_i if best_i is not None else 0
