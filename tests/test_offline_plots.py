"""`dvc plots show` offline: the page it writes, opened in headless Chromium with no network, draws every chart.

A workspace of the micro chain's curves (its dvclive/, reports/ and metrics/ under the repo's dvc.yaml and the
committed .dvc/) gets the offline template as `make plots` writes it (pipeline.harness.plots_template); the real
`dvc plots show` then runs without network (`unshare -rn` where the kernel allows it) and Chromium opens its page
through a proxy to a closed port, so any request for something not on this machine fails and is seen in the
browser's network log. What must hold: the page names no http(s) script or stylesheet, every chart DVC wrote has
drawn its data (an SVG mark with a path, and pixels other than the background in a screenshot of the page), and
nothing was asked of anywhere but this machine. Without the template (the committed .dvc/config alone) the page
is DVC's own, from the CDN: offline it draws nothing, and it says what to run. Debian's chromium and chromedriver
are used as installed; outputs/test-artifacts/plots.png is the whole page as the browser drew it.
"""
from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from conftest import NO_NETWORK, REPO, free_port, venv_env

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
SCREENSHOT = REPO / "outputs" / "test-artifacts" / "plots.png"
LOCAL_SCHEMES = {"file", "data", "blob", "about"}
# the charts dvc.yaml names itself (one per stage's curves, the report's accuracy bars), whatever else DVCLive logged
NAMED = {"pretrain_loss", "sft_loss", "reward_accuracy", "align_reward_kl", "align_eval", "sft_control_loss",
         "reports_accuracy_json"}
# an SVG mark that draws data: a line, or the bars of the accuracy chart, with a non-empty path
DATA_MARKS = """
return Object.fromEntries(arguments[0].map(id => [id, [...document.querySelectorAll(
  `#${id} .chart-wrapper g.mark-line path, #${id} .chart-wrapper g.mark-rect path`)]
  .filter(p => (p.getAttribute("d") || "").length > 2).length]))
"""
# each chart's drawing on the page, [x, y, width, height] in whole CSS pixels from the page's top left
CHART_RECTS = """
return Object.fromEntries(arguments[0].map(id => {
  const r = document.querySelector(`#${id} .chart-wrapper`).getBoundingClientRect();
  return [id, [r.left + scrollX, r.top + scrollY, r.width, r.height].map(Math.round)];
}))
"""

pytestmark = pytest.mark.skipif(not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
                                reason=f"needs {CHROMIUM} and {CHROMEDRIVER}: apt-get install chromium chromium-driver")


def workspace(chain: Path, dest: Path) -> Path:
    """A git repo holding the repo's dvc.yaml and .dvc/ files as git has them (not .dvc/config.local or the
    offline template: git ignores them), and the micro chain's curves."""
    tracked = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", ".dvc", "dvc.yaml"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.split()
    for f in tracked:
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, dest / f)
    for part in ("dvclive", "reports", "metrics"):
        shutil.copytree(chain / part, dest / part)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


def plots_show(repo: Path) -> Path:
    """`dvc plots show` as a user runs it, without network; its page."""
    proc = subprocess.run([*NO_NETWORK, "dvc", "plots", "show"], cwd=repo, env=venv_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, f"dvc plots show failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    page = repo / "dvc_plots" / "index.html"
    assert page.as_uri() in proc.stdout
    return page


def chart_ids(page: Path) -> list[str]:
    """The charts DVC wrote into the page: one `vegaEmbed('#<id>', spec)` call each."""
    ids = re.findall(r"vegaEmbed\('#([\w-]+)', spec\)", page.read_text(encoding="utf8"))
    assert NAMED <= set(ids), f"charts missing from the page: {sorted(NAMED - set(ids))}"
    return ids


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium whose every request off this machine goes to a proxy that is not there."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    # no scrollbar: a screenshot of the whole page then keeps the page's width, so the charts stay where measured
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1000,800",
                "--hide-scrollbars",
                f"--proxy-server=http://127.0.0.1:{free_port()}", "--disable-background-networking",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def open_page(driver, page: Path) -> tuple[list[str], list[str]]:
    """Load `page`; return the URLs it requested and those a response came for, as the network log shows."""
    driver.get_log("performance"), driver.get_log("browser")  # what came before: its start page, the last page
    driver.get(page.as_uri())
    requested, answered = [], []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            requested.append(message["params"]["request"]["url"])
        elif message["method"] == "Network.responseReceived":
            answered.append(message["params"]["response"]["url"])
    return requested, answered


def full_page_png(driver) -> bytes:
    """A screenshot of the whole page, not only the window's part of it, in CSS pixels."""
    width, height = driver.execute_script("return [document.documentElement.scrollWidth, "
                                          "document.documentElement.scrollHeight]")
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                             "clip": {"x": 0, "y": 0, "width": width,
                                                                      "height": height, "scale": 1}})
    return base64.b64decode(shot["data"])


def off_machine(urls: list[str]) -> list[str]:
    return [u for u in urls if urlsplit(u).scheme not in LOCAL_SCHEMES
            and urlsplit(u).hostname not in {"localhost", "127.0.0.1", "::1"}]


def test_dvc_plots_show_draws_every_chart_offline(micro_chain, tmp_path, browser):
    import numpy as np
    from PIL import Image
    from selenium.webdriver.support.ui import WebDriverWait

    from pipeline.harness import plots_template

    repo = workspace(micro_chain, tmp_path)
    plots_template.install(repo)  # what `make plots` does for the repo itself
    page = plots_show(repo)
    html = page.read_text(encoding="utf8")
    remote = re.findall(r"<(?:script|link)\b[^>]*\b(?:src|href)\s*=\s*[\"']?(https?:[^\"'\s>]*)", html, re.I)
    assert not remote, f"the page loads {remote}"
    assert "offline-template-missing" not in html  # the offline template, not the committed CDN one
    ids = chart_ids(page)

    requested, _ = open_page(browser, page)
    drawn = " , ".join(f"#{i} .chart-wrapper > svg, #{i} .chart-wrapper > canvas" for i in ids)
    WebDriverWait(browser, 30, poll_frequency=0.1).until(
        lambda d: len(d.find_elements("css selector", drawn)) == len(ids),
        f"not every one of the {len(ids)} charts drew within 30 s")
    marks = browser.execute_script(DATA_MARKS, ids)
    assert not [i for i in ids if not marks[i]], f"charts with no data drawn: {[i for i in ids if not marks[i]]}"

    png = full_page_png(browser)
    shot = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    for chart_id, (x, y, w, h) in browser.execute_script(CHART_RECTS, ids).items():
        ink = (shot[y:y + h, x:x + w].min(axis=2) < 240).mean()  # its pixels darker than the white background
        assert ink > 0.01, f"chart {chart_id} is blank ({ink:.2%} of its pixels drawn)"
    errors = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
    assert not off_machine(requested), f"requests off this machine: {off_machine(requested)}"

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    SCREENSHOT.write_bytes(png)
    assert SCREENSHOT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_the_template_the_page_says_what_to_run_and_draws_nothing_offline(micro_chain, tmp_path, browser):
    """The committed .dvc/config alone (a clone where `make plots` has not run): DVC's page from the CDN, which
    offline cannot load Vega, so no chart draws; this also shows the browser above had no network to reach."""
    page = plots_show(workspace(micro_chain, tmp_path))
    ids = chart_ids(page)
    requested, answered = open_page(browser, page)
    notice = browser.find_element("id", "offline-template-missing").text
    assert "make plots" in notice and "python -m pipeline.harness.plots_template" in notice
    cdn = off_machine(requested)
    assert cdn and all(urlsplit(u).hostname == "cdn.jsdelivr.net" for u in cdn), requested
    assert not set(cdn) & set(answered), f"answered over the network: {sorted(set(cdn) & set(answered))}"
    assert ids and not browser.find_elements("css selector", ".chart-wrapper")
    assert any("vegaEmbed is not defined" in e["message"] for e in browser.get_log("browser"))

