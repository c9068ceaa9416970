"""Studies directional, bn-only, catapult, edge-of-stability, kernel-motion: each runs in --quick
form and writes its table, figures and section; a rerun reuses the cached runs. Their numerical
helpers (regime rules, boundaries, flat-velocity and saturation steps, verdict rules, lambda_0) are
checked against hand-computed or closed-form answers."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from trajscope import studies
from trajscope.config import RunConfig
from trajscope.studies import bn_only, catapult, common, directional, edge_of_stability, kernel_motion
from trajscope.studies.base import VERDICTS

MINE = ["catapult", "edge-of-stability", "kernel-motion", "directional", "bn-only"]


def _run_dirs(root: Path) -> set[str]:
    return {p.name for p in root.iterdir() if p.is_dir() and (p / "run.db").exists()}


def _check_written(result: dict, out: Path, name: str) -> None:
    assert result["study"] == name and result["quick"] is True
    assert result["findings"], "a study must have table rows"
    for f in result["findings"]:
        assert f["claim"] and f["paper"] and f["measured"]
        assert f["verdict"] in VERDICTS
        assert f["verdict"] == "reproduced" or f["why"]
    assert result["figures"]
    for path in result["figures"].values():
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (out / f"{name}-quick.html").read_text()
    assert "<table" in html and 'id="findings"' in html
    for f in result["findings"]:
        from html import escape

        assert escape(f["claim"]) in html
    assert json.loads((out / f"{name}-quick.json").read_text())["findings"] == result["findings"]
    assert result["runs"]


@pytest.fixture(scope="module")
def quick_root(tmp_path_factory):
    return tmp_path_factory.mktemp("studies-a")


@pytest.mark.parametrize("name", ["catapult", "edge-of-stability", "kernel-motion", "directional", "bn-only"])
def test_quick_study_writes_table_figures_and_section(name, quick_root, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    torch.set_num_threads(1)
    out = quick_root / "out"
    result = studies.run_study(name, quick=True, root=quick_root, out_dir=out, progress=False, say=None)
    _check_written(result.to_dict(), out, name)
    claims = [f.claim for f in result.findings]
    expected = {"catapult": ["lazy below c = 2", "diverges beyond c_max", "falls below 2/eta", "best final accuracy",
                             "boundary moves up with depth"],
                "edge-of-stability": ["progressive sharpening", "reaches 2/eta", "hovers at 2/eta", "(2+2beta)/eta"],
                "kernel-motion": ["velocity is flat", "early velocity", "roughly constant", "distance from init"],
                "directional": ["saturates", "momentum", "weight decay", "width", "Q/K/V"],
                "bn-only": ["mnist1d-cnn: BN-only", "early phase matters", "trainable parameters"]}[name]
    assert len(claims) == len(expected)
    for want, claim in zip(expected, claims):
        assert want in claim


def test_cli_json_and_rerun_reuses_cached_runs(quick_root, monkeypatch, capsys):
    """Through the CLI with --json (kernel-motion); the rerun of a finished study adds no run."""
    from typer.testing import CliRunner

    from trajscope.cli import app

    monkeypatch.setenv("TQDM_DISABLE", "1")
    root = quick_root / "cli"
    args = ["study", "kernel-motion", "--quick", "--json", "--root", str(root), "--threads", "1"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    result = json.loads(first.output)
    _check_written(result, root / "studies", "kernel-motion")
    before = _run_dirs(root)
    assert set(result["runs"]) <= before and before
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert _run_dirs(root) == before
    assert json.loads(again.output)["runs"] == result["runs"]


def test_list_names_my_studies():
    names = {s.name for s in studies.all_studies()}
    assert set(MINE) <= names
    for n in MINE:
        s = studies.get(n)
        assert s.summary and "\n" not in s.summary and s.expected_minutes > 0 and s.paper


# ---- helpers ----------------------------------------------------------------------------------


def test_catapult_regime_rule():
    assert catapult.regime(np.array([1.0, 0.9, 0.8, 0.5]), "finished") == "lazy"
    assert catapult.regime(np.array([1.0, 1.6, 3.0, 0.5]), "finished") == "catapult"
    # a spike after step 50 is not an early catapult
    late = np.r_[1.0, np.full(49, 0.9), 5.0, 0.5]
    assert catapult.regime(late, "finished") == "lazy"
    assert catapult.regime(np.array([1.0, 2.0, 1.2]), "finished") == "divergent"  # ends above L_1
    assert catapult.regime(np.array([1.0, 0.5]), "diverged") == "divergent"
    assert catapult.regime(np.array([1.0, np.nan]), "finished") == "divergent"


def test_catapult_boundaries_are_geometric_midpoints():
    cs = [1, 2, 4, 8, 16]
    c_loss, c_max = catapult.boundaries(cs, ["lazy", "lazy", "catapult", "catapult", "divergent"])
    assert c_loss == pytest.approx(math.sqrt(8)) and c_max == pytest.approx(math.sqrt(128))
    c_loss, c_max = catapult.boundaries(cs, ["catapult"] * 5)  # neither boundary is bracketed
    assert math.isnan(c_loss) and math.isnan(c_max)
    c_loss, c_max = catapult.boundaries(cs, ["lazy", "divergent", "divergent", "divergent", "divergent"])
    assert math.isnan(c_loss) and c_max == pytest.approx(math.sqrt(2))


def test_edge_statistics_reach_and_hover():
    steps = np.arange(0, 100, 10)
    ratio = np.array([0.3, 0.5, 0.7, 0.95, 1.1, 0.9, 1.0, 1.05, 0.97, 1.02])
    s = edge_of_stability.edge_statistics(steps, ratio)
    assert s["reach_step"] == 30 and s["reached"] and s["hovers"]
    assert s["median_after"] == pytest.approx(float(np.median(ratio[3:])))
    s = edge_of_stability.edge_statistics(steps, np.linspace(0.1, 0.5, 10))
    assert not s["reached"] and not s["hovers"] and s["reach_step"] is None
    s = edge_of_stability.edge_statistics(steps, np.r_[0.5, np.full(9, 1.6)])  # reaches, far beyond
    assert s["reached"] and not s["hovers"]


def test_kernel_flat_step_rule():
    steps = np.arange(8, 8 * 21, 8)
    v = np.r_[np.geomspace(1.0, 0.05, 6), np.full(14, 0.01)]
    t_flat, v_late = kernel_motion.flat_step(steps, v)
    assert v_late == pytest.approx(0.01)
    # by hand: v[4:7] = 0.091, 0.05, 0.01; the running median of 3 is 0.05 at index 5 (> 2 v_late)
    # and 0.01 from index 6 on, so the velocity is flat from index 6, step 56
    assert kernel_motion.running_median(v)[5] == pytest.approx(0.05) and t_flat == 56
    assert kernel_motion.running_median(np.array([3.0, 1.0, 2.0, 10.0])).tolist() == [2.0, 2.0, 2.0, 6.0]
    assert kernel_motion.flat_step(steps[:3], v[:3]) == (None, pytest.approx(math.nan, nan_ok=True))
    t_flat, _ = kernel_motion.flat_step(steps, np.full(20, 0.01))
    assert t_flat == steps[0]


def test_directional_saturation_step_and_pairs():
    steps = np.array([1, 2, 5, 10, 20, 50])
    assert directional.saturation_step(steps, np.array([0.2, 0.95, 0.8, 0.92, 0.97, 1.0])) == 10
    assert directional.saturation_step(steps, np.full(6, 0.99)) == 1
    assert directional.saturation_step(steps, np.array([0.1] * 5 + [np.nan])) is None
    runs = [{"workload": "w", "width": w, "momentum": m, "wd": 0.0, "id": (w, m)} for w in (1, 2) for m in (0, 0.9)]
    ps = directional.pairs(runs, "momentum")
    assert sorted((a["id"], b["id"]) for a, b in ps) == [((1, 0), (1, 0.9)), ((2, 0), (2, 0.9))]
    assert len(directional.pairs(runs, "width")) == 2 and directional.pairs(runs, "wd") == []


def test_directional_plan_covers_the_grid():
    runs = directional.plan(directional.FULL)
    for wl in ("mnist1d-cnn", "modadd-transformer"):
        grid = {(r["width"], r["momentum"], r["wd"]) for r in runs if r["workload"] == wl}
        assert len(grid) == 8
    cnn = [r for r in runs if r["workload"] == "mnist1d-cnn"]
    assert {r["config"].momentum for r in cnn} == {0.0, 0.9} and {r["config"].weight_decay for r in cnn} == {0, 5e-4}


def test_bn_only_earliest_match():
    pts = [{"switch": 0, "final_metric": 0.5}, {"switch": 10, "final_metric": 0.895},
           {"switch": 50, "final_metric": 0.92}, {"switch": 5, "final_metric": math.nan}]
    assert bn_only.earliest_match(0.9, pts, 0.01)["switch"] == 10
    assert bn_only.earliest_match(0.95, pts, 0.01) is None
    assert bn_only.earliest_match(0.95, pts, 0.04)["switch"] == 50


def test_verdict_rules():
    assert common.factor_verdict(2.9, 2.0) == ("reproduced", "")
    assert common.factor_verdict(4.0, 2.0)[0] == "partly" and "2.00x above" in common.factor_verdict(4.0, 2.0)[1]
    assert common.factor_verdict(0.5, 2.0)[0] == "not"
    assert common.factor_verdict(math.nan, 2.0)[0] == "not"
    assert common.count_verdict(3, 3, "x") == ("reproduced", "")
    assert common.count_verdict(2, 4, "x")[0] == "partly" and common.count_verdict(1, 4, "x")[0] == "not"
    assert common.count_verdict(0, 0, "x")[0] == "not"
    assert common.range_verdict(3.0, 2, 4) == ("reproduced", "")
    assert common.range_verdict(1.5, 2, 4)[0] == "partly" and common.range_verdict(0.5, 2, 4)[0] == "not"
    assert common.range_verdict(9.0, 2, 4)[0] == "not"


def test_rounded_learning_rates_survive_last_bit_changes():
    assert common.rounded(0.2050107178) == 0.205 and common.rounded(0.20501071784 * (1 + 1e-9)) == 0.205
    assert common.rounded(1234.5678) == 1235.0 and common.rounded(3.0e-5, 2) == 3.0e-5


def test_init_sharpness_of_a_linear_mse_model_is_the_closed_form():
    """depth 0: logits = W x + b, loss = 0.5 mean_i |W x_i + b - y_i|^2, so the Hessian is
    I_10 (x) (1/n) sum_i [x_i; 1][x_i; 1]^T and lambda_0 is the top eigenvalue of that covariance."""
    torch.set_num_threads(1)
    cfg = RunConfig.for_workload("mnist1d-mlp-mse", workload_options={"depth": 0, "samples": 250})
    n = 128
    lam = common.init_sharpness(cfg, n, tol=1e-8, max_iter=200)
    model, data, _ = common.init_model(cfg)
    x = torch.cat([data.x_train[:n].double(), torch.ones(n, 1, dtype=torch.float64)], 1)
    exact = torch.linalg.eigvalsh(x.T @ x / n)[-1].item()
    assert lam == pytest.approx(exact, rel=1e-4)  # float32 Hessian-vector products
    assert isinstance(model, torch.nn.Sequential) and len(model) == 1


def test_init_model_matches_the_trainers_init(tmp_path):
    from trajscope.train import Trainer

    cfg = RunConfig.for_workload("mnist1d-mlp-mse", workload_options={"width": 8, "depth": 1, "samples": 250},
                                 steps=0)
    s = Trainer(cfg, root=tmp_path, progress=False).fit()
    model, _, _ = common.init_model(cfg)
    with common.opened(s) as run:
        snap = run.load_snapshot(0)
    for name, p in model.named_parameters():
        assert torch.equal(snap[name], p.detach())


def test_mnist1d_samples_option_sets_the_training_set_size():
    from trajscope import workloads
    from trajscope.errors import UsageError

    w = workloads.get("mnist1d-mlp-mse")
    data = w.make_data(0, w.resolve_options({"samples": 250}))
    assert data.x_train.shape == (200, 40) and data.x_val.shape == (50, 40)
    with pytest.raises(UsageError):
        w.make_data(0, {"samples": 10})
    assert workloads.get("mnist1d-mlp").options == {"width": 256, "depth": 2}  # old defaults unchanged
