"""Kernel motion and activation regimes (functional/ntk.py) against loops and closed forms."""

import math

import pytest
import torch
from torch import nn

from trajscope.functional.ntk import (CHAOTIC, PAPER_TAU_HIGH, PAPER_TAU_LOW, STABLE, TRANSITION,
                                      activation_similarity, activations, empirical_ntk, kernel_distance,
                                      kernel_velocity, regime_labels, regime_thresholds)


def _cnn(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv1d(1, 2, 3, padding=1), nn.BatchNorm1d(2), nn.ReLU(), nn.Flatten(), nn.Linear(12, 3))
    with torch.no_grad():
        m[1].running_mean.uniform_(-0.5, 0.5)
    return m.double()


def _loop_jacobian(model, x):
    """(N, C, P) by one backward per example and class, in eval mode."""
    model.eval()
    params = list(model.parameters())
    rows = []
    for i in range(len(x)):
        out = model(x[i:i + 1])[0]
        rows.append(torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[c], params,
                                                                                       retain_graph=True)])
                                 for c in range(len(out))]))
    return torch.stack(rows)


@pytest.fixture(scope="module")
def setup():
    model = _cnn()
    x = torch.randn(7, 1, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    return model, x, _loop_jacobian(model, x)


def test_ntk_matches_a_loop_of_jacobians(setup):
    model, x, J = setup
    N, C, P = J.shape
    model.train()
    trace = empirical_ntk(model, x, chunk_size=3)
    torch.testing.assert_close(trace, torch.einsum("ncp,mcp->nm", J, J), rtol=1e-10, atol=1e-12)
    full = empirical_ntk(model, x, kind="full", chunk_size=2)
    torch.testing.assert_close(full, J.reshape(N * C, P) @ J.reshape(N * C, P).T, rtol=1e-10, atol=1e-12)
    summed = empirical_ntk(model, x, kind="sum", chunk_size=4)
    torch.testing.assert_close(summed, J.sum(1) @ J.sum(1).T, rtol=1e-10, atol=1e-12)
    assert all(m.training for m in model.modules())  # mode restored


def test_ntk_recomputes_chunks_beyond_the_memory_budget(setup):
    model, x, J = setup
    cached = empirical_ntk(model, x, chunk_size=2)
    recomputed = empirical_ntk(model, x, chunk_size=2, max_bytes=1)
    torch.testing.assert_close(recomputed, cached, rtol=0, atol=0)


def test_kernel_distance_closed_forms():
    K = torch.randn(5, 5, dtype=torch.float64)
    K = K @ K.T
    assert kernel_distance(K, 2 * K) == pytest.approx(0.0, abs=1e-12)
    A, B = torch.diag(torch.tensor([1.0, 0.0])), torch.diag(torch.tensor([0.0, 3.0]))
    assert kernel_distance(A, B) == pytest.approx(1.0)
    # <I, diag(1, 0)> = 1, |I| = sqrt 2, |diag(1, 0)| = 1
    assert kernel_distance(torch.eye(2), A) == pytest.approx(1 - 1 / math.sqrt(2))
    assert kernel_velocity(torch.eye(2), A, 4) == pytest.approx((1 - 1 / math.sqrt(2)) / 4)
    assert math.isnan(kernel_distance(torch.zeros(2, 2), A))
    with pytest.raises(ValueError):
        kernel_velocity(A, A, 0)


def test_activations_of_outputs_and_of_a_layer(setup):
    model, x, _ = setup
    model.eval()
    with torch.no_grad():
        out = model(x)
        hidden = model[2](model[1](model[0](x)))
    torch.testing.assert_close(activations(model, x, chunk_size=3).double(), out.float().double())
    torch.testing.assert_close(activations(model, x, "2").double(), hidden.reshape(len(x), -1).float().double())
    assert activation_similarity(out, 3 * out) == pytest.approx(1.0)
    assert activation_similarity(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        activations(model, x, "nope")


def test_regime_labels_with_the_paper_thresholds():
    s = [0.9999, PAPER_TAU_HIGH, 0.998, PAPER_TAU_LOW, 0.9]
    assert regime_labels(s, thresholds="fixed").tolist() == [STABLE, STABLE, TRANSITION, CHAOTIC, CHAOTIC]
    # auto keeps the fixed thresholds while they discriminate
    assert regime_labels(s * 2, thresholds="auto", min_history=4).tolist() == [2, 2, 1, 0, 0] * 2
    hi, lo, used = regime_thresholds([0.5], tau_high=0.8, tau_low=0.2, thresholds="fixed")
    assert (hi, lo, used) == (0.8, 0.2, False)


def test_regime_labels_percentile_fallback():
    s = [0.90 + 0.001 * i for i in range(11)]  # 0.900 .. 0.910: all chaotic for the paper thresholds
    hi, lo, used = regime_thresholds(s)
    assert used and hi == pytest.approx(0.907) and lo == pytest.approx(0.903)
    labels = regime_labels(s).tolist()
    assert labels == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    assert regime_labels(s, thresholds="percentile").tolist() == labels
    # too short a history: auto keeps the fixed thresholds (everything chaotic)
    assert regime_labels(s[:5], min_history=8).tolist() == [0] * 5
    # causal: label t only sees s[:t+1]; before min_history observations the fixed thresholds apply
    causal = regime_labels(s, causal=True, min_history=8).tolist()
    assert causal[:7] == [0] * 7
    assert causal[7:] == [2, 2, 2, 2]  # each new maximum is above the 70th percentile so far
    # a run stable throughout: the fixed thresholds do not discriminate either, so percentiles apply
    assert regime_thresholds([0.9999] * 4 + [0.99995] * 4)[2]


class _Log:
    """Stands in for a Run: collects what a probe writes."""

    def __init__(self):
        self.rows = {}

    def log_scalars(self, step, values):
        self.rows[step] = dict(values)


def test_regime_and_kernel_probes_compare_the_right_steps():
    from trajscope import schedules as S
    from trajscope.events import Event, StepContext
    from trajscope.probes.kernel import KernelProbe, RegimeProbe
    from trajscope.workloads import Data

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x = torch.randn(6, 4)
    data = Data(x, torch.zeros(6, dtype=torch.int64), x, torch.zeros(6, dtype=torch.int64), 3)
    ctx = StepContext(None, _Log(), model, None, data=data)
    regime = RegimeProbe(schedule=S.at([3, 10, 12]), delta=5, size=6)
    kernel = KernelProbe(schedule=S.at([2, 5]), size=6)
    outs, kernels = {}, {}
    for step in range(13):
        ctx.step = step
        if step:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.05 * torch.randn_like(p))
        outs[step], kernels[step] = activations(model, x), empirical_ntk(model, x)
        for probe in (regime, kernel):
            probe.on_event(Event.FIT_START if step == 0 else Event.STEP_END, ctx)
    rows = ctx.run.rows
    assert sorted(rows) == [2, 3, 5, 10, 12]
    for step, ref in ((3, 0), (10, 5), (12, 7)):  # t < delta: against the reference (step 0)
        assert rows[step]["regime/lag"] == step - ref
        assert rows[step]["regime/similarity"] == pytest.approx(activation_similarity(outs[ref], outs[step]))
        assert rows[step]["regime/fallback"] == 0.0
    assert rows[5]["kernel/distance"] == pytest.approx(kernel_distance(kernels[0], kernels[5]))
    assert rows[5]["kernel/velocity"] == pytest.approx(kernel_distance(kernels[2], kernels[5]) / 3)
    assert rows[2]["kernel/velocity"] == pytest.approx(kernel_distance(kernels[0], kernels[2]) / 2)
