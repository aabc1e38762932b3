"""End to end: the app in a subprocess, driven by headless Chromium (Playwright, system browser).

Runs lora, dora and bora on the offline default task (MiniLM cut to 2 layers, a few steps), waits
for the live plots and the results table to show the three runs, then starts a longer comparison,
presses Stop, and checks that the partial results stay on the page and on disk. Screenshots go to
the test's tmp folder; the last one is also copied to ``$BORA_SCREENSHOTS`` (default /tmp/bora_screens).

Needs ``/usr/bin/chromium`` (Debian ``chromium``) and the ``playwright`` Python package; never
``playwright install``. Skipped cleanly when either is missing.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
from served_app import free_port, serve_app

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-quic", "--no-first-run", "--disable-sync"]
ROOT = Path(__file__).resolve().parents[1]
TINY = {"steps": 4, "num_layers": 2, "batch_size": 8, "max_length": 32, "eval_every": 2, "eval_samples": 32,
        "analyze_every": 2, "ranks": [4]}
RUNS = ("lora-r4", "dora-r4", "bora-r4")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing (apt-get install chromium)"),
]
sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """``python app.py`` on a free port of 127.0.0.1, with tiny defaults and a private runs folder."""
    tmp = tmp_path_factory.mktemp("app")
    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
           "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "BORA_LAB_RUNS": str(tmp / "runs"),
           "BORA_LAB_DEFAULTS": json.dumps(TINY), "OMP_NUM_THREADS": "2"}
    with serve_app(ROOT, env, tmp / "app.log", port) as url:
        yield url, tmp


@pytest.fixture(scope="module")
def page(app_url):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pg = browser.new_page(viewport={"width": 1600, "height": 1000})
        pg.set_default_timeout(60_000)
        pg.goto(app_url[0])
        pg.wait_for_selector("#bl-run")
        yield pg
        browser.close()


def _wait_status(page, pattern: str, timeout_s: float = 300) -> str:
    deadline = time.monotonic() + timeout_s
    text = ""
    while time.monotonic() < deadline:
        text = page.inner_text("#bl-status")
        if re.search(pattern, text):
            return text
        if "Failed" in text:
            pytest.fail(f"the comparison failed: {text}")
        time.sleep(0.5)
    pytest.fail(f"status never matched {pattern!r}; last: {text!r}")


def _table_rows(page, table: str = "#bl-table") -> list[str]:
    """Text of each body row of a Gradio 6 Dataframe (rows are ``div.virtual-row``)."""
    return [r.inner_text() for r in page.locator(f"{table} .virtual-row").all()]


def _shot(page, folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def test_compare_three_methods_live_then_stop_keeps_partial_results(page, app_url):
    shots = app_url[1] / "screenshots"
    runs_dir = app_url[1] / "runs"
    _shot(page, shots, "0_start")

    page.click("#bl-run")
    page.wait_for_function(  # live: the loss plot gains the three runs before the comparison ends
        "() => document.querySelectorAll('#bl-loss .legendtext').length >= 3", timeout=240_000)
    _shot(page, shots, "1_live")
    _wait_status(page, r"Done")
    legend = {t.text_content() for t in page.locator("#bl-loss .legendtext").all()}
    assert set(RUNS) <= legend
    assert page.locator("#bl-md .main-svg").count() >= 1 and page.locator("#bl-scatter .legendtext").count() >= 3
    rows = _table_rows(page)
    assert len(rows) == 3 and all(any(r in row for row in rows) for r in RUNS)
    assert all("done" in row for row in rows)
    _shot(page, shots, "2_done")

    # A longer comparison, stopped part-way: the partial results stay on the page and on disk.
    page.fill("#bl-field-steps input", "400")
    page.click("#bl-run")
    page.wait_for_function(
        "() => /([3-9]|\\d\\d+) \\/ 1200 steps/.test(document.querySelector('#bl-progress').innerText)",
        timeout=240_000)
    page.click("#bl-stop")
    status = _wait_status(page, r"Stopped", timeout_s=120)
    assert "kept" in status
    rows = _table_rows(page)
    assert len(rows) == 3 and all("cancelled" in row for row in rows)
    assert page.locator("#bl-loss .legendtext").count() >= 3
    final = _shot(page, shots, "3_stopped")

    saved = sorted(runs_dir.glob("*/results.json"))
    assert len(saved) == 2
    stopped = max((json.loads(p.read_text()) for p in saved), key=lambda r: r["config"]["steps"])
    assert stopped["status"] == "cancelled"
    assert 0 < len(stopped["runs"][0]["history"]) < 400

    # History: both runs listed; open the stopped one.
    page.get_by_role("tab", name="History").click()
    page.wait_for_function("() => document.querySelectorAll('#bl-history-list .virtual-row').length >= 2")
    page.click("#bl-history-open")
    page.wait_for_function("() => /Showing/.test(document.querySelector('#bl-history-status').innerText)")
    page.wait_for_function("() => document.querySelectorAll('#bl-history-table .virtual-row').length == 3")
    assert all("cancelled" in row for row in _table_rows(page, "#bl-history-table"))
    _shot(page, shots, "4_history")

    out = Path(os.environ.get("BORA_SCREENSHOTS", "/tmp/bora_screens"))
    out.mkdir(parents=True, exist_ok=True)
    for p in shots.glob("*.png"):
        shutil.copy(p, out / p.name)
    assert final.stat().st_size > 10_000


def test_seeds_show_bands_and_the_forest_plot(page, app_url):
    """Two seeds: the curves become means with shaded 95% bands, and the forest plot shows dora and bora
    against lora with their intervals; the table has one row per method with the verdict."""
    page.get_by_role("tab", name="Compare").click()
    page.fill("#bl-field-steps input", "4")
    page.fill("#bl-field-seeds textarea, #bl-field-seeds input", "0, 1")
    page.click("#bl-run")
    _wait_status(page, r"Done")
    legend = [t.text_content() for t in page.locator("#bl-loss .legendtext").all()]
    assert any("mean of 2 seeds" in t for t in legend), legend
    assert page.locator("#bl-loss path.js-fill").count() >= 1  # the shaded bands
    page.wait_for_function("() => document.querySelectorAll('#bl-forest .point').length >= 2")
    forest_labels = page.inner_text("#bl-forest")
    assert "dora-r4" in forest_labels and "bora-r4" in forest_labels and "lora-r4" in forest_labels
    rows = _table_rows(page)
    assert len(rows) == 3 and any("distinguishable" in r or "than lora" in r for r in rows)
    _shot(page, app_url[1] / "screenshots", "5_seeds")


def test_try_it_shows_each_runs_prediction_next_to_the_base(page, app_url):
    """Try it: pick three runs of the newest comparison (the two-seed one), type a review, and get one
    class-probability panel per run plus the untrained-head base; the disagreement summary shows too."""
    picked = ("lora-r4-s0", "dora-r4-s0", "bora-r4-s0")
    page.get_by_role("tab", name="Try it").click()
    page.wait_for_function("() => /fine_foods/.test(document.querySelector('#bl-try-source input').value)")
    page.wait_for_function("() => document.querySelectorAll('#bl-try-runs .token').length >= 3")
    page.click("#bl-try-runs .remove-all")
    for rid in picked:
        page.click("#bl-try-runs input")
        page.fill("#bl-try-runs input", rid)
        page.get_by_role("option", name=re.compile(f"^{rid} ")).first.click()
    page.keyboard.press("Escape")
    tokens = [t.inner_text() for t in page.locator("#bl-try-runs .token").all()]
    assert [t.split(" ")[0] for t in tokens] == list(picked), tokens
    page.fill("#bl-try-text textarea", "Wonderful tea, fresh and fragrant; my new favourite.")
    page.click("#bl-try-go")
    page.wait_for_function("() => /end of its training/.test(document.querySelector('#bl-try-status').innerText)",
                           timeout=240_000)
    page.wait_for_function(  # a panel shows once Gradio has loaded the Label component's code
        "() => [0, 1, 2, 3].every(i => document.querySelectorAll(`#bl-try-label-${i} meter`).length == 2)")
    for i, title in enumerate([*picked, "base · untrained head"]):
        panel = page.locator(f"#bl-try-label-{i}")
        assert panel.is_visible() and title in panel.inner_text()
        meters = [int(m.get_attribute("aria-valuenow")) for m in panel.locator("meter").all()]
        assert len(meters) == 2 and abs(sum(meters) - 100) <= 1, meters  # great / other
    assert not page.locator("#bl-try-label-4").is_visible()
    page.wait_for_function(
        "() => /(do not all agree on \\d+ of|agree on all) 32 test reviews/.test(document.querySelector('#bl-try-disagree-summary').innerText)")
    final = _shot(page, app_url[1] / "screenshots", "6_try_it")
    out = Path(os.environ.get("BORA_SCREENSHOTS", "/tmp/bora_screens"))
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(final, out / final.name)
    assert final.stat().st_size > 10_000
