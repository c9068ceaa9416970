"""The redundancy criterion (trajscope.functional.redundancy) against closed forms and slow
references, and the freeze controller's automatic switch on synthetic straight-line and
random-walk trajectories (exact and sketched)."""

import math

import pytest
import torch
from torch import nn

from trajscope.controllers import LoopHooks
from trajscope.controllers.freeze import FreezeController
from trajscope.functional.redundancy import displacement_mds, random_walk_mds, redundancy, update_cosine


def test_random_walk_mds_equals_a_double_loop():
    for first, w in [(1, 2), (1, 7), (40, 10)]:
        ages = range(first, first + w)
        pairs = [(i, j) for i in ages for j in ages if i != j]
        slow = sum(math.sqrt(min(i, j) / max(i, j)) for i, j in pairs) / len(pairs)
        assert random_walk_mds(first, w) == pytest.approx(slow, rel=1e-12)
    # the continuum limit for a window from the start: 2 * int_0^1 int_0^y sqrt(x / y) dx dy = 2/3
    assert random_walk_mds(1, 2000) == pytest.approx(2 / 3, abs=2e-3)
    with pytest.raises(ValueError):
        random_walk_mds(0, 5)


def test_displacement_mds_and_update_cosine_against_the_cosine_map():
    g = torch.Generator().manual_seed(0)
    X, ref = torch.randn(6, 9, generator=g, dtype=torch.float64), torch.randn(9, generator=g, dtype=torch.float64)
    D = X - ref
    C = torch.nn.functional.cosine_similarity(D[:, None], D[None, :], dim=-1)
    assert displacement_mds(X, ref) == pytest.approx(float((C.sum() - 6) / 30), rel=1e-12)
    U = torch.diff(X, dim=0)
    slow = sum(float(torch.nn.functional.cosine_similarity(U[i], U[i + 1], dim=0)) for i in range(4)) / 4
    assert update_cosine(X) == pytest.approx(slow, rel=1e-12)
    v = torch.randn(9, generator=g, dtype=torch.float64)
    zigzag = torch.stack([ref + (i % 2) * v for i in range(6)])
    assert update_cosine(zigzag) == pytest.approx(-1.0, abs=1e-12)


def test_straight_line_has_ratio_zero_and_random_walk_ratio_one():
    g = torch.Generator().manual_seed(1)
    d = 20_000
    ref, v = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    t = torch.arange(181, 201, dtype=torch.float64)[:, None]
    line = redundancy(ref + t * v, ref, 181)
    assert line["mds"] == pytest.approx(1.0, abs=1e-12) and abs(line["ratio"]) < 1e-9
    assert line["update_cosine"] == pytest.approx(1.0, abs=1e-12)
    # i.i.d. Gaussian steps: ratio -> 1 as d -> inf; over 20 seeds at d = 20,000 the std was 0.012,
    # so 0.05 is a 4-sigma band.
    for seed in range(3):
        W = torch.randn(200, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).cumsum(0)
        walk = redundancy(W[-20:], torch.zeros(d, dtype=torch.float64), 181)
        assert walk["ratio"] == pytest.approx(1.0, abs=0.05)
        assert abs(walk["update_cosine"]) < 0.05  # independent steps: cos ~ N(0, 1/d)


class Path(nn.Module):
    """A 'model' whose parameter ``theta`` is set to a given trajectory; ``b`` is the kept set."""

    def __init__(self, d):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(d))
        self.b = nn.Parameter(torch.zeros(1))


def _follow(points, **options):
    """Feed the trajectory ``points`` (T+1, d) through a FreezeController in a plain loop."""
    model = Path(points.shape[1])
    ctl = FreezeController(keep="b", **options)
    hooks = LoopHooks([ctl], model, None)
    with torch.no_grad():
        model.theta.copy_(points[0])
    hooks.start()
    for t in range(1, len(points)):
        hooks.before_optimizer_step()
        with torch.no_grad():
            if model.theta.requires_grad:  # once frozen, nothing moves it
                model.theta.copy_(points[t])
        hooks.after_optimizer_step()
    return ctl, hooks


def test_controller_switches_on_a_straight_line_at_the_first_eligible_decisions():
    d = 4000
    g = torch.Generator().manual_seed(2)
    theta0, v = torch.randn(d, generator=g), torch.randn(d, generator=g) * 0.01
    line = theta0 + torch.arange(61)[:, None] * v
    ctl, hooks = _follow(line, window=10, every=5, patience=2)
    # window full at step 10 (first eligible decision), second redundant decision at step 15
    assert ctl.state.switched and ctl.state.switch_step == 15 and ctl.state.switch_reason == "redundant"
    (decision,) = hooks.run.decisions("freeze")
    assert decision["data"]["evidence"]["ratio"] < 0.01 and decision["data"]["evidence"]["streak"] == 2
    assert [s for s, _ in hooks.run.scalars["freeze/ratio"]] == [10, 15]
    assert ctl.state.kept_params == 1 and ctl.state.frozen_params == d


def test_controller_never_switches_on_a_random_walk():
    d = 4000
    W = torch.randn(201, d, generator=torch.Generator().manual_seed(3)).cumsum(0)
    ctl, hooks = _follow(W, window=20, every=10, patience=1)
    assert not ctl.state.switched and hooks.run.decisions() == []
    ratios = [r for _, r in hooks.run.scalars["freeze/ratio"]]
    assert len(ratios) == 19 and min(ratios) > 0.5  # sketched; exact ones are 1 +- 0.04 at d = 4000


def test_sketched_ratio_is_close_to_the_exact_one():
    d, T, w = 50_000, 80, 20
    g = torch.Generator().manual_seed(4)
    drift = torch.randn(d, generator=g, dtype=torch.float64)
    steps = drift + 3.0 * torch.randn(T, d, generator=g, dtype=torch.float64)  # a walk with drift
    points = torch.cat([torch.zeros(1, d, dtype=torch.float64), steps.cumsum(0)]).float()
    ctl, hooks = _follow(points, window=w, every=T, patience=1, threshold=0.0, sketch_dim=1024)
    exact = redundancy(points[T - w + 1:].double(), points[0].double(), T - w + 1)
    ((step, sketched),) = hooks.run.scalars["freeze/ratio"]
    assert step == T and 0.05 < exact["ratio"] < 0.9
    # For cosines c near 1 the sketch error of 1 - c has relative std ~ 2 / sqrt(k) = 6% (k = 1024,
    # delta method; functional/sketch.py): 25% is a 4-sigma band.
    assert sketched == pytest.approx(exact["ratio"], rel=0.25)
    (mds,) = [v for _, v in hooks.run.scalars["freeze/mds"]]
    assert 1 - mds == pytest.approx(1 - exact["mds"], rel=0.25)
