"""Reports (HTML) and TensorBoard export on real runs, synthetic panel data, short and hostile runs.

The page is checked as text here (sections present or absent, images decodable, escaping); the
browser tests (test_report_browser.py) load it in headless Chromium.
"""

from __future__ import annotations

import base64
import io
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from test_report_runs import HOSTILE, report, runs
from trajscope.report import export_tensorboard, write_report
from trajscope.report.data import RunData
from trajscope.report.landscape import grid
from trajscope.report.style import spans_decades, text
from trajscope.report.tensorboard import log_spaced

ALL_PANELS = {"overview", "training", "early", "maps", "pca", "sharpness", "trace", "noise", "kernel", "regime",
              "landscape", "controllers"}


class Page(HTMLParser):
    """Title, section ids, image sources and every tag name of a page."""

    def __init__(self, html: str):
        super().__init__()
        self.title, self.sections, self.images, self.tags, self._in_title = "", [], [], [], False
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        self._in_title = tag == "title"
        if tag == "section":
            self.sections.append(a["id"])
        if tag == "img":
            self.images.append(a["src"])

    def handle_data(self, data):
        if self._in_title:
            self.title += data

    def handle_endtag(self, tag):
        self._in_title = False


def png_sizes(page: Page) -> list[tuple[int, int]]:
    from PIL import Image

    sizes = []
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        img.load()
        sizes.append(img.size)
    return sizes


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return runs(tmp_path_factory)


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    return report(tmp_path_factory, "full")


@pytest.fixture
def page_of(tmp_path_factory):
    """(html, Page) of the report of the runs named."""

    def page(*kinds):
        html = report(tmp_path_factory, *kinds)[0].read_text()
        return html, Page(html)

    return page


def test_full_report_has_every_panel_self_contained(full_report, built):
    out, figures = full_report
    html = out.read_text()
    page = Page(html)
    assert set(page.sections) == ALL_PANELS
    assert "full" in page.title and built["full"].rsplit("/", 1)[1] in page.title and "digits-mlp" in page.title
    assert all(w > 0 and h > 0 for w, h in png_sizes(page))
    assert len(page.images) == len(list(figures.glob("*.png"))) >= 14
    assert "script" not in page.tags
    assert not re.search(r"(src|href)=\"(?!data:|#)", html), "only data: URIs and in-page links"
    assert "http://" not in html and "https://" not in html
    for text_ in ("Time to target", "best validation metric", "sharpness 0.2 of threshold: room to grow",
                  "Loss on the top-two PCA plane"):
        assert text_.lower() in html.lower()


def test_figures_saved_alone(full_report):
    _, figures = full_report
    names = {p.name for p in figures.glob("*.png")}
    assert {"training-loss.png", "training-lr.png", "early-statistics.png", "maps-map.png", "maps-mds.png",
            "pca-pca.png", "sharpness-sharpness.png", "regime-regime.png", "controllers-timeline.png",
            "landscape-landscape.pca_all.png", "noise-0.png", "kernel-0.png", "trace-0.png"} <= names


def test_panels_absent_without_data(page_of):
    html, page = page_of("compare")
    assert set(page.sections) == {"overview", "training", "early", "maps", "pca"}
    assert "Controller decisions" not in html and "Sharpness" not in html  # no empty panel either


def test_comparison_overlays_and_names_differing_config(tmp_path_factory):
    out, figures = report(tmp_path_factory, "full", "compare")
    html = out.read_text()
    page = Page(html)
    assert "comparison of 2 runs" in page.title
    assert "Config values that differ" in html and "<td class=\"k\">lr</td>" in html
    names = {p.name for p in figures.glob("*.png")}
    assert {"maps-map-0.png", "maps-map-1.png", "training-loss.png"} <= names  # heatmaps side by side
    assert all(w > 0 for w, _ in png_sizes(page))


@pytest.mark.parametrize("kind,says", [
    ("scalars", "no trajectory was recorded"),
    ("crashed", "Crashed at step 12 of 30: RuntimeError: simulated crash at step 12"),
    ("diverged", "Diverged at step 8: parameters are not finite"),
])
def test_short_reports_say_what_happened(page_of, kind, says):
    html, page = page_of(kind)
    assert says in html
    assert "training" in page.sections and len(page.sections) < len(ALL_PANELS)
    assert not {"sharpness", "landscape", "controllers", "trace"} & set(page.sections)
    if kind == "scalars":
        assert set(page.sections) == {"overview", "training"}
    assert all(w > 0 for w, _ in png_sizes(page))


def test_write_report_default_path_and_errors(built, tmp_path, monkeypatch):
    from trajscope.errors import RunNotFoundError, UsageError

    monkeypatch.chdir(tmp_path)
    out = write_report(["scalars-only"], root=built["root"])
    assert out == Path(f"report-{Path(built['scalars']).name}.html") and out.exists()
    with pytest.raises(UsageError):
        write_report([])
    with pytest.raises(RunNotFoundError):
        write_report(["no-such-run"], root=built["root"])


def test_time_to_target_and_best_metric(built):
    rd = RunData.load(built["scalars"])
    try:
        assert rd.target() == pytest.approx(0.94)
        assert rd.time_to_target() == (20, 2.5)
        assert rd.best_metric() == (30, pytest.approx(0.97))
    finally:
        rd.close()


def test_hostile_strings_are_escaped(page_of):
    html, page = page_of("hostile")
    assert "<script>" not in html and "<img src=x" not in html and "<b>$x^" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=alert(2)&gt;" in html
    assert "script" not in page.tags and page.tags.count("img") == len(page.images)
    assert HOSTILE in page.title
    assert {"landscape", "controllers"} <= set(page.sections)


def test_tensorboard_export_reads_back(built, tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard package (extra 'report') is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from trajscope.store import Run

    summary = export_tensorboard(built["full"], out_dir=tmp_path / "tb")
    assert summary["files"] and summary["histograms"] > 0
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    run = Run.open(built["full"])
    try:
        df = run.scalars().dropna()
        snaps = run.snapshot_steps("params")
    finally:
        run.close()
    tags = acc.Tags()
    assert set(tags["scalars"]) == set(df["name"]) and summary["scalars"] == len(df)
    loss = df[df["name"] == "loss"]
    events = acc.Scalars("loss")
    assert [e.step for e in events] == loss["step"].tolist()
    np.testing.assert_allclose([e.value for e in events], loss["value"], rtol=1e-6)
    hist = [t for t in tags["histograms"] if t.startswith("params/")]
    assert hist and len(acc.Histograms(hist[0])) == len(snaps)
    assert summary["histograms"] == sum(len(acc.Histograms(t)) for t in tags["histograms"])
    again = export_tensorboard(built["full"], out_dir=tmp_path / "tb", histograms=False)
    assert len(again["files"]) == 1 and again["histograms"] == 0  # a re-export replaces the old file


def test_landscape_grid_orientation():
    x, y = np.arange(3.0), np.arange(5.0)
    Z_ij = np.add.outer(x, 10 * y)  # (3, 5): loss[i, j] at (x[i], y[j])
    _, _, Z = grid({"x": x, "y": y, "loss": Z_ij})
    assert Z.shape == (5, 3) and Z[4, 2] == 42
    _, _, Z = grid({"x": x, "y": y, "loss": Z_ij.T, "indexing": "xy"})
    assert Z[4, 2] == 42
    assert grid({"x": x, "y": y, "loss": np.zeros((4, 4))}) is None
    assert grid({"alphas": x, "losses": x ** 2})[1] is None


def test_helpers():
    assert log_spaced(list(range(100)), 10)[:3] == [0, 1, 2] and log_spaced(list(range(100)), 10)[-1] == 99
    assert len(log_spaced(list(range(1000)), 20)) <= 21 and log_spaced([1, 2], 5) == [1, 2]
    assert spans_decades([0.01, 1.0]) and not spans_decades([0.0, 1.0]) and not spans_decades([1, 2])
    assert text("$x$") == r"\$x\$"


def test_analyze_option_adds_trajectory_panels(tmp_path):
    from test_report_runs import config
    from trajscope.config import RecordConfig
    from trajscope.train import Trainer

    cfg = config(lr=0.004, steps=8, record=RecordConfig(checkpoint_every=0))
    path = Trainer(cfg, root=tmp_path / "runs", progress=False).fit()["path"]
    sections = Page(write_report([path], out=tmp_path / "plain.html").read_text()).sections
    assert not {"early", "maps", "pca"} & set(sections)
    sections = Page(write_report([path], out=tmp_path / "analyzed.html", analyze=True).read_text()).sections
    assert {"early", "maps", "pca"} <= set(sections)
