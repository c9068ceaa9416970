"""Studies early-phase, explr, grokking, heavy-tail in --quick form: what they write (table rows and
claims, verdicts, figures, the HTML section), a rerun that reuses the cached runs, and the numerical
helpers they rest on (against closed forms or slow references). Numbers are not asserted."""

import json
import math
import os
from html import escape
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from trajscope.cli import app
from trajscope.studies import run_study
from trajscope.studies.base import VERDICTS
from trajscope.studies.base import REGISTRY

CLAIMS = {
    "early-phase": ["rewinding to k > 0 keeps dense accuracy", "rewinding to 0 is worse", "(sign-reinit)",
                    "(permute)", "(noise)", "blurred inputs or a self-supervised task", "random labels",
                    "true labels"],
    "explr": ["same function", "weight norm", "final validation accuracy", "needs scale invariance"],
    "grokking": ["delayed generalization", "time to grok", "without weight decay", "kernel moves fastest"],
    "heavy-tail": ["GD makes slow progress on rare classes", "Adam makes progress", "lower training loss",
                   "uniform classes"],
}
FIGURES = {"early-phase": {"imp", "early-statistics"}, "explr": {"equivalence"},
           "grokking": {"accuracy", "trajectory"}, "heavy-tail": {"buckets"}}


def _run_dirs(root: Path) -> set[str]:
    return {p.name for p in root.iterdir() if p.is_dir() and (p / "run.db").exists()} if root.exists() else set()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    torch.set_num_threads(1)
    os.environ.setdefault("TQDM_DISABLE", "1")
    root = tmp_path_factory.mktemp("studies-b")
    out = {}
    # one through the CLI with --json, the others through the API
    res = CliRunner().invoke(app, ["study", "heavy-tail", "--quick", "--json", "--root", str(root), "--threads", "1"])
    assert res.exit_code == 0, res.output
    out["heavy-tail"] = json.loads(res.output)
    for name in ("early-phase", "explr", "grokking"):
        out[name] = run_study(name, quick=True, root=root, progress=False, say=None).to_dict()
    return root, out


@pytest.mark.parametrize("name", sorted(CLAIMS))
def test_quick_study_writes_its_table_figures_and_section(results, name):
    _, out = results
    r = out[name]
    assert REGISTRY[name].expected_minutes > 0 and r["quick"] is True
    claims = [f["claim"] for f in r["findings"]]
    assert len(claims) == len(CLAIMS[name])
    for want, got in zip(CLAIMS[name], claims):
        assert want in got
    for f in r["findings"]:
        assert f["verdict"] in VERDICTS and f["paper"] and f["measured"]
        assert f["verdict"] == "reproduced" or f["why"]
    assert set(r["figures"]) == FIGURES[name]
    for path in r["figures"].values():
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = Path(r["section"]).read_text()
    assert "<table" in html
    for f in r["findings"]:  # every row of the table is in the section
        assert escape(f["claim"]) in html and escape(f["verdict"]) in html
    assert Path(r["section"]).with_suffix(".json").exists()
    assert r["runs"]


def test_rerun_reuses_the_cached_runs(results):
    root, out = results
    before = _run_dirs(root)
    again = run_study("explr", quick=True, root=root, progress=False, say=None)
    assert _run_dirs(root) == before
    assert set(again.runs) == set(out["explr"]["runs"])
    assert [f.measured for f in again.findings] == [f["measured"] for f in out["explr"]["findings"]]


# ---- helpers -----------------------------------------------------------------------------------


def test_zipf_frequencies_closed_form_and_data_determinism():
    from trajscope.workloads import zipf

    pi = zipf.zipf_frequencies(4, 1.0)
    np.testing.assert_allclose(pi, np.array([1, 1 / 2, 1 / 3, 1 / 4]) / (25 / 12), rtol=1e-12)
    np.testing.assert_allclose(zipf.zipf_frequencies(5, 0.0), np.full(5, 0.2))
    opts = {"num_classes": 20, "train": 3000, "val": 100, "dim": 4}
    a, b = zipf.make_data(3, opts), zipf.make_data(3, opts)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    counts = torch.bincount(a.y_train, minlength=20).double() / 3000
    # each empirical frequency within 4 binomial standard deviations of pi
    p = torch.from_numpy(zipf.zipf_frequencies(20, 1.0))
    assert bool(((counts - p).abs() <= 4 * (p * (1 - p) / 3000).sqrt()).all())


def test_frequency_buckets_against_a_slow_reference():
    from trajscope.probes.training_set import frequency_buckets

    g = torch.Generator().manual_seed(0)
    labels = torch.multinomial(torch.tensor([0.4, 0.2, 0.15, 0.1, 0.08, 0.04, 0.02, 0.01]), 2000, True, generator=g)
    got = frequency_buckets(labels, 9, 4)  # class 8 never occurs
    counts = [int((labels == c).sum()) for c in range(9)]
    order = sorted(range(9), key=lambda c: (-counts[c], c))
    seen, want = 0, {}
    for c in order:
        want[c] = min(4 * seen // 2000, 3)
        seen += counts[c]
    assert got.tolist() == [want[c] for c in range(9)] and got[8] == 3


def test_train_metrics_and_bucket_loss_probes_match_direct_computation():
    from trajscope.events import StepContext
    from trajscope.probes.training_set import BucketLossProbe, TrainMetricsProbe
    from trajscope.workloads import get

    wl = get("zipf-classes")
    opts = {"num_classes": 10, "train": 500, "val": 50, "dim": 6}
    data = wl.make_data(0, opts)
    torch.manual_seed(0)
    model = wl.make_model(opts)
    ctx = StepContext(None, None, model, None, wl, data)
    m = TrainMetricsProbe()(ctx)
    with torch.no_grad():
        logits = model(data.x_train)
    assert m["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, data.y_train)), rel=1e-6)
    assert m["accuracy"] == pytest.approx(float((logits.argmax(1) == data.y_train).float().mean()))
    b = BucketLossProbe(buckets=3)(ctx)
    per = torch.nn.functional.cross_entropy(logits, data.y_train, reduction="none")
    from trajscope.probes.training_set import frequency_buckets

    of = frequency_buckets(data.y_train, 10, 3)[data.y_train]
    for k in range(3):
        assert b[f"bucket{k}"] == pytest.approx(float(per[of == k].mean()), rel=1e-5)


def test_blur_and_flip_transforms():
    from trajscope.workloads.pretext import blur, flip_transform

    x = torch.arange(8.0).view(1, 8)
    low = blur(x, 2)  # window means 0.5, 2.5, 4.5, 6.5, linearly interpolated (half-pixel centres)
    # output i samples source coordinate i/2 - 1/4 (clamped to [0, 3]) of the 4 window means
    torch.testing.assert_close(low, torch.tensor([[0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 6.5]]), rtol=0, atol=1e-6)
    c = torch.ones(1, 8) * 3.0
    torch.testing.assert_close(blur(c, 4), c)  # a constant is unchanged
    x4 = torch.randn(4, 6)
    y = flip_transform(x4, torch.tensor([0, 1, 2, 3]))
    torch.testing.assert_close(y, torch.stack([x4[0], x4[1].flip(0), -x4[2], -x4[3].flip(0)]))


def test_study_rules_and_small_helpers():
    from trajscope.studies.early_phase import sparsity, verdict_gain
    from trajscope.studies.grokking import first_reach
    from trajscope.studies.heavy_tail import tail_gap

    assert first_reach(np.array([0, 2, 4]), np.array([0.1, 0.96, 0.99])) == 2
    assert first_reach(np.array([0, 2]), np.array([0.1, 0.2])) is None
    losses = np.array([[2.0, 4.0], [1.0, 2.0]])
    assert tail_gap(losses) == pytest.approx(2.0)
    assert math.isnan(tail_gap(np.zeros((0, 3))))
    assert sparsity(3) == pytest.approx(1 - 0.512)
    assert [verdict_gain(x) for x in (2.0, 0.5, -1.0, math.nan)] == ["reproduced", "partly", "not", "not"]
