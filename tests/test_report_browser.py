"""Reports in a real browser: Debian's headless Chromium driven by Selenium through chromedriver.

``scripts/test.sh`` installs ``chromium`` and ``chromium-driver`` (as root); without them, or
without the ``selenium`` package, these tests skip and say why. Nothing is downloaded by the test
tool. Each page loads from a ``file://`` URL and must log no console error, make no failed (or any
other than data:) request, decode every image, and run no script. A full-page screenshot of the
full report is saved to ``tests/artifacts/report-full.png``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from test_report_runs import HOSTILE, report, runs

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).parent / "artifacts"
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-default-browser-check", "--disable-extensions", "--disable-search-engine-choice-screen",
         "--hide-scrollbars", "--window-size=1100,900")


def _missing() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if shutil.which(path) is None:
            return (f"{path} not found: install Debian's chromium and chromium-driver "
                    "(scripts/test.sh does so when run as root)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "the selenium package is not installed (pip install -e '.[test]')"
    return None


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    reason = _missing()
    if reason:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    d.set_page_load_timeout(30)
    yield d
    d.quit()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return runs(tmp_path_factory)


def load(driver, path: Path) -> dict:
    """Open ``path``; return its title, text, console errors, the requests the page made (and those
    that failed) and its images' sizes. Requests are the page's own: the page load and every request
    whose document is the page (Chromium's internal pages, which it may open on its own, are not)."""
    url = path.resolve().as_uri()
    driver.get_log("browser"), driver.get_log("performance")  # drop what earlier pages logged
    driver.get(url)
    images = driver.execute_script(
        "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight]);")
    console = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    network = [json.loads(e["message"])["message"] for e in driver.get_log("performance")]
    urls = {m["params"]["requestId"]: m["params"]["request"]["url"] for m in network
            if m["method"] == "Network.requestWillBeSent" and url in (m["params"]["request"]["url"],
                                                                        m["params"].get("documentURL"))}
    requests = list(urls.values())
    failed = [(urls[m["params"]["requestId"]], m["params"]["errorText"]) for m in network
              if m["method"] == "Network.loadingFailed" and m["params"]["requestId"] in urls]
    return {"title": driver.title, "text": driver.find_element("tag name", "body").text, "console": console,
            "requests": requests, "failed": failed, "images": images}


def assert_clean(page: dict) -> None:
    assert page["console"] == [], page["console"]
    assert page["failed"] == [], page["failed"]
    assert page["requests"] and all(u.startswith(("file://", "data:")) for u in page["requests"]), page["requests"]
    assert page["images"], "no images"
    assert all(done and w > 0 and h > 0 for done, w, h in page["images"]), page["images"]


def screenshot(driver, name: str) -> Path:
    """A full-page screenshot (the window grown to the page's height) under tests/artifacts/."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1100, min(height + 40, 16000))
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    driver.save_screenshot(str(path))
    driver.set_window_size(1100, 900)
    print(f"screenshot: {path}")
    return path


def test_full_report_loads_clean(driver, built, tmp_path_factory):
    page = load(driver, report(tmp_path_factory, "full")[0])
    assert_clean(page)
    run_id = Path(built["full"]).name
    assert run_id in page["title"] and "digits-mlp" in page["title"]
    overview = driver.find_element("id", "overview").text
    assert run_id in overview and "digits-mlp" in overview
    assert len(page["images"]) >= 14
    shot = screenshot(driver, "report-full.png")
    assert shot.stat().st_size > 10_000


def test_comparison_and_short_reports_load_clean(driver, tmp_path_factory):
    cases = {("full", "compare"): "comparison of 2 runs", ("crashed",): "Crashed at step 12",
             ("diverged",): "Diverged at step 8", ("scalars",): "no trajectory was recorded"}
    for kinds, says in cases.items():
        page = load(driver, report(tmp_path_factory, *kinds)[0])
        assert_clean(page)
        assert says in page["title"] + page["text"], kinds
    screenshot(driver, "report-scalars-only.png")


def test_hostile_run_shows_text_and_runs_no_script(driver, tmp_path_factory):
    from selenium.common.exceptions import NoAlertPresentException

    page = load(driver, report(tmp_path_factory, "hostile")[0])
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text  # noqa: B018 - an alert() would be open now
    assert driver.execute_script("return typeof window.__pwned") == "undefined"
    assert driver.execute_script("return document.scripts.length") == 0
    assert HOSTILE in page["title"]
    assert "<script>alert(1)</script>" in page["text"]
    assert "<img src=x onerror=alert(2)><script>window.__pwned=1</script>" in page["text"]  # config, shown
    assert_clean(page)
