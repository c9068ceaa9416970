"""The study framework: a toy study registered for the test runs through the store and writes its
section, JSON and figures; findings validate their verdicts; the CLI lists and runs studies."""

import json

import pytest

from trajscope import studies
from trajscope.cli import main
from trajscope.config import RecordConfig, RunConfig
from trajscope.studies import Finding, Study, StudyResult
from trajscope.studies.base import REGISTRY


class Toy(Study):
    name = "toy"
    title = "Two learning rates on digits"
    summary = "a larger rate lowers the training loss faster (toy)"
    paper = "none"
    expected_minutes = 0.1

    def run(self, ctx):
        rec = RecordConfig.preset("minimal")
        cfgs = [RunConfig.for_workload("digits-mlp", steps=4 if ctx.quick else 40, eval_every=2, lr=lr, record=rec)
                for lr in (1e-4, 1e-2)]
        small, large = ctx.train(cfgs)
        better = large["final"]["val_loss"] < small["final"]["val_loss"]
        from trajscope.report import style

        with style.context():
            fig, (ax,) = style.figure(1, 1)
            ax.plot([1e-4, 1e-2], [small["final"]["val_loss"], large["final"]["val_loss"]])
            path = ctx.save_figure(self.name, "loss-vs-lr", fig)
        row = Finding("larger rate, lower loss", "yes", f"{large['final']['val_loss']:.3f} vs "
                      f"{small['final']['val_loss']:.3f}", "reproduced" if better else "not",
                      "" if better else "the larger rate did not lower the loss in so few steps")
        return StudyResult(self.name, self.title, ctx.quick, [row], figures={"loss-vs-lr": path})


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(REGISTRY, "toy", Toy)


def test_finding_needs_a_known_verdict_and_a_reason_unless_reproduced():
    with pytest.raises(ValueError, match="verdict must be one of"):
        Finding("c", "p", "m", "maybe")
    with pytest.raises(ValueError, match="needs a reason"):
        Finding("c", "p", "m", "partly")
    assert Finding("c", "p", "m", "partly", "fewer steps").why == "fewer steps"


def test_run_study_writes_section_json_figures_and_reuses_runs(toy, tmp_path, capsys):
    root = tmp_path / "runs"
    lines = []
    res = studies.run_study("toy", quick=True, root=root, say=lines.append, progress=False)
    assert lines == ["study toy (quick): Two learning rates on digits; expected time under a minute"]
    assert len(res.runs) == 2 and res.wall_s > 0
    html = (root / "studies" / "toy-quick.html").read_text()
    assert "larger rate, lower loss" in html and "data:image/png;base64," in html and "<script" not in html
    saved = json.loads((root / "studies" / "toy-quick.json").read_text())
    assert saved["findings"][0]["claim"] == "larger rate, lower loss" and saved["quick"] is True
    assert (root / "studies" / "toy-loss-vs-lr.png").read_bytes()[:4] == b"\x89PNG"
    runs_before = sorted(p.name for p in root.iterdir())
    again = studies.run_study("toy", quick=True, root=root, say=None, progress=False)
    assert sorted(p.name for p in root.iterdir()) == runs_before and again.runs == res.runs


def test_cli_lists_runs_and_rejects_studies(toy, tmp_path, capsys):
    assert main(["study", "--list"]) == 0
    assert "toy" in capsys.readouterr().out
    assert main(["study", "toy", "--quick", "--json", "--root", str(tmp_path), "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["study"] == "toy" and out["findings"][0]["verdict"] in ("reproduced", "partly", "not")
    assert main(["study", "nope"]) == 2
    assert "unknown study 'nope'" in capsys.readouterr().err
    assert main(["study"]) == 2
