"""Real browser test of the explorer: JupyterLab on localhost, the executed explorer notebook opened
in headless Chromium (Debian's package, driven by Playwright), the widget rendered and answering a
control (the map redrawn, the neighbour panel updated); a screenshot is saved.

Without a Chromium on PATH the test is skipped with the reason, except under CI (``CI`` set, as
``.ci/run`` does after installing Debian's chromium), where a missing browser fails it. A browser
that is found but cannot start fails the test with the reason."""
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from vlm2rec_lab.batch import run_batch, select_notebooks

BROWSERS = ("chromium", "chromium-browser", "google-chrome")  # looked up on PATH, in this order
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# the explorer's map title, read in the page from the shown PNG's tEXt chunk "Title"
MAP_TITLE = """async () => {
  const src = document.querySelector('img.explorer-map').src;
  const png = new Uint8Array(await (await fetch(src)).arrayBuffer());
  const at = new TextDecoder('latin1').decode(png).indexOf('tEXtTitle\\0');
  const size = new DataView(png.buffer).getUint32(at - 4);
  return new TextDecoder('latin1').decode(png.slice(at + 10, at + 4 + size));
}"""


def under_ci() -> bool:
    """CI sets ``CI`` (``CI=true``): there a missing browser is a failure, not a skip."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def find_chromium() -> str | None:
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


@pytest.fixture(scope="session")  # session scope: set up before the session fixtures that build data
def chromium() -> str:
    """The browser's path; skipped (failed under CI) when none is found, before any work is done."""
    path = find_chromium()
    if path is None:
        why = (f"no Chromium found (looked for {', '.join(BROWSERS)} on PATH); "
               "install one, or run .ci/run, to run the browser test")
        if under_ci():
            pytest.fail(f"{why} [CI is set: a missing browser fails here]")
        pytest.skip(why)
    return path


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture()
def lab(tmp_path):
    port, token = _free_port(), "vlm2rec-test"
    jupyter = Path(sys.executable).with_name("jupyter")
    log = open(tmp_path / "lab.log", "w")
    proc = subprocess.Popen([str(jupyter), "lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
                             f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path}", "--allow-root"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(f"{url}/api?token={token}", timeout=1)
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.terminate()
        pytest.fail(f"JupyterLab did not start: {(tmp_path / 'lab.log').read_text()[-2000:]}")
    yield url, token, tmp_path
    proc.terminate()
    proc.wait(timeout=20)


def test_explorer_renders_and_answers_a_control_in_chromium(chromium, synth_ds, tiny_path, lab):
    from playwright.sync_api import sync_playwright

    url, token, root = lab
    nb = select_notebooks("07")[0]
    res = run_batch([synth_ds.path], [nb], root / "batch", profile="quick")
    assert res[0].ok, res[0].error
    shutil.copy(res[0].path, root / "explorer.ipynb")
    with sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=chromium, args=FLAGS, headless=True)
        except Exception as e:  # noqa: BLE001 - report why the browser could not start
            pytest.fail(f"Chromium could not start: {e}")
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{url}/lab/tree/explorer.ipynb?token={token}", timeout=60_000)
        page.wait_for_selector(".jp-Notebook", timeout=60_000)
        page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle'], .jp-Toolbar", timeout=60_000)
        time.sleep(2)
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_text("Run All Cells", exact=True).click()
        toggle = page.locator(".widget-toggle-button", has_text="V").first
        toggle.wait_for(timeout=180_000)
        neighbours = page.locator(".widget-html", has_text="nearest in").first
        neighbours.wait_for(timeout=60_000)
        assert "nearest in T/V space" in neighbours.inner_text()
        the_map = page.locator("img.explorer-map")
        the_map.wait_for(timeout=60_000)
        src, pixels = the_map.get_attribute("src"), the_map.screenshot()
        assert page.evaluate(MAP_TITLE).startswith("Vanilla · F · ")
        toggle.click()
        page.wait_for_function("() => [...document.querySelectorAll('.widget-html')].some(e => e.innerText.includes('nearest in T space'))",
                               timeout=60_000)
        # the map is redrawn after the neighbour panel: wait for a new image, loaded
        page.wait_for_function("src => { const m = document.querySelector('img.explorer-map'); return m.src !== src && m.complete; }",
                               arg=src, timeout=60_000)
        assert page.evaluate(MAP_TITLE).startswith("Vanilla · V · ")
        assert the_map.screenshot() != pixels  # the page shows another map, not only another src
        shot = root / "explorer.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert shot.stat().st_size > 10_000
    keep = os.environ.get("VLM2REC_SCREENSHOTS")  # set it to keep the screenshot for a person to look at
    if keep:
        os.makedirs(keep, exist_ok=True)
        shutil.copy(shot, Path(keep) / "explorer.png")
